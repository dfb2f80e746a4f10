"""Meta checkpoints: params.json + consolidated.NN.pth model-parallel shards, read lazily (mmap).

Shards merge by Meta's model-parallel layout: column-parallel layers (wq, wk, wv, w1, w3, output)
are split on their output rows (dim 0), row-parallel ones (wo, w2) on their input columns (dim 1),
the embedding on dim 1 in Llama 1/2 and on the vocabulary (dim 0) in Llama 3, found from the
shard shapes. Norms are replicated in every shard. `rope.freqs` (Llama 1) is dropped.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from llama.checkpoint_files import Weight, read_json, release_pages, short_reason
from llama.config import ModelArgs
from llama.errors import UserError

PARAMS = "params.json"
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
_COLUMN_PARALLEL = {"attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output"}
_ROW_PARALLEL = {"attention.wo", "feed_forward.w2"}
_REPLICATED = {"attention_norm", "ffn_norm", "norm"}
_LAYER = re.compile(r"layers\.\d+\.(.+)")


def meta_shard_files(model_dir: Path) -> list[Path]:
    """consolidated.00.pth, consolidated.01.pth, ... in shard order (empty when there are none)."""
    found = {int(m.group(1)): p for p in model_dir.iterdir() if (m := _SHARD.fullmatch(p.name))}
    if sorted(found) != list(range(len(found))):
        names = ", ".join(found[i].name for i in sorted(found))
        raise UserError(f"{model_dir}: model-parallel shards must be numbered 00 to {len(found) - 1:02d}, found {names}")
    return [found[i] for i in range(len(found))]


def read_meta_args(model_dir: Path, vocab_size: int | None = None) -> ModelArgs:
    """ModelArgs from params.json; vocab_size -1 there is taken from vocab_size, else from the embedding."""
    path = model_dir / PARAMS
    args = ModelArgs.from_meta_params(read_json(path), source=str(path))
    files = meta_shard_files(model_dir)
    shards = _load_shards(files)
    if args.vocab_size <= 0:
        args = args.with_vocab(vocab_size or _vocab_from_embedding(shards, files, args.dim))
    if "output.weight" not in shards[0]:
        args = replace(args, tie_embeddings=True)  # Meta's own exports always hold an output head
    return args


def model_parallel_dim(name: str, ndim: int, embedding_dim: int) -> int | None:
    """The dim Meta's shards split a canonical tensor on; None where every shard holds all of it.

    embedding_dim: the split of tok_embeddings (1 in Llama 1/2, 0 in Llama 3). KeyError for names
    outside the model.
    """
    module = name.rpartition(".")[0]
    m = _LAYER.fullmatch(module)
    module = m.group(1) if m else module
    if module == "tok_embeddings":
        return embedding_dim
    if module in _COLUMN_PARALLEL:
        return 0
    if module in _ROW_PARALLEL:
        return 1 if ndim == 2 else None
    if module in _REPLICATED:
        return None
    raise KeyError(name)


def iter_meta_weights(model_dir: Path, args: ModelArgs) -> Iterator[Weight]:
    """Every tensor, shards merged, one merged tensor alive at a time (beside the maps)."""
    files = meta_shard_files(model_dir)
    shards = _load_shards(files)
    for i, shard in enumerate(shards[1:], start=1):
        if extra := next((n for n in shard if n not in shards[0]), None):
            raise UserError(f"{files[i]}: tensor {extra!r} is not in {files[0].name}")
    for name, first in shards[0].items():
        if name.endswith("rope.freqs"):
            continue
        holders = [i for i, shard in enumerate(shards) if name in shard]
        if len(holders) == 1:
            yield Weight(name, first, files[0], mapped=True)  # single shard, or an extra kept in shard 0
            continue
        if len(holders) != len(shards):
            missing = next(i for i in range(len(shards)) if i not in holders)
            raise UserError(f"{files[missing]}: tensor {name!r} is missing (other shards hold it)")
        parts = [shard[name] for shard in shards]
        embedding_dim = _embedding_dim(parts, files, args.dim) if name == "tok_embeddings.weight" else 0
        try:
            dim = model_parallel_dim(name, first.dim(), embedding_dim)
        except KeyError:
            raise UserError(f"{files[0]}: unexpected tensor {name!r} in every shard (cannot merge it)") from None
        if dim is None:
            yield Weight(name, first, files[0], mapped=True)
            continue
        merged = _concat(name, parts, dim, files)
        for part in parts:
            release_pages(part)
        yield Weight(name, merged, model_dir / "consolidated.*.pth", mapped=False)
        del merged, parts


def _load_shards(files: list[Path]) -> list[dict[str, torch.Tensor]]:
    shards = []
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, ... for damaged files
            raise UserError(f"{f}: cannot read PyTorch checkpoint, damaged or truncated? ({short_reason(e)})") from None
        if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
            raise UserError(f"{f}: expected a dict of tensors")
        shards.append(sd)
    return shards


def _embedding_dim(parts: list[torch.Tensor], files: list[Path], dim: int) -> int:
    """Which dim the tok_embeddings shards split: 1 when their widths add up to dim, else 0."""
    if all(p.dim() == 2 and p.shape[1] == dim for p in parts):
        return 0
    if all(p.dim() == 2 for p in parts) and sum(p.shape[1] for p in parts) == dim:
        return 1
    shapes = ", ".join(str(tuple(p.shape)) for p in parts)
    raise UserError(f"{files[0].parent}: tok_embeddings shards of shapes {shapes} do not make (vocab, {dim})")


def _vocab_from_embedding(shards: list[dict[str, torch.Tensor]], files: list[Path], dim: int) -> int:
    parts = []
    for f, shard in zip(files, shards):
        if "tok_embeddings.weight" not in shard:
            raise UserError(f"{f}: missing tensor 'tok_embeddings.weight'")
        parts.append(shard["tok_embeddings.weight"])
    if _embedding_dim(parts, files, dim) == 0:
        return sum(p.shape[0] for p in parts)
    return parts[0].shape[0]


def _concat(name: str, parts: list[torch.Tensor], dim: int, files: list[Path]) -> torch.Tensor:
    def other_dims(shape: torch.Size) -> list[int]:
        return [size for i, size in enumerate(shape) if i != dim]

    for f, p in zip(files, parts):
        if p.dim() <= dim or other_dims(p.shape) != other_dims(parts[0].shape):
            raise UserError(
                f"{f}: tensor {name!r} has shard shape {tuple(p.shape)}, unlike {tuple(parts[0].shape)} in {files[0].name}"
            )
    return torch.cat(parts, dim=dim)
