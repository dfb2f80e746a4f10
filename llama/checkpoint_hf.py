"""Hugging Face checkpoints: config.json + one or many *.safetensors, read lazily.

HF names map to the canonical (Meta) ones module by module (the last name component, `weight`,
`bias` or anything else, is kept). HF stores the rows of q and k (and their biases) with each
head's RoPE pairs split in halves; Meta interleaves them. The reader turns them back.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llama.checkpoint_files import Weight, read_json, release_pages, short_reason
from llama.config import ModelArgs
from llama.errors import UserError

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"

_TOP_LEVEL = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_IN_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_LEVEL_FROM_HF = {hf: ours for ours, hf in _TOP_LEVEL.items()}
_IN_LAYER_FROM_HF = {hf: ours for ours, hf in _IN_LAYER.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def read_hf_args(model_dir: Path) -> ModelArgs:
    path = model_dir / CONFIG
    return ModelArgs.from_hf_config(read_json(path), source=str(path))


def hf_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files: those the index lists, else model*.safetensors, else every *.safetensors.

    (Mistral's repositories also hold a consolidated.safetensors with Meta names beside the HF files.)
    """
    index = model_dir / INDEX
    if not index.exists():
        return sorted(model_dir.glob("model*.safetensors")) or sorted(model_dir.glob("*.safetensors"))
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: no 'weight_map' object")
    if not all(isinstance(name, str) for name in weight_map.values()):
        raise UserError(f"{index}: 'weight_map' must map tensor names to file names")
    files = [inside(model_dir, name, index) for name in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise UserError(f"{index}: lists {f.name}, which does not exist")
    return files


def inside(model_dir: Path, name: str, source: Path) -> Path:
    """model_dir / name, or a UserError naming source if the name leads outside model_dir (../x, /abs).

    The name is resolved as written, not through symbolic links: a Hugging Face cache's snapshot
    directory links every file to a blob outside it, and that is the user's own layout.
    """
    path = model_dir / name
    if not Path(os.path.normpath(path)).is_relative_to(os.path.normpath(model_dir)):
        raise UserError(f"{source}: refers to {name!r}, which lies outside {model_dir}")
    return path


def canonical_name(hf_name: str) -> str:
    """HF tensor name -> canonical name; names outside the model's modules come back unchanged."""
    module, _, leaf = hf_name.rpartition(".")
    if module in _TOP_LEVEL_FROM_HF:
        return f"{_TOP_LEVEL_FROM_HF[module]}.{leaf}"
    m = _HF_LAYER.fullmatch(module)
    if m and m.group(2) in _IN_LAYER_FROM_HF:
        return f"layers.{m.group(1)}.{_IN_LAYER_FROM_HF[m.group(2)]}.{leaf}"
    return hf_name


def hf_name(name: str) -> str:
    """Canonical tensor name -> HF name (the inverse of canonical_name)."""
    module, _, leaf = name.rpartition(".")
    if module in _TOP_LEVEL:
        return f"{_TOP_LEVEL[module]}.{leaf}"
    m = _OUR_LAYER.fullmatch(module)
    if m and m.group(2) in _IN_LAYER:
        return f"model.layers.{m.group(1)}.{_IN_LAYER[m.group(2)]}.{leaf}"
    return name


def rope_heads(name: str, args: ModelArgs) -> int | None:
    """Heads whose rows the q/k permutation applies to (wq/wk weight and bias), else None."""
    module, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    if module.endswith("attention.wq"):
        return args.n_heads
    if module.endswith("attention.wk"):
        return args.n_kv_heads
    return None


def meta_to_hf_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Interleaved RoPE pairs (Meta) -> halves (HF), over the rows of a q/k weight or bias."""
    rest = w.shape[1:]
    # (n_heads, head_dim // 2, 2, *rest) -> (n_heads, 2, head_dim // 2, *rest)
    return w.reshape(n_heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Halves (HF) -> interleaved RoPE pairs (Meta): the inverse of meta_to_hf_rows."""
    rest = w.shape[1:]
    # (n_heads, 2, head_dim // 2, *rest) -> (n_heads, head_dim // 2, 2, *rest)
    return w.reshape(n_heads, 2, head_dim // 2, *rest).transpose(1, 2).reshape(w.shape)


def iter_hf_weights(model_dir: Path, args: ModelArgs) -> Iterator[Weight]:
    """Every tensor of the safetensors files, renamed, q/k rows un-permuted; one at a time."""
    meta_names = args.weight_shapes().keys()
    for path in hf_weight_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    name = canonical_name(key)
                    if name == key and key in meta_names:
                        raise UserError(f"{path}: tensor {key!r} has a Meta name, not a Hugging Face one")
                    if name.endswith("rotary_emb.inv_freq") or (args.tie_embeddings and name == "output.weight"):
                        continue  # a buffer older exports saved; a duplicate of a tied head
                    yield _from_hf_layout(name, f.get_tensor(key), path, args)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: not a valid safetensors file ({short_reason(e)})") from None


def _from_hf_layout(name: str, t: torch.Tensor, path: Path, args: ModelArgs) -> Weight:
    heads = rope_heads(name, args)
    if heads is None or t.shape[0] != heads * args.head_dim:
        return Weight(name, t, path, mapped=True)  # a wrong shape is reported by the caller's check
    meta = hf_to_meta_rows(t, heads, args.head_dim)
    release_pages(t)
    return Weight(name, meta, path, mapped=False)
