"""GPTQ and AWQ checkpoints packed here exactly as the published layouts describe, read into our int4.

The packers below write the format forward (AutoGPTQ's and AutoAWQ's pack order); the reader unpacks it.
Each checkpoint's reference is its own dequantized weights run through our float model.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures import random_state, tiny_args
from safetensors.torch import save_file
from tiny_model import GREEDY
from tiny_tokenizer import train_tiny_sentencepiece

import app
from engine.build import build_engine
from engine.config import DeviceSpec, RunConfig
from llama.checkpoint_hf import hf_name, hf_to_meta_rows, meta_to_hf_rows, rope_heads
from llama.loader import model_from_state
from offload.kernels.gptq_convert import AWQ_ORDER
from offload.kernels.linear import Int4Linear
from offload.kernels.permuted_linear import PermutedInt4Linear


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """(..., 8) values in [0, 15] -> int32 words, nibble k at bits 4k."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    return (nibbles.long() << shifts).sum(-1).to(torch.int32)  # wraps like a C cast past 2**31


def quantize_groups(w: torch.Tensor, g_idx: torch.Tensor, groups: int, sym: bool):
    """w [out, in] -> q [in, out], zeros and fp16 scales [groups, out], as GPTQ/AWQ define them."""
    out, n_in = w.shape
    scales, zeros = torch.empty(groups, out), torch.empty(groups, out)
    for g in range(groups):
        cols = w[:, g_idx == g]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            scales[g], zeros[g] = torch.maximum(-lo, hi) / 7.5, 8
        else:
            scales[g] = (hi - lo) / 15
            zeros[g] = torch.round(-lo / scales[g]).clamp(0, 15)
    scales = scales.half()
    q = torch.round(w.t() / scales.float()[g_idx] + zeros[g_idx]).clamp(0, 15).to(torch.uint8)
    reference = ((q.float() - zeros[g_idx]) * scales.float()[g_idx]).t()
    return q, zeros.to(torch.uint8), scales, reference


def pack_gptq(w: torch.Tensor, group: int, desc_act: bool, sym: bool, seed: int) -> tuple[dict, torch.Tensor]:
    out, n_in = w.shape
    group = n_in if group < 0 else min(group, n_in)  # a layer narrower than the group is one group
    order = torch.randperm(n_in, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(n_in)
    g_idx = torch.empty(n_in, dtype=torch.int32)
    g_idx[order] = (torch.arange(n_in) // group).to(torch.int32)  # groups formed in act order
    q, zeros, scales, reference = quantize_groups(w, g_idx.long(), n_in // group, sym)
    stored = (zeros.long() - 1) & 15  # the v1 format's offset
    tensors = {"qweight": _words(q.view(n_in // 8, 8, out).transpose(1, 2)),
               "qzeros": _words(stored.view(-1, out // 8, 8)), "scales": scales, "g_idx": g_idx}
    return tensors, reference


def pack_awq(w: torch.Tensor, group: int, seed: int) -> tuple[dict, torch.Tensor]:
    out, n_in = w.shape
    group = min(group, n_in)
    g_idx = torch.arange(n_in) // group
    q, zeros, scales, reference = quantize_groups(w, g_idx, n_in // group, sym=False)
    order = torch.tensor(AWQ_ORDER)

    def pack(x: torch.Tensor) -> torch.Tensor:  # (rows, out) -> (rows, out / 8), nibble k = output 8c + order[k]
        return _words(x.view(x.shape[0], out // 8, 8)[..., order])

    return {"qweight": pack(q), "qzeros": pack(zeros), "scales": scales}, reference


def write_checkpoint(root: Path, arch: str, method: str, group: int = 32, desc_act: bool = False,
                     sym: bool = False, **quant_extra) -> tuple[Path, dict]:
    args = tiny_args(arch, vocab_size=400, ffn_dim=256, max_seq_len=128)
    state = random_state(args, seed=7)
    tensors, reference = {}, dict(state)
    for i, (name, w) in enumerate(state.items()):
        heads = rope_heads(name, args)
        hf_w = meta_to_hf_rows(w, heads, args.head_dim) if heads is not None else w
        if name.startswith("layers.") and name.endswith(".weight") and w.dim() == 2:
            packed, ref = pack_awq(hf_w, group, i) if method == "awq" else pack_gptq(hf_w, group, desc_act, sym, i)
            reference[name] = hf_to_meta_rows(ref, heads, args.head_dim) if heads is not None else ref
            tensors.update({f"{hf_name(name).removesuffix('.weight')}.{k}": v for k, v in packed.items()})
        else:
            tensors[hf_name(name)] = hf_w.half()
            reference[name] = w.half().float()
    model_dir = root / f"{arch}-{method}-{group}-{desc_act}-{sym}"
    model_dir.mkdir()
    save_file(tensors, model_dir / "model.safetensors")
    quant = {"quant_method": method, "bits": 4, "group_size": group, **quant_extra}
    if method == "gptq":
        quant.update(desc_act=desc_act, sym=sym)
    else:
        quant.update(zero_point=True, version="gemm")
    (model_dir / "config.json").write_text(json.dumps({**args.to_hf_config(), "quantization_config": quant}))
    train_tiny_sentencepiece(model_dir)
    return model_dir, reference


def _cfg(model_dir: Path, **kw) -> RunConfig:
    cfg = RunConfig(model_dir=model_dir, device=DeviceSpec("cpu"), dtype="float32", ctx=64, sampling=GREEDY)
    return replace(cfg, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method, group, desc_act, sym", [
    ("gptq", 32, False, True), ("gptq", 64, True, False), ("gptq", 128, True, True), ("gptq", -1, False, False),
    ("awq", 32, False, False), ("awq", 128, False, False),
])
def test_packed_checkpoint_gives_its_dequantized_models_logits(tmp_path, arch, method, group, desc_act, sym):
    model_dir, reference = write_checkpoint(tmp_path, arch, method, group, desc_act, sym)
    model = build_engine(_cfg(model_dir)).model
    w2 = model.layers[1].feed_forward.w2
    assert isinstance(w2, PermutedInt4Linear if desc_act else Int4Linear)
    assert w2.weight_format().group_size == (256 if group < 0 else min(group, 256))
    args = model.args
    ref = model_from_state(args, reference)
    tokens = torch.randint(0, 400, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("extra, message", [
    ({"bits": 3}, "3-bit gptq is not supported"),
    ({"quant_method": "exl2"}, "quant_method 'exl2' is not supported"),
    ({"checkpoint_format": "marlin"}, "Marlin-packed gptq is not supported"),
])
def test_unsupported_variants_are_one_line_naming_them(tmp_path, capsys, extra, message):
    model_dir, _ = write_checkpoint(tmp_path, "llama", "gptq", **extra)
    assert app.main([str(model_dir), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "config.json" in err and "\n" not in err


def test_save_quantized_writes_what_was_read(tmp_path):
    model_dir, _ = write_checkpoint(tmp_path, "qwen2", "awq")
    out = tmp_path / "saved"
    assert app.main([str(model_dir), "--save_quantized", str(out), "--device", "cpu", "--dtype", "float32"]) == 0
    tokens = torch.randint(0, 400, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(build_engine(_cfg(out)).model(tokens), build_engine(_cfg(model_dir)).model(tokens))
    act_order, _ = write_checkpoint(tmp_path, "llama", "gptq", 32, desc_act=True)
    assert app.main([str(act_order), "--save_quantized", str(tmp_path / "no"), "--device", "cpu"]) == 2


@pytest.mark.parametrize("method, group, desc_act", [("gptq", 64, True), ("gptq", 32, False), ("awq", 32, False)])
def test_streamed_gptq_gives_the_resident_logits(tmp_path, method, group, desc_act):
    """The offload engine stores the converted int4 blocks as they are (4 bits in the host store), and the
    streamed model computes what the resident one does."""
    from engine.gptq_model import load_gptq_offloaded
    from llama.checkpoint_gptq import read_gptq_config
    from offload.policy import OffloadConfig

    model_dir, _ = write_checkpoint(tmp_path, "qwen2", method, group, desc_act)
    resident = build_engine(_cfg(model_dir)).model
    config = OffloadConfig(dtype=torch.float32, device=torch.device("cpu"), verbose=False, max_seq_len=64,
                           exclusions=frozenset())
    streamed, offloaded = load_gptq_offloaded(model_dir, resident.args, read_gptq_config(model_dir), config)
    assert offloaded.streaming is not None and offloaded.store.blocks == [0, 1]
    packed = resident.layers[0].feed_forward.w1.packed
    assert offloaded.store.view(0, "feed_forward.w1.packed").dtype == torch.uint8  # streamed in its 4 bits
    assert offloaded.store.view(0, "feed_forward.w1.packed").shape == packed.shape
    tokens = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(streamed(tokens), resident(tokens), atol=1e-5, rtol=1e-5)
    offloaded.close()


def test_streamed_gptq_whose_tensors_disagree_with_its_config_is_one_line(tmp_path):
    """A file packed with groups of 64 under a config that says 32: the streamed load names the tensor."""
    from engine.gptq_model import load_gptq_offloaded
    from llama.checkpoint import read_model_args
    from llama.checkpoint_gptq import read_gptq_config
    from llama.errors import UserError
    from offload.policy import OffloadConfig

    model_dir, _ = write_checkpoint(tmp_path, "llama", "gptq", 64)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"]["group_size"] = 32
    (model_dir / "config.json").write_text(json.dumps(config))
    offload = OffloadConfig(dtype=torch.float32, device=torch.device("cpu"), verbose=False, max_seq_len=64,
                            exclusions=frozenset())
    args = read_model_args(model_dir)  # (a resident load refuses the file the same way)
    with pytest.raises(UserError, match=r"scales has shape .* not the .* its quantization_config implies") as e:
        load_gptq_offloaded(model_dir, args, read_gptq_config(model_dir), offload)
    assert str(model_dir) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.cuda
def test_streamed_gptq_through_the_app_matches_resident(tmp_path):
    from cli_runner import run_app

    """With tinygemm on both sides (LLAMA_OFFLOAD_INT4_GEMV=0) the one-token steps take the same int4 kernel, and
    the replies are the same. By default a resident block runs our kernel with its norms folded in and a
    streamed one runs it op by op: both x rounded to int8, from values that differ by rounding, which on this
    random model's near-ties can part the greedy paths; those runs must work and reply."""
    model_dir, _ = write_checkpoint(tmp_path, "llama", "gptq", 64, desc_act=True)
    common = (str(model_dir), "--prompt", "The quick brown fox", "--temperature", "0", "--max_new_tokens", "16")
    tinygemm = {"LLAMA_OFFLOAD_INT4_GEMV": "0"}
    resident = run_app(*common, env=tinygemm)
    streamed = run_app(*common, "--use_offload", "--offload_exclusion", "[]", env=tinygemm)
    assert resident.returncode == 0 and streamed.returncode == 0, resident.stderr + streamed.stderr
    assert "GB of blocks in host RAM" in streamed.stderr
    assert streamed.stdout == resident.stdout and resident.stdout.strip()
    for run in (run_app(*common), run_app(*common, "--use_offload", "--offload_exclusion", "[]")):
        assert run.returncode == 0 and run.stdout.strip(), run.stderr
