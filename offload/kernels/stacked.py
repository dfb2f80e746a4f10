"""Several linears that read the same input, stacked on the output dim into one layer: one matmul for all.

A decode step reads every weight once whatever its shape, but each matmul is a launch of its own and
small ones leave the memory system idle between them, so q/k/v (and gate/up) read as one matrix cost
less. Stacking works for plain nn.Linear and for formats whose every tensor has out_features as its
first dim (int8, and int4 in its plain layout: make tinygemm's layout after stacking).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from offload.kernels.int4_format import Int4Weight
from offload.kernels.int8_format import Int8Weight
from offload.kernels.linear import Int4Linear, Int8Linear

STACKABLE_FORMATS = (Int8Weight, Int4Weight)


def stack_linears(linears: Sequence[nn.Module]) -> nn.Module | None:
    """One layer whose output is the outputs of `linears` concatenated in order, made where they are; None
    when they cannot be stacked (different kinds, input widths, dtypes or group sizes; other formats)."""
    kind = type(linears[0])
    if any(type(m) is not kind for m in linears) or len({m.bias is None for m in linears}) != 1:
        return None
    if kind is nn.Linear:
        weights = [m.weight for m in linears]
    elif kind in (Int8Linear, Int4Linear):  # exactly these: a subclass (GPTQ's permuted int4) has more state
        formats = [m.weight_format() for m in linears]
        if not isinstance(formats[0], STACKABLE_FORMATS) or any(type(f) is not type(formats[0]) for f in formats):
            return None
        weights = [t for f in formats for t in f.tensors().values()]
    else:
        return None
    if not _alike(weights, len(linears)):
        return None
    bias = None if linears[0].bias is None else torch.cat([m.bias.detach() for m in linears])
    if kind is nn.Linear:
        return _linear(torch.cat([m.weight.detach() for m in linears]), bias)
    names = formats[0].tensors().keys()
    stacked = {n: torch.cat([f.tensors()[n] for f in formats]) for n in names}
    return kind(type(formats[0]).from_tensors(stacked), bias)


def _alike(tensors: list[torch.Tensor], n_layers: int) -> bool:
    """The layers' tensors (each layer's in the same order) agree in dtype, device and all dims but the first."""
    per_layer = len(tensors) // n_layers
    first = tensors[:per_layer]
    for i in range(1, n_layers):
        for a, b in zip(first, tensors[i * per_layer : (i + 1) * per_layer]):
            if a.dtype != b.dtype or a.device != b.device or a.shape[1:] != b.shape[1:]:
                return False
    return True


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer
