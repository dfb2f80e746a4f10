"""Write a state dict with canonical names as a Hugging Face or a Meta checkpoint.

Tensors outside the model (a quantizer's qweight/scales, say) pass through: in HF files under the
HF name of their module (`layers.0.attention.wq.scales` -> `model.layers.0.self_attn.q_proj.scales`,
rows not permuted), in Meta checkpoints whole in shard 0. The readers give them back unchanged
with allow_extra. Extra config fields are merged into config.json / params.json.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from llama.checkpoint_hf import CONFIG, INDEX, hf_name, meta_to_hf_rows, rope_heads
from llama.checkpoint_meta import PARAMS, model_parallel_dim
from llama.config import Llama3RopeScaling, ModelArgs


def write_hf_checkpoint(
    state: Mapping[str, torch.Tensor],
    args: ModelArgs,
    out_dir: Path | str,
    max_shard_bytes: int | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> None:
    """config.json plus model.safetensors, or model-0000i-of-0000n.safetensors and the index when the
    weights exceed max_shard_bytes. Replaces a HF checkpoint already in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("model*.safetensors"), out_dir / INDEX]:
        old.unlink(missing_ok=True)
    names = [n for n in state if not (args.tie_embeddings and n == "output.weight")]
    shards = _pack(names, state, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {hf_name(n): _own_storage(_to_hf_layout(n, state[n], args)) for n in shard}
        save_file(tensors, out_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(shards) > 1:
        total = sum(state[n].numel() * state[n].element_size() for n in names)
        _write_json(out_dir / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    dtype = str(state[names[0]].dtype).removeprefix("torch.") if names else "float32"
    _write_json(out_dir / CONFIG, {**args.to_hf_config(), "dtype": dtype, **(extra_config or {})})


def write_meta_checkpoint(
    state: Mapping[str, torch.Tensor],
    args: ModelArgs,
    out_dir: Path | str,
    n_shards: int = 1,
    vocab_parallel_embedding: bool = False,
    extra_params: Mapping[str, Any] | None = None,
) -> None:
    """params.json plus consolidated.00.pth .. consolidated.{n_shards-1}.pth split as Meta's model parallelism does.

    vocab_parallel_embedding: split tok_embeddings on the vocabulary (Llama 3) instead of the width
    (Llama 1/2). A tied model is written without output.weight (the reader then ties it).
    ValueError for what params.json cannot express (biases, a custom head_dim or RoPE scaling)
    and for tensors that do not split evenly.
    """
    if args.qkv_bias:
        raise ValueError("Meta checkpoints have no q/k/v biases: write a HF checkpoint instead")
    if args.head_dim != args.dim // args.n_heads:
        raise ValueError(f"params.json cannot express head_dim {args.head_dim} != dim // n_heads")
    if args.rope_scaling not in (None, Llama3RopeScaling()):
        raise ValueError("params.json can only express Llama 3.1's default RoPE scaling (use_scaled_rope)")
    out_dir = Path(out_dir)
    split: dict[str, int | None] = {}  # model tensors: the dim split on, None when replicated
    extras = []  # tensors outside the model: whole, in shard 0
    for name, t in state.items():
        if args.tie_embeddings and name == "output.weight":
            continue
        try:
            split[name] = dim = model_parallel_dim(name, t.dim(), 0 if vocab_parallel_embedding else 1)
        except KeyError:
            extras.append(name)
            continue
        if dim is not None and t.shape[dim] % n_shards:
            raise ValueError(f"{name}: size {t.shape[dim]} of dim {dim} does not split into {n_shards} shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("consolidated.*.pth"):
        old.unlink()
    for r in range(n_shards):
        shard = {
            name: _own_storage(state[name]) if dim is None else state[name].chunk(n_shards, dim)[r].clone()
            for name, dim in split.items()
        }
        if r == 0:
            shard.update({name: _own_storage(state[name]) for name in extras})
        torch.save(shard, out_dir / f"consolidated.{r:02d}.pth")
        del shard
    _write_json(out_dir / PARAMS, {**_meta_params(args), **(extra_params or {})})


def _pack(names: list[str], state: Mapping[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Names grouped into files of at most max_bytes each (a bigger tensor gets a file of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = state[n].numel() * state[n].element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    return shards


def _to_hf_layout(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    heads = rope_heads(name, args)
    return t if heads is None else meta_to_hf_rows(t, heads, args.head_dim)


def _meta_params(args: ModelArgs) -> dict[str, Any]:
    params: dict[str, Any] = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "use_scaled_rope": args.rope_scaling is not None,
        "max_seq_len": args.max_seq_len,
    }
    return {**params, **_ffn_params(args.dim, args.ffn_dim)}


def _ffn_params(dim: int, ffn_dim: int) -> dict[str, Any]:
    """multiple_of / ffn_dim_multiplier for which Meta's FFN width formula gives ffn_dim."""
    base = int(2 * 4 * dim / 3)
    candidates = [
        {"multiple_of": 256},
        {"multiple_of": ffn_dim},
        {"multiple_of": 1, "ffn_dim_multiplier": (ffn_dim + 0.5) / base},
    ]
    for c in candidates:
        probe = {"dim": dim, "n_layers": 1, "n_heads": 1, **c}
        if ModelArgs.from_meta_params(probe).ffn_dim == ffn_dim:
            return c
    raise ValueError(f"params.json cannot express ffn_dim {ffn_dim} for dim {dim}")


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is the whole of its storage, else a compact copy (files store whole storages)."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
