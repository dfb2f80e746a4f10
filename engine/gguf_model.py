"""A GGUF model as ours: which of our formats each block linear takes, and the weights in those formats.

Per block linear, from its ggml type and --quant (`linear_mode`):
  Q8_0 -> int8 and Q4_0 / Q4_1 -> int4, converted block for block (offload/kernels/gguf_blocks.py);
  F32 / F16 / BF16 -> float, or quantized to --quant when it is given;
  anything else (K-quants, IQ types, Q5_0...) -> dequantized with gguf's own dequantizer, then quantized to
  --quant, by default int4 for a 2-4-bit source and int8 for a 5-8-bit one (said once, on `log`).
A --quant other than a native conversion's format dequantizes and quantizes too. The embedding, the final
norm and the output head are always float (dequantized if the file quantizes them).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from llama.checkpoint import check_weights
from llama.checkpoint_gguf import GGUFTensor, gguf_files, iter_gguf_tensors, metadata, open_gguf, read_gguf_args
from llama.config import ModelArgs
from llama.errors import UserError
from offload.kernels.gguf_blocks import CONVERTERS
from offload.kernels.int4_format import Int4Weight, quantize_int4
from offload.kernels.int8_format import Int8Weight, quantize_int8
from offload.kernels.linear import Int4Linear, Int8Linear

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
NATIVE = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4"}
QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}
LINEARS = {Int8Weight: Int8Linear, Int4Weight: Int4Linear}


@dataclass
class GGUFModel:
    """An opened GGUF: files, metadata of the first, ModelArgs, and every tensor (data still in the file map)."""

    path: Path
    meta: dict[str, Any]
    args: ModelArgs
    tensors: dict[str, GGUFTensor]

    @property
    def chat_template(self) -> str | None:
        return self.meta.get("tokenizer.chat_template")


def open_gguf_model(path: Path | str) -> GGUFModel:
    """Read the metadata and tensor index of a GGUF file or directory (no tensor data is read)."""
    files = gguf_files(path)
    readers = [(f, open_gguf(f)) for f in files]
    meta = metadata(readers[0][1])
    names = {t.name for _, r in readers for t in r.tensors}
    args = read_gguf_args(meta, files[0], names)
    if args.vocab_size < 0:
        embd = next((t for _, r in readers for t in r.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise UserError(f"{files[0]}: no token_embd.weight tensor")
        args = replace(args, vocab_size=int(embd.shape[1]))
    tensors = {}
    for t in iter_gguf_tensors(readers, args):
        if t.name in tensors:
            raise UserError(f"{t.file}: tensor {t.name!r} appears a second time")
        tensors[t.name] = t
    check_weights({n: t.shape for n, t in tensors.items()}, args, files[0])  # shapes, unexpected, missing
    return GGUFModel(files[0], meta, args, tensors)


def source_bits(type_name: str) -> float:
    """Bits per weight of a ggml type, scales included (Q4_0: 4.5, Q6_K: 6.5625)."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return 8 * nbytes / block


def linear_mode(type_name: str, quant: str | None) -> str | None:
    """The format a block linear of this ggml type takes (None: float), given --quant (None: not given)."""
    if type_name in NATIVE or type_name in FLOAT_TYPES:
        return quant or NATIVE.get(type_name)
    return quant or ("int4" if source_bits(type_name) < 5 else "int8")


def linear_modes(model: GGUFModel, quant: str | None, log: TextIO | None = None) -> dict[str, str | None]:
    """Block linear module name (canonical, e.g. layers.0.attention.wq) -> its format; one line per
    ggml type that is dequantized and quantized again."""
    modes, told, log = {}, set(), log or sys.stderr
    for name, t in model.tensors.items():
        if not (name.startswith("layers.") and name.endswith(".weight") and len(t.shape) == 2):
            continue
        mode = linear_mode(t.type_name, quant)
        modes[name.removesuffix(".weight")] = mode
        if mode is not None and NATIVE.get(t.type_name) != mode and t.type_name not in {*FLOAT_TYPES, *told}:
            told.add(t.type_name)
            print(f"note: {t.type_name} weights are dequantized and stored as {mode} (--quant int8|int4 to choose)",
                  file=log)
    return modes


def float_weight(t: GGUFTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor as floats (its file dtype, or float32 when dequantized; `dtype` if given). On a meta
    raw tensor (shapes only), an empty meta tensor."""
    if t.type_name in FLOAT_TYPES:
        w = t.raw
    elif t.raw.is_meta:
        w = torch.empty(t.shape, device="meta")
    else:
        import gguf

        w = torch.from_numpy(gguf.quants.dequantize(t.raw.numpy(), t.ggml_type)).reshape(t.shape)
    return w if dtype is None else w.to(dtype)


def linear_weight(t: GGUFTensor, mode: str | None,
                  into: Int8Weight | Int4Weight | None = None) -> torch.Tensor | Int8Weight | Int4Weight:
    """A block linear's weight in its format: converted natively (into `into`'s tensors when given), or
    (de)quantized."""
    if mode is not None and NATIVE.get(t.type_name) == mode:
        return CONVERTERS[t.type_name](t.raw, *t.shape, into=into)
    w = float_weight(t)
    return w if mode is None else QUANTIZERS[mode](w.float())


def quantized_shell(model: GGUFModel, modes: dict[str, str | None], base: nn.Module) -> None:
    """Swap base's linears (a model on the meta device) for QuantizedLinears of the formats' shapes and dtypes."""
    for module, mode in modes.items():
        if mode is None:
            continue
        t = model.tensors[f"{module}.weight"]
        shell = replace(t, raw=torch.empty_like(t.raw, device="meta"))
        weight = linear_weight(shell, mode)
        bias = getattr(base.get_submodule(module), "bias")
        parent, _, child = module.rpartition(".")
        setattr(base.get_submodule(parent), child, LINEARS[type(weight)](weight, bias))


def iter_gguf_weights(
    model: GGUFModel, modes: dict[str, str | None], dtype: torch.dtype,
    read: Callable[[int], object] = lambda nbytes: None,
    home: Callable[[str], torch.Tensor | None] = lambda name: None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the model as quantized_shell laid it out: a quantized linear's
    format tensors under `{module}.{field}`, every float in `dtype` (the formats' own dtypes are kept).
    read(nbytes) is called after each file tensor (a progress bar's update). home(name), asked once per
    name, may give where that tensor is to be kept (offload/block_buffers.py): it is then written there
    (native conversions directly) and that view is yielded."""
    for name, t in model.tensors.items():
        module = name.removesuffix(".weight")
        if modes.get(module) is None or not name.endswith(".weight"):
            yield name, _kept(float_weight(t, dtype), home(name))
        else:
            fmt = {"int8": Int8Weight, "int4": Int4Weight}[modes[module]]
            homes = {f.name: home(f"{module}.{f.name}") for f in dataclasses.fields(fmt)}
            direct = NATIVE.get(t.type_name) == modes[module] and all(h is not None for h in homes.values())
            weight = linear_weight(t, modes[module], fmt.from_tensors(homes) if direct else None)
            for field, tensor in weight.tensors().items():
                yield f"{module}.{field}", _kept(tensor, homes[field])
        read(t.raw.numel() * t.raw.element_size())


def _kept(tensor: torch.Tensor, home: torch.Tensor | None) -> torch.Tensor:
    """The tensor, written into its home first if it has one elsewhere."""
    if home is None or home.data_ptr() == tensor.data_ptr():
        return tensor
    return home.copy_(tensor)


def weight_bytes(model: GGUFModel) -> int:
    """Bytes of tensor data in the file(s): what a load reads."""
    return sum(math.prod(t.raw.shape) * t.raw.element_size() for t in model.tensors.values())
