"""The fused CPU decode step (offload/kernels/decode_block.py) against its pure-torch twin, on fresh random
inputs: every weight format, GQA, batches, biases, sliding windows, and the cache it writes."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from offload.kernels import cpu_extension, quantize_int4, quantize_int8
from offload.kernels.decode_block import (
    cpu_linear,
    decode_block_reference,
    int8_rounded_activations,
    linear_reference,
)

# Relative error of the output, set by rounding to the activation dtype (the kernel and the twin both
# compute in float32 between the residuals).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module")
def ext():
    ext = cpu_extension()
    assert ext is not None, "the CPU kernels did not build on this machine"
    return ext


def linear_tensors(fmt: str, out_f: int, in_f: int, bias: bool = False) -> list[torch.Tensor]:
    w = torch.randn(out_f, in_f) / math.sqrt(in_f)
    if fmt == "int8":
        q = quantize_int8(w)
        tensors = [q.qweight, q.scale]
    elif fmt == "int4":
        q = quantize_int4(w, 32)
        tensors = [q.packed, q.scales, q.zeros]
    else:
        tensors = [w.to(getattr(torch, fmt))]
    return tensors + ([0.1 * torch.randn(out_f)] if bias else [])


def activation_dtype(fmt: str) -> torch.dtype:
    return getattr(torch, fmt) if fmt in ("bfloat16", "float16") else torch.float32


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3, 6])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference(ext, fmt: str, tokens: int, bias: bool) -> None:
    weight = linear_tensors(fmt, 83, 160, bias)  # odd rows: blocks of rows and single rows; tails past 16
    x = torch.randn(tokens, 160).to(activation_dtype(fmt))
    y = cpu_linear(x, weight)
    assert y.dtype == x.dtype and y.shape == (tokens, 83)
    assert rel_err(y, linear_reference(x.float(), weight)) < TOL[x.dtype]


@pytest.fixture(params=["avx512_bf16", "avx512_vnni", "portable"])
def cpu_path(request, ext):
    """Each instruction-set path in turn (skipped where this CPU lacks it), the CPU's own set restored after."""
    before = ext.set_cpu_paths([] if request.param == "portable" else [request.param])
    if request.param != "portable" and request.param not in ext.cpu_paths():
        ext.set_cpu_paths(before)
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    ext.set_cpu_paths(before)


@pytest.mark.parametrize("tokens", [1, 3, 6])
@pytest.mark.parametrize("in_f", [160, 576, 100])  # 100: a tail past the last 32 values
def test_bfloat16_linear_on_each_path(ext, cpu_path: str, tokens: int, in_f: int) -> None:
    weight = linear_tensors("bfloat16", 83, in_f)
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16)
    assert rel_err(cpu_linear(x, weight), linear_reference(x.float(), weight)) < TOL[torch.bfloat16]
    # float32 activations against bfloat16 weights: the portable path keeps x in float32; the bfloat16 dot
    # products round it to bfloat16, as the weights are
    xf = torch.randn(tokens, in_f)
    tol = 1e-5 if cpu_path == "portable" else TOL[torch.bfloat16]
    assert rel_err(cpu_linear(xf, weight), linear_reference(xf, weight)) < tol


def test_paths_differ_only_by_the_rounding_of_activations(ext) -> None:
    """float32 x on bfloat16 weights: the portable path gives float32's result, avx512_bf16 (where the CPU
    has it) x rounded to bfloat16's, so forcing a path must change which one comes out."""
    weight = linear_tensors("bfloat16", 64, 256)
    x = torch.randn(2, 256)
    before = ext.set_cpu_paths([])
    try:
        portable = cpu_linear(x, weight)
        assert rel_err(portable, linear_reference(x, weight)) < 1e-5
        ext.set_cpu_paths(["avx512_bf16"])
        if "avx512_bf16" in ext.cpu_paths():
            rounded = linear_reference(x.bfloat16().float(), weight)
            assert rel_err(cpu_linear(x, weight), rounded) < 1e-5
    finally:
        ext.set_cpu_paths(before)


INT4_SHAPES = [(83, 576, 64), (83, 384, 128), (40, 512, 256), (33, 256, 32), (20, 128, 8), (9, 160, 32)]


@pytest.mark.parametrize("out_f, in_f, group", INT4_SHAPES)  # 576: a last chunk of 64; 160: not taken
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_one_token_int4_on_each_path(ext, cpu_path: str, out_f: int, in_f: int, group: int,
                                     scale_dtype: torch.dtype) -> None:
    """On the avx512_vnni path a one-token int4 call reads x rounded to int8 per 32 values
    (int8_rounded_activations) and is then exact to float32 rounding; elsewhere, and for shapes the path does
    not take, it reads x as it is. Both linear (the decode block's routine) and int4_matmul."""
    w = quantize_int4(torch.randn(out_f, in_f) / math.sqrt(in_f), group, scale_dtype)
    weight = [w.packed, w.scales, w.zeros]
    x = torch.randn(1, in_f)
    rounds = ext.int4_rounds_activations(in_f, w.group_size)
    assert rounds == (cpu_path == "avx512_vnni" and in_f % 64 == 0)
    ref = linear_reference(int8_rounded_activations(x) if rounds else x, weight)
    assert rel_err(cpu_linear(x, weight), ref) < 1e-5
    assert rel_err(ext.int4_matmul(x, *weight), ref) < 1e-5
    if rounds:  # the rounding's own error, for scale: what the path gives up
        assert 1e-4 < rel_err(ref, linear_reference(x, weight)) < 2e-2


def test_int8_rounding_per_block_of_32() -> None:
    x = torch.randn(2, 64)
    x[0, :32] *= 100  # a block's scale is its own: the next block keeps its fine steps
    r = int8_rounded_activations(x)
    for row, block in ((0, slice(0, 32)), (0, slice(32, 64)), (1, slice(0, 32))):
        step = x[row, block].abs().max() / 127
        assert (r[row, block] - x[row, block]).abs().max() <= step / 2 * 1.0001
        assert torch.allclose(r[row, block] / step, (r[row, block] / step).round(), atol=1e-3)
    assert torch.equal(int8_rounded_activations(torch.zeros(1, 32)), torch.zeros(1, 32))


def test_unknown_cpu_path_is_refused(ext) -> None:
    with pytest.raises(RuntimeError, match="unknown path 'avx9'"):
        ext.set_cpu_paths(["avx9"])


def block_inputs(fmt: str, batch: int, n_heads: int, n_kv: int, head_dim: int, pos: int, bias: bool, dim: int = 96,
                 ffn: int = 160):
    dtype = activation_dtype(fmt)
    q_dim, kv_dim = n_heads * head_dim, n_kv * head_dim
    shapes = [(q_dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, q_dim), (ffn, dim), (ffn, dim), (dim, ffn)]
    weights = [linear_tensors(fmt, o, i, bias and n < 3) for n, (o, i) in enumerate(shapes)]
    cache = (batch, n_kv, pos + 5, head_dim)
    angles = pos * torch.rand(head_dim // 2)
    return dict(
        x=torch.randn(batch, dim).to(dtype),
        attn_norm=(1 + 0.1 * torch.randn(dim)).to(dtype),
        ffn_norm=(1 + 0.1 * torch.randn(dim)).to(dtype),
        eps=1e-5,
        weights=weights,
        k_cache=torch.randn(cache).to(dtype),
        v_cache=torch.randn(cache).to(dtype),
        pos=pos,
        cos=angles.cos(),
        sin=angles.sin(),
        n_heads=n_heads,
    )


def run_both(ext, inputs: dict, window: int = 0):
    """(kernel output, its caches), (twin output, its caches), each on its own copy of the caches."""
    mine = {**inputs, "k_cache": inputs["k_cache"].clone(), "v_cache": inputs["v_cache"].clone()}
    twin = {**inputs, "k_cache": inputs["k_cache"].clone(), "v_cache": inputs["v_cache"].clone()}
    w = mine.pop("weights")
    y = ext.decode_block(mine["x"], mine["attn_norm"], mine["ffn_norm"], mine["eps"], *w, mine["k_cache"],
                         mine["v_cache"], mine["pos"], mine["cos"], mine["sin"], mine["n_heads"], window)
    ref = decode_block_reference(**twin, window=window)
    return (y, mine["k_cache"], mine["v_cache"]), (ref, twin["k_cache"], twin["v_cache"])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch, n_heads, n_kv, head_dim", [(1, 4, 4, 24), (1, 6, 2, 16), (2, 3, 1, 32)])
def test_decode_block_matches_reference(ext, fmt: str, batch: int, n_heads: int, n_kv: int, head_dim: int) -> None:
    inputs = block_inputs(fmt, batch, n_heads, n_kv, head_dim, pos=11, bias=False)
    (y, k, v), (ref, k_ref, v_ref) = run_both(ext, inputs)
    assert y.dtype == inputs["x"].dtype and y.shape == inputs["x"].shape
    assert rel_err(y, ref) < TOL[y.dtype]
    tol = TOL[k.dtype]
    assert rel_err(k[:, :, 11], k_ref[:, :, 11]) < tol and rel_err(v[:, :, 11], v_ref[:, :, 11]) < tol
    untouched = torch.ones(k.shape[2], dtype=torch.bool)
    untouched[11] = False
    assert torch.equal(k[:, :, untouched], inputs["k_cache"][:, :, untouched])  # only position 11 written
    assert torch.equal(v[:, :, untouched], inputs["v_cache"][:, :, untouched])


@pytest.mark.parametrize("batch", [1, 2])
def test_bfloat16_decode_block_on_each_path(ext, cpu_path: str, batch: int) -> None:
    inputs = block_inputs("bfloat16", batch, 6, 2, 16, pos=7, bias=False)
    (y, k, _), (ref, k_ref, _) = run_both(ext, inputs)
    assert rel_err(y, ref) < TOL[torch.bfloat16] and rel_err(k[:, :, 7], k_ref[:, :, 7]) < TOL[torch.bfloat16]


def test_int4_decode_block_on_each_path(ext, cpu_path: str) -> None:
    """Widths the avx512_vnni path takes (128, 192): there every linear reads int8-rounded activations, which
    costs under 2e-2 of the output; the other paths stay exact."""
    inputs = block_inputs("int4", 1, 4, 2, 32, pos=9, bias=False, dim=128, ffn=192)
    (y, _, _), (ref, _, _) = run_both(ext, inputs)
    assert rel_err(y, ref) < (2e-2 if cpu_path == "avx512_vnni" else TOL[torch.float32])


def test_decode_block_with_biases_and_a_window(ext) -> None:
    inputs = block_inputs("float32", 2, 4, 2, 16, pos=20, bias=True)
    (y, _, _), (ref, _, _) = run_both(ext, inputs, window=6)
    assert rel_err(y, ref) < TOL[torch.float32]
    (unwindowed, _, _), _ = run_both(ext, inputs, window=0)
    assert rel_err(y, unwindowed) > 1e-3  # the window changed what was attended to


def test_decode_block_at_position_zero(ext) -> None:
    inputs = block_inputs("bfloat16", 1, 2, 1, 16, pos=0, bias=False)
    (y, _, _), (ref, _, _) = run_both(ext, inputs)
    assert rel_err(y, ref) < TOL[torch.bfloat16]


def test_decode_block_rejects_what_does_not_fit(ext) -> None:
    inputs = block_inputs("float32", 1, 4, 2, 16, pos=3, bias=False)
    args = lambda **over: {**inputs, **over}  # noqa: E731
    call = lambda a: ext.decode_block(a["x"], a["attn_norm"], a["ffn_norm"], a["eps"], *a["weights"],  # noqa: E731
                                      a["k_cache"], a["v_cache"], a["pos"], a["cos"], a["sin"], a["n_heads"], 0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        call(args(pos=inputs["k_cache"].shape[2]))
    with pytest.raises(RuntimeError, match="attention weights do not fit"):
        call(args(n_heads=2))
    with pytest.raises(RuntimeError, match="wq: int8 needs a float scale"):
        call(args(weights=[[torch.zeros(64, 96, dtype=torch.int8)], *inputs["weights"][1:]]))


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("tokens", [1, 2])
def test_work_shared_over_threads_gives_the_same_bits_every_call(ext, two_threads, tokens: int) -> None:
    """Chunks claimed by whichever thread is free: every call must still compute each row exactly once."""
    weight = linear_tensors("float32", 3001, 256)  # 8 chunks of 376 rows, the last one short
    x = torch.randn(tokens, 256)
    first = cpu_linear(x, weight)
    assert rel_err(first, linear_reference(x, weight)) < TOL[torch.float32]
    for _ in range(60):
        assert torch.equal(cpu_linear(x, weight), first)


def test_calls_from_several_python_threads(ext, two_threads) -> None:
    weight = linear_tensors("int4", 1024, 256)
    xs = [torch.randn(1, 256) for _ in range(3)]
    expected = [cpu_linear(x, weight) for x in xs]

    def work(i: int) -> bool:
        return all(torch.equal(cpu_linear(xs[i], weight), expected[i]) for _ in range(40))

    with ThreadPoolExecutor(3) as pool:
        assert all(pool.map(work, range(3)))
