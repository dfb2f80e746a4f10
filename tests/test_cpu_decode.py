"""The CpuDecodeBlock swap (engine/cpu_decode.py): greedy tokens equal to the unfused model's on tiny models
of every family and format, names unchanged, unsupported blocks left alone, and wired into CPU engines and
app.py (the same text as a run whose kernels cannot build, which leaves every block unfused)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from cli_runner import CPU_GREEDY, ROOT
from conftest import greedy
from fixtures import random_state, tiny_args
from tiny_model import build_tiny_engine, make_tiny_model_dir

from engine.cpu_decode import CpuDecodeBlock, CpuDecodeHead, CpuDecodeModel, use_cpu_decode_blocks
from llama.kv_cache import KVCache
from llama.model import Transformer
from offload.kernels import Int8Linear, cpu_extension, quantize_int8
from offload.kernels.cpu_ext import build_directory
from offload.kernels.few_token_linear import FEW_TOKENS, FewTokenLinear
from offload.kernels.linear import quantize_linears
from offload.quant_mode import QuantMode

PROMPT = [1, 5, 9, 33, 7]


@pytest.fixture(scope="module", autouse=True)
def built_extension() -> None:
    assert cpu_extension() is not None, "the CPU kernels did not build on this machine"


def tiny_model(arch: str, fmt: str, **shape) -> Transformer:
    args = tiny_args(arch, ffn_dim=256, **shape)
    model = Transformer(args)
    model.load_state_dict(random_state(args), strict=False)  # rope tables are not in the state
    model = model.to(torch.bfloat16 if fmt == "bfloat16" else torch.float32).eval()
    if fmt in ("int8", "int4"):
        quantize_linears(model.layers, QuantMode(fmt), progress=False)
    return model


def fused_copy(model: Transformer) -> Transformer:
    fused = copy.deepcopy(model)
    assert use_cpu_decode_blocks(fused) == len(fused.layers)
    assert all(isinstance(b, CpuDecodeBlock) for b in fused.layers)
    return fused


@pytest.fixture
def exact_int4():
    """int4 linears reading x as it is: the avx512_vnni path (x rounded to int8) switched off."""
    ext = cpu_extension()
    before = ext.set_cpu_paths([p for p in ext.cpu_paths() if p != "avx512_vnni"])
    yield
    ext.set_cpu_paths(before)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("fmt", ["float32", "int8", "int4"])
def test_greedy_tokens_equal_the_unfused_model(arch: str, fmt: str, exact_int4) -> None:
    model = tiny_model(arch, fmt)
    tokens, logits = greedy(model, PROMPT, 24)
    fused_tokens, fused_logits = greedy(fused_copy(model), PROMPT, 24)
    assert fused_tokens == tokens
    assert ((fused_logits - logits).norm() / logits.norm()).item() < 1e-4


def test_int4_steps_on_the_vnni_path_stay_close_to_exact(exact_int4) -> None:
    """With avx512_vnni, every int4 linear of up to 8 tokens (the steps, and this 5-token prompt's pass) reads
    x rounded to int8 per 32 values: on the same tokens the logits stay within 2e-2 of the exact path's (the
    fused and the unfused model alike)."""
    ext = cpu_extension()
    ext.set_cpu_paths(["avx512_vnni", *ext.cpu_paths()])
    if "avx512_vnni" not in ext.cpu_paths():
        pytest.skip("this CPU has no avx512_vnni")
    model = tiny_model("llama", "int4")
    fused = fused_copy(model)
    ext.set_cpu_paths([p for p in ext.cpu_paths() if p != "avx512_vnni"])
    tokens, _ = greedy(model, PROMPT, 24)
    exact = teacher_forced_logits(fused, PROMPT + tokens)
    ext.set_cpu_paths(["avx512_vnni", *ext.cpu_paths()])
    err = lambda m: ((teacher_forced_logits(m, PROMPT + tokens) - exact).norm() / exact.norm()).item()  # noqa: E731
    assert 1e-5 < err(fused) < 2e-2 and err(model) < 2e-2


@torch.inference_mode()
def teacher_forced_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """Logits (len(tokens) - len(PROMPT), vocab) float32 of each next token, fed `tokens` one at a time."""
    dtype = model.output.weight.dtype
    cache = KVCache(model.args, len(tokens), dtype)
    out = [model(torch.tensor([PROMPT]), 0, cache, last_only=True)[0, -1]]
    for pos in range(len(PROMPT), len(tokens) - 1):
        out.append(model(torch.tensor([[tokens[pos]]]), pos, cache, last_only=True)[0, -1])
    return torch.stack(out).float()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bfloat16_is_at_least_as_close_to_float32_as_unfused(arch: str) -> None:
    """In bfloat16 the unfused block rounds after every operator and the fused one only at the residuals, so
    greedy tokens may part where two logits are within bfloat16's rounding; on the same tokens, the fused
    logits are as close to the float32 model's as the unfused ones, or closer."""
    model = tiny_model(arch, "float32")
    tokens, _ = greedy(model, PROMPT, 24)
    exact = teacher_forced_logits(model, PROMPT + tokens)
    unfused = tiny_model(arch, "bfloat16")
    err = lambda m: ((teacher_forced_logits(m, PROMPT + tokens) - exact).norm() / exact.norm()).item()  # noqa: E731
    unfused_err, fused_err = err(unfused), err(fused_copy(unfused))
    assert fused_err < 2e-2 and fused_err <= 1.05 * unfused_err


def test_sliding_window_past_its_end() -> None:
    model = tiny_model("mistral", "float32", sliding_window=6)
    tokens, logits = greedy(model, PROMPT, 20)
    fused_tokens, fused_logits = greedy(fused_copy(model), PROMPT, 20)
    assert fused_tokens == tokens
    torch.testing.assert_close(fused_logits, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int4"])
def test_one_call_for_all_blocks_equals_a_call_per_block(fmt: str, exact_int4) -> None:
    """A model whose blocks are all fused becomes a CpuDecodeModel: its one-token steps (the DecodeStack) give
    the logits of the same blocks called one by one, bit for bit in float32 (the same C++ step); in bfloat16
    the stack's RoPE angles skip one rounding to bfloat16, so there within bfloat16's rounding."""
    fused = fused_copy(tiny_model("llama", fmt))
    assert type(fused) is CpuDecodeModel
    tokens, _ = greedy(fused, PROMPT, 12, dtype=fused.output.weight.dtype)
    stacked = teacher_forced_logits(fused, PROMPT + tokens)
    fused.__class__ = Transformer  # the same blocks, each its own call
    per_block = teacher_forced_logits(fused, PROMPT + tokens)
    if fmt == "bfloat16":
        assert ((stacked - per_block).norm() / per_block.norm()).item() < 2e-2
    else:
        assert torch.equal(stacked, per_block)


def test_replaced_layers_are_not_read_from_an_old_stack() -> None:
    """Replacing `layers` (as the CPU bench swaps unfused blocks back in) must not keep running the stack
    gathered from the fused ones: here the replacement blocks have other weights, and their logits win."""
    fused = fused_copy(tiny_model("llama", "float32"))
    other = tiny_model("llama", "float32")
    for p in other.layers.parameters():
        p.data.normal_(0, 0.05)
    greedy(fused, PROMPT, 2)  # the stack is built
    fused.layers = other.layers  # plain TransformerBlocks: the model's own path
    tokens, logits = greedy(fused, PROMPT, 6)
    plain = copy.deepcopy(fused)  # a copy gathers its own stack, never shares the original's
    plain.__class__ = Transformer
    plain_tokens, plain_logits = greedy(plain, PROMPT, 6)
    assert tokens == plain_tokens and torch.equal(logits, plain_logits)


def test_the_stack_refuses_caches_that_do_not_fit() -> None:
    fused = fused_copy(tiny_model("llama", "float32"))
    stack = fused._decode_stack()
    assert stack.blocks() == len(fused.layers)
    cache = KVCache(fused.args, 16, torch.float32)
    cos, sin = fused.rope_cos[3], fused.rope_sin[3]
    x = torch.randn(1, fused.args.dim)
    with pytest.raises(RuntimeError, match="caches for 2 blocks"):
        stack.step(x, cache.keys[:1], cache.values[:1], 3, cos, sin)
    with pytest.raises(RuntimeError, match="outside the cache"):
        stack.step(x, cache.keys, cache.values, 16, cos, sin)
    with pytest.raises(RuntimeError, match="features"):
        stack.step(torch.randn(1, 8), cache.keys, cache.values, 3, cos, sin)


def test_names_and_tensors_are_unchanged() -> None:
    model = tiny_model("qwen2", "int4")
    fused = fused_copy(model)
    assert isinstance(fused.output, CpuDecodeHead)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), model.state_dict().values()))


def test_a_tied_head_stays_tied() -> None:
    model = tiny_model("llama", "float32", tie_embeddings=True)
    fused = fused_copy(model)
    assert fused.output.weight is fused.tok_embeddings.weight
    assert greedy(fused, PROMPT, 8)[0] == greedy(model, PROMPT, 8)[0]


@pytest.mark.parametrize("tied", [True, False])
def test_an_int8_head_reads_its_int8_copy(tied: bool) -> None:
    """int8_head: every call of the head (a decode step and a long prefill alike) reads the int8 copy, one
    scale per row; the float weight, tied or not, and the state_dict stay as they were."""
    model = tiny_model("llama", "int4", tie_embeddings=tied)
    state = model.state_dict()
    fused = copy.deepcopy(model)
    use_cpu_decode_blocks(fused, int8_head=True)
    head = fused.output
    assert isinstance(head, CpuDecodeHead) and head.qweight.dtype == torch.int8
    assert (head.weight is fused.tok_embeddings.weight) == tied
    assert list(fused.state_dict()) == list(state)
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), state.values()))
    w8 = quantize_int8(model.output.weight.detach()).dequantize()
    with torch.inference_mode():
        for tokens in (1, 9):
            x = torch.randn(1, tokens, model.args.dim)
            y = head(x)
            assert y.shape == (1, tokens, model.args.vocab_size)
            torch.testing.assert_close(y, torch.nn.functional.linear(x, w8), rtol=1e-5, atol=1e-5)
            assert (y - model.output(x)).abs().max() > 1e-6  # not the float weight's logits


def test_moving_the_model_gathers_its_weights_anew() -> None:
    """.to() rebinds every tensor: the fused blocks must read the new ones (here bfloat16), not the old."""
    fused = fused_copy(tiny_model("llama", "float32")).to(torch.bfloat16)
    assert all(w.dtype == torch.bfloat16 for b in fused.layers for ws in b.weight_lists for w in ws)
    tokens, _ = greedy(fused, PROMPT, 4, dtype=torch.bfloat16)
    assert len(tokens) == 4


def test_blocks_the_kernel_cannot_take_stay_unfused() -> None:
    model = tiny_model("llama", "float32")
    w = model.layers[1].feed_forward.w2.weight.detach()
    grouped = quantize_int8(w)  # one scale per 16 inputs, as GGUF Q8_0 arrives: no kernel takes it
    grouped = type(grouped)(grouped.qweight, grouped.scale[:, None].expand(-1, w.shape[1] // 16).contiguous())
    model.layers[1].feed_forward.w2 = Int8Linear(grouped, None)
    assert use_cpu_decode_blocks(model) == 1
    assert isinstance(model.layers[0], CpuDecodeBlock) and not isinstance(model.layers[1], CpuDecodeBlock)


def test_the_cpu_engine_uses_fused_blocks(tmp_path) -> None:
    engine = build_tiny_engine(tmp_path, quant=QuantMode.INT8)
    assert all(isinstance(b, CpuDecodeBlock) for b in engine.model.layers)
    assert "qweight" in dict(engine.model.output.named_buffers())  # --quant: the head reads int8 too


def test_the_cpu_engine_keeps_a_float_head_without_quant(tmp_path) -> None:
    engine = build_tiny_engine(tmp_path)
    assert isinstance(engine.model.output, CpuDecodeHead) and not list(engine.model.output.named_buffers())


def test_app_prints_the_same_reply_as_the_unfused_path(tmp_path) -> None:
    """The same greedy reply through app.py with the kernels and with a compiler that does not exist (then
    the kernels cannot build, no block is swapped, and the int8 matmuls take their torch reference)."""
    model_dir = make_tiny_model_dir(tmp_path)

    def reply(**env: str) -> str:
        args = [str(model_dir), "--prompt", "the cat", "--max_new_tokens", "24", "--quant", "int8", *CPU_GREEDY]
        env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", **env}
        done = subprocess.run([sys.executable, str(ROOT / "app.py"), *args], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    fused = reply(TORCH_EXTENSIONS_DIR=str(build_directory().parent))  # this process's build
    unfused = reply(CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "no-ext"))
    assert fused.strip() and fused == unfused


def test_a_token_trees_float_linears_take_the_compiled_gemv() -> None:
    """Passes of up to FEW_TOKENS tokens (a token tree, a chain) read float32 weights through the compiled GEMV;
    larger ones and the blocks a bench keeps unfused stay torch's. Tree logits match the unfused model's."""
    model = tiny_model("llama", "float32")
    unfused = list(model.layers)
    assert use_cpu_decode_blocks(model) == len(unfused)
    assert all(type(m) is FewTokenLinear for b in model.layers for m in (b.attention.wq, b.feed_forward.w2))
    assert all(type(b.attention.wq) is nn.Linear for b in unfused)
    linear = model.layers[0].feed_forward.w2
    calls = []
    real = cpu_extension().linear
    with torch.inference_mode():
        for tokens in (2, FEW_TOKENS, FEW_TOKENS + 1):
            x = torch.randn(1, tokens, linear.in_features)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(cpu_extension(), "linear", lambda *a: (calls.append(tokens), real(*a))[1])
                y = linear(x)
            assert torch.allclose(y, F.linear(x, linear.weight), atol=1e-5)
    assert calls == [2, FEW_TOKENS]
    reference = Transformer(model.args)
    reference.load_state_dict(model.state_dict(), strict=False)
    reference.eval()
    tree = torch.tensor([PROMPT])
    with torch.inference_mode():
        got, want = model(tree, 0, None), reference(tree, 0, None)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
