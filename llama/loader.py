"""Build a Transformer from a checkpoint directory without holding any weight twice.

The model is built on the meta device (no memory), then each parameter is replaced by the tensor
the reader yields: used as is when it already has the wanted dtype and device (then it stays a
view of the file's memory map), else converted, after which the file pages it came from are
dropped. Peak memory is about one copy of the weights in the target dtype.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from llama.checkpoint import check_weights, iter_checkpoint, read_model_args
from llama.checkpoint_files import Weight
from llama.config import ModelArgs
from llama.model import Transformer


def load_model(
    model_dir: Path | str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    vocab_size: int | None = None,
    progress: bool = False,
) -> Transformer:
    """The model in model_dir (HF or Meta format), its parameters in dtype on device, in eval mode.

    vocab_size: the tokenizer's size, used only where params.json says -1 (else the embedding's).
    progress: a bar on stderr counting the target bytes placed.
    Parameters do not require grad. Raises UserError for any problem with the files.
    """
    model_dir, device = Path(model_dir), torch.device(device)
    args = read_model_args(model_dir, vocab_size)
    model = empty_model(args)
    total = sum(math.prod(shape) for shape in args.weight_shapes().values()) * dtype.itemsize
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        for w in iter_checkpoint(model_dir, args):
            t = _to_target(w, dtype, device)
            _assign(model, w.name, t)
            bar.update(t.numel() * t.element_size())
    return _finish(model, device)


def model_from_state(
    args: ModelArgs,
    state: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Transformer:
    """A model from an in-memory state dict with canonical names (tests, trainers). Tensors are converted as needed."""
    device = torch.device(device)
    names = {n: tuple(t.shape) for n, t in state.items() if not (args.tie_embeddings and n == "output.weight")}
    check_weights(names, args, "state dict")
    model = empty_model(args)
    for name in names:
        _assign(model, name, state[name].to(device=device, dtype=dtype))
    return _finish(model, device)


def empty_model(args: ModelArgs) -> Transformer:
    """The model with every parameter on the meta device (no memory), for weights assigned afterwards."""
    with torch.device("meta"), _SkipInit():
        return Transformer(args)


class _SkipInit(TorchFunctionMode):
    """Skips torch.nn.init calls: initializing meta tensors is pointless and imports torch._dynamo (~80 MB, seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # torch's protocol, untyped
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _to_target(w: Weight, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = w.tensor
    if t.dtype == dtype and t.device == device:
        return t
    if torch.empty((), dtype=dtype).element_size() > t.element_size():
        out = t.to(device).to(dtype)  # move the smaller form, widen there
    else:
        out = t.to(dtype).to(device)
    w.release()
    return out


def _assign(model: Transformer, name: str, t: torch.Tensor) -> None:
    module_path, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_path), leaf, nn.Parameter(t, requires_grad=False))


def _finish(model: Transformer, device: torch.device) -> Transformer:
    if model.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assignment replaced the tied parameter
    model.rope_cos = model.rope_cos.to(device)
    model.rope_sin = model.rope_sin.to(device)
    return model.eval()
