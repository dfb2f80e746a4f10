"""Each token's row of a several-token CPU linear is bit for bit the row a one-token call gives: a token
tree verified in one pass then picks exactly the tokens plain one-token decoding would. Every weight
format, each instruction-set path on and off, T = 2..8, and widths that leave tails after every vector
step (576 = 4.5 x 128, 200 and 4112: scalar tails, 4160 = 4 x 1024 + 64)."""
from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from offload.kernels import cpu_extension, int4_matmul, int8_matmul, quantize_int4, quantize_int8
from offload.kernels.decode_block import cpu_linear

WIDTHS = (576, 200, 4112, 4160)
OUT = 37  # not a multiple of the 8-row tiles, nor of the 4- and 2-row blocks


@pytest.fixture(scope="module")
def ext():
    ext = cpu_extension()
    if ext is None:
        pytest.skip("the CPU kernels did not build on this machine")
    return ext


@pytest.fixture(params=["all", "portable"])
def cpu_paths(request, ext):
    """Every instruction-set path this CPU has on, then none; the CPU's own set restored after."""
    before = ext.set_cpu_paths(["avx512_bf16", "avx512_vnni", "bf16_row_prefetch"] if request.param == "all" else [])
    yield request.param
    ext.set_cpu_paths(before)


def assert_rows_invariant(f: Callable[[torch.Tensor], torch.Tensor], in_f: int) -> None:
    for tokens in range(2, 9):
        x = torch.randn(tokens, in_f)
        together = f(x)
        for t in range(tokens):
            alone = f(x[t : t + 1])
            assert torch.equal(alone, together[t : t + 1]), f"{tokens} tokens: row {t} differs from its own call"


def weight(in_f: int) -> torch.Tensor:
    return torch.randn(OUT, in_f) / math.sqrt(in_f)


@pytest.mark.parametrize("in_f", WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_rows(ext, cpu_paths: str, in_f: int, dtype: torch.dtype) -> None:
    w = weight(in_f).to(dtype)
    assert_rows_invariant(lambda x: cpu_linear(x, [w]), in_f)
    assert_rows_invariant(lambda x: cpu_linear(x.to(dtype), [w]), in_f)  # activations in the weight's dtype


@pytest.mark.parametrize("in_f", WIDTHS)
def test_int8_rows(ext, cpu_paths: str, in_f: int) -> None:
    w = quantize_int8(weight(in_f))
    assert_rows_invariant(lambda x: cpu_linear(x, [w.qweight, w.scale]), in_f)
    assert_rows_invariant(lambda x: int8_matmul(x, w), in_f)


# (in_features, group size): the avx512_vnni path's widths (4160, 576: a last chunk of 64) and the float
# path's (group 8 and 16: all tail; 40: a tail after a chunk)
INT4_SHAPES = [(576, 32), (576, 64), (4160, 32), (4160, 64), (4224, 128), (200, 8), (200, 40), (4112, 16)]


@pytest.mark.parametrize("in_f, group", INT4_SHAPES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_rows(ext, cpu_paths: str, in_f: int, group: int, scale_dtype: torch.dtype) -> None:
    w = quantize_int4(weight(in_f), group, scale_dtype)
    assert w.group_size == group
    assert_rows_invariant(lambda x: cpu_linear(x, [w.packed, w.scales, w.zeros]), in_f)
    assert_rows_invariant(lambda x: int4_matmul(x, w), in_f)


def test_int4_vnni_path_is_covered(ext) -> None:
    """INT4_SHAPES reach both int4 paths where this CPU has avx512_vnni, for every token count tested; longer
    passes (prefill) keep x as it is."""
    if "avx512_vnni" not in ext.cpu_paths():
        pytest.skip("this CPU has no avx512_vnni")
    for tokens in range(1, 9):
        takes = [ext.int4_rounds_activations(in_f, group, tokens) for in_f, group in INT4_SHAPES]
        assert takes == [True] * 5 + [False] * 3
    assert not ext.int4_rounds_activations(576, 64, 9)


def test_bf16_row_prefetch_is_on_by_default_on_intel_only(ext) -> None:
    """The prefetches of the bfloat16 dot-product rows cost a fifth of bfloat16 decode on an AMD EPYC and are
    kept where they were measured to help: on by default with avx512_bf16 on Intel's CPUs, off elsewhere,
    and either way the same results."""
    with open("/proc/cpuinfo") as f:
        vendors = {line.split(":")[1].strip() for line in f if line.startswith("vendor_id")}
    defaults = ext.set_cpu_paths([])  # what the extension chose at load; every path off for the comparison below
    try:
        has_bf16 = "avx512_bf16" in defaults
        assert ("bf16_row_prefetch" in defaults) == (has_bf16 and vendors == {"GenuineIntel"})
        w, x = weight(576).bfloat16(), torch.randn(3, 576)
        results = []
        for paths in (["avx512_bf16"], ["avx512_bf16", "bf16_row_prefetch"]):
            ext.set_cpu_paths(paths)
            results.append(cpu_linear(x, [w]))
        assert torch.equal(results[0], results[1])
    finally:
        ext.set_cpu_paths(defaults)
