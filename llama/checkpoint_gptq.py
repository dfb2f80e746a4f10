"""GPTQ and AWQ Hugging Face checkpoints: `quantization_config` in config.json, and their tensors by layer.

Read: quant_method gptq (checkpoint_format gptq or gptq_v2, desc_act true or false, sym or not) or awq
(version gemm, zero_point true), 4 bits, group_size 32, 64, 128 or -1 (one group per row). Everything
else (3 or 8 bits, EXL2, EXL3, Marlin-packed, AWQ's gemv layout...) is refused with one line naming it.
The block linears' packed tensors are gathered per layer (qweight, qzeros, scales, g_idx, bias) for the
converter; every other tensor is an ordinary float one.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llama.checkpoint_files import read_json, short_reason
from llama.checkpoint_hf import CONFIG, canonical_name, hf_weight_files
from llama.errors import UserError, first_named

PACKED = ("qweight", "qzeros", "scales", "g_idx")
GROUP_SIZES = (32, 64, 128, -1)


@dataclass(frozen=True)
class GPTQConfig:
    method: str  # gptq | awq
    group_size: int  # -1: one group per row
    zero_offset: int  # GPTQ v1 stores zero - 1
    desc_act: bool


def read_gptq_config(model_dir: Path) -> GPTQConfig | None:
    """The checkpoint's GPTQ/AWQ quantization, None when config.json has no quantization_config."""
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        return None
    q = read_json(path).get("quantization_config")
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    fmt = str(q.get("checkpoint_format") or q.get("version") or "").lower()
    if method not in ("gptq", "awq"):
        raise UserError(f"{path}: quantization_config quant_method {method!r} is not supported (gptq and awq are)")
    if q.get("bits") != 4:
        raise UserError(f"{path}: {q.get('bits')}-bit {method} is not supported (4-bit only)")
    if q.get("is_marlin_format") or "marlin" in fmt:
        raise UserError(f"{path}: Marlin-packed {method} is not supported (the plain {method} layout is)")
    if fmt not in {"gptq": ("", "gptq", "gptq_v2"), "awq": ("", "gemm")}[method]:
        raise UserError(f"{path}: {method} format {fmt!r} is not supported")
    if method == "awq" and not q.get("zero_point", True):
        raise UserError(f"{path}: AWQ without zero points is not supported")
    group = q.get("group_size")
    if group not in GROUP_SIZES:
        raise UserError(f"{path}: quantization_config group_size {group!r} is not one of {GROUP_SIZES}")
    return GPTQConfig(method, group, 0 if fmt == "gptq_v2" else int(method == "gptq"), bool(q.get("desc_act")))


@dataclass
class PackedLayer:
    """One quantized linear's tensors from the file (canonical module name; HF's q/k row order)."""

    module: str
    tensors: dict[str, torch.Tensor]
    file: Path


def iter_gptq_tensors(model_dir: Path, linears: set[str]) -> Iterator[PackedLayer | tuple[str, torch.Tensor, Path]]:
    """(canonical name, tensor, file) for every tensor not in `linears` (canonical module names), and a
    PackedLayer for each of those modules after the file that completes it (so a streamed load holds one
    shard's layers at a time, not the model's)."""
    layers: dict[str, PackedLayer] = {}
    done: set[str] = set()
    for path in hf_weight_files(Path(model_dir)):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    name = canonical_name(key)
                    module, _, leaf = name.rpartition(".")
                    if module in linears and leaf in (*PACKED, "bias"):
                        layers.setdefault(module, PackedLayer(module, {}, path)).tensors[leaf] = f.get_tensor(key)
                    elif not name.endswith("rotary_emb.inv_freq"):
                        yield name, f.get_tensor(key), path
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: not a valid safetensors file ({short_reason(e)})") from None
        for module in [m for m, layer in layers.items() if {"qweight", "qzeros", "scales"} <= set(layer.tensors)]:
            done.add(module)
            yield layers.pop(module)
    missing = sorted(linears - done)
    if missing:
        raise UserError(f"{model_dir}: no packed tensors for {first_named(missing)}")
