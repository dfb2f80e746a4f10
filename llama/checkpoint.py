"""The checkpoint front door: what a model directory holds, its ModelArgs, its weights by canonical name.

Two formats are read, both lazily (memory maps), one tensor at a time in the checkpoint's dtype:
Hugging Face (config.json + *.safetensors, see checkpoint_hf) and Meta (params.json +
consolidated.NN.pth, see checkpoint_meta). Every tensor is checked against ModelArgs as it is read,
so a consumer never sees a wrong shape, an unknown name, an integer tensor or a NaN, and a missing
one is reported at the end.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from llama.checkpoint_files import Weight
from llama.checkpoint_hf import CONFIG, INDEX, hf_name, iter_hf_weights, read_hf_args
from llama.checkpoint_meta import PARAMS, iter_meta_weights, meta_shard_files, read_meta_args
from llama.config import ModelArgs
from llama.errors import UserError, first_named

MODEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["Weight", "check_weights", "checkpoint_format", "iter_checkpoint", "iter_weights", "read_model_args"]


def checkpoint_format(model_dir: Path) -> Literal["hf", "meta"]:
    """The format in model_dir, "hf" or "meta" (HF wins where both are present), or a UserError naming it."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: {'not a directory' if model_dir.exists() else 'no such directory'}")
    if (model_dir / INDEX).exists() or any(model_dir.glob("*.safetensors")):
        if not (model_dir / CONFIG).is_file():
            raise UserError(f"{model_dir}: safetensors weights but no {CONFIG}")
        return "hf"
    if meta_shard_files(model_dir):
        if not (model_dir / PARAMS).is_file():
            raise UserError(f"{model_dir}: consolidated.NN.pth shards but no {PARAMS}")
        return "meta"
    hint = " (pytorch_model*.bin is not supported: convert it to safetensors)" if any(model_dir.glob("*.bin")) else ""
    raise UserError(
        f"{model_dir}: no weights found (expected *.safetensors with {CONFIG}, "
        f"or consolidated.NN.pth with {PARAMS}){hint}"
    )


def read_model_args(model_dir: Path, vocab_size: int | None = None) -> ModelArgs:
    """The model's shape from config.json or params.json.

    vocab_size: only for a params.json that says -1 (Llama 1/2): the tokenizer's size. Left None,
    the size of the checkpoint's embedding is used.
    """
    model_dir = Path(model_dir)
    if checkpoint_format(model_dir) == "hf":
        return read_hf_args(model_dir)
    return read_meta_args(model_dir, vocab_size)


def iter_checkpoint(model_dir: Path, args: ModelArgs, allow_extra: bool = False) -> Iterator[Weight]:
    """Every weight as a Weight (canonical name, tensor, file, whether it is a view of the file map).

    Raises UserError naming the file for a tensor of the wrong shape, an unexpected tensor (unless
    allow_extra: then it is passed through unchecked), a duplicate, and, once the files are read,
    a missing weight.
    """
    model_dir = Path(model_dir)
    reader = iter_hf_weights if checkpoint_format(model_dir) == "hf" else iter_meta_weights
    expected = args.weight_shapes()
    seen: dict[str, tuple[int, ...]] = {}
    converted: set[torch.dtype] = set()
    for w in reader(model_dir, args):
        if w.name in seen:
            raise UserError(f"{w.file}: tensor {_label(w.name, w.file)} appears a second time")
        _check_one(w.name, tuple(w.tensor.shape), expected, w.file, allow_extra)
        seen[w.name] = tuple(w.tensor.shape)
        yield _checked_values(w, converted) if w.name in expected else w
    _check_missing(seen, expected, model_dir)


def iter_weights(model_dir: Path, args: ModelArgs, allow_extra: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) pairs, checked as iter_checkpoint does; tensors in the checkpoint's dtype."""
    for w in iter_checkpoint(model_dir, args, allow_extra):
        yield w.name, w.tensor


def check_weights(
    seen: Mapping[str, Sequence[int]], args: ModelArgs, source: Path | str, allow_extra: bool = False
) -> None:
    """Check a whole set of weight shapes against args: wrong shape, unexpected, missing (UserError naming source)."""
    expected = args.weight_shapes()
    for name, shape in seen.items():
        _check_one(name, tuple(shape), expected, Path(source), allow_extra)
    _check_missing(seen, expected, Path(source))


def _check_one(
    name: str, shape: tuple[int, ...], expected: Mapping[str, tuple[int, ...]], file: Path, allow_extra: bool
) -> None:
    if name not in expected:
        if not allow_extra:
            raise UserError(f"{file}: unexpected tensor {_label(name, file)}")
    elif shape != expected[name]:
        raise UserError(f"{file}: tensor {_label(name, file)} has shape {shape}, the config asks for {expected[name]}")


def _check_missing(seen: Mapping[str, object], expected: Mapping[str, tuple[int, ...]], source: Path) -> None:
    missing = [name for name in expected if name not in seen]
    if missing:
        raise UserError(f"{source}: missing weight {first_named(missing, lambda name: _label(name, source))}")


def _checked_values(w: Weight, converted: set[torch.dtype]) -> Weight:
    """w with a model float dtype and finite values: integers and bools are refused, other float kinds
    (float64, float8) become float32 with one note per kind, NaN or Inf is refused naming the tensor."""
    t = w.tensor
    if not t.is_floating_point():
        raise UserError(f"{w.file}: tensor {_label(w.name, w.file)} is {_dtype_name(t.dtype)}; "
                        "model weights must be floating point")
    if t.dtype not in MODEL_FLOAT_DTYPES:
        if t.dtype not in converted:
            converted.add(t.dtype)
            # tqdm.write: a progress bar may be drawing on stderr; the note takes a line of its own.
            tqdm.write(f"note: {w.file}: converting {_dtype_name(t.dtype)} tensors to float32", file=sys.stderr)
        t = t.to(torch.float32)
        w.release()
        w = replace(w, tensor=t, mapped=False)
    # NaN anywhere makes both extremes NaN, and an infinity is one of them: one pass at memory speed
    # (aminmax reads fp16 at ~10 GB/s on 2 cores; a float32 sum ran at 0.75 and took 2/3 of a load).
    if t.numel() and not all(bool(torch.isfinite(x)) for x in torch.aminmax(t)):
        raise UserError(f"{w.file}: tensor {_label(w.name, w.file)} holds NaN or infinite values")
    return w


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _label(name: str, file: Path) -> str:
    """The tensor's name, with its name in the file when the file is a HF one and names differ."""
    in_file = hf_name(name) if file.suffix == ".safetensors" else name
    return repr(name) if in_file == name else f"{name!r} ({in_file} in the file)"
