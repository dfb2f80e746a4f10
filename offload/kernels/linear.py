"""nn.Linear replacements that hold a quantized weight format, and the pass that swaps them into a model.

A QuantizedLinear registers each tensor of its format as a buffer under the format's own field names
(Int8Linear: qweight, scale; Int4Linear: packed, scales, zeros, or weight_int4pack, scales_and_zeros once
prepared for CUDA), so `.to()`, state_dict and the offload engine's rebinding of buffers to device slots
all see plain tensors. forward rebuilds the format from whatever tensors are bound at that moment.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from functools import partial

import torch
import torch.nn as nn

from offload.errors import FormatError
from offload.kernels.bnb import bnb_int8_linear
from offload.kernels.int4_format import Int4Weight, quantize_int4
from offload.kernels.int8_format import Int8Weight, quantize_int8
from offload.kernels.matmul import int4_matmul, int8_dense_weight, int8_matmul
from offload.kernels.int4_gemv_cuda import int4_gemv, int4_gemv_fits, int4_gemv_library, int4_gemv_supported
from offload.kernels.tinygemm import Int4CudaWeight, prepare_for_cuda, tinygemm_supports
from offload.quant_mode import QuantMode

QuantFormat = Int8Weight | Int4Weight | Int4CudaWeight
FORMATS = (Int8Weight, Int4Weight, Int4CudaWeight)


class QuantizedLinear(nn.Module):
    """y = x @ dequantized(weight).T + bias, computed on the device of the bound tensors."""

    def __init__(self, weight: QuantFormat, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self._bind(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _bind(self, weight: QuantFormat) -> None:
        for name in getattr(self, "format_names", ()):
            delattr(self, name)
        self.format_type = type(weight)
        self.format_names = tuple(weight.tensors())
        for name, t in weight.tensors().items():
            self.register_buffer(name, t)

    def weight_format(self) -> QuantFormat:
        """The format built from the tensors bound right now."""
        return self.format_type.from_tensors({n: getattr(self, n) for n in self.format_names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_format()
        return self.with_bias(int8_matmul(x, w) if isinstance(w, Int8Weight) else int4_matmul(x, w))

    def with_bias(self, y: torch.Tensor) -> torch.Tensor:
        """y plus the layer's bias, as forward adds it after the matmul."""
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def exact_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """forward(x) for x (tokens, in) with each row what a one-row call gives it, in one call, where the kernel
        promises that (our int4 GEMV: chunks of 8 rows in one launch, llama/tree_rows.py); else None."""
        w = self.weight_format()
        if not (isinstance(w, Int4Weight) and int4_gemv_supported(x, w)):
            return None
        return self.with_bias(int4_gemv(x, w))

    def dense_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The dense (out, in) weight forward multiplies x by through F.linear, where it does so (int8 on the GPU:
        dequantized, then cuBLAS, without the bias); else None. An exact tree (llama/tree_rows.py) makes it once
        and calls cuBLAS in chunks of the rows that keep each row's one-row bits."""
        w = self.weight_format()
        if isinstance(w, Int8Weight) and w.qweight.is_cuda and x.is_cuda:
            return int8_dense_weight(w, x.dtype)
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format_type.__name__}, bias={self.bias is not None}")


class Int8Linear(QuantizedLinear):
    """int8 weight-only, one scale per output channel."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(quantize_int8(linear.weight.detach()), linear.bias)


class Int4Linear(QuantizedLinear):
    """int4 weight-only, asymmetric, one scale and zero per group of int4_group_size(in_features) inputs."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        return cls(quantize_int4(linear.weight.detach(), group_size), linear.bias)

    def prepare_for_cuda(self, device: torch.device | str = "cuda") -> None:
        """Rebind the weight in tinygemm's layout (made on `device`) if tinygemm supports its shape, unless our
        one-token kernel takes the plain layout there (int4_gemv_cuda.py: faster decode, no second layout)."""
        w = self.weight_format()
        if isinstance(w, Int4Weight) and int4_gemv_fits(w) and int4_gemv_library(device) is not None:
            return
        if isinstance(w, Int4Weight) and tinygemm_supports(w):
            self._bind(prepare_for_cuda(w, device))


def quantized_linear_from_tensors(tensors: Mapping[str, torch.Tensor]) -> QuantizedLinear:
    """Rebuild a layer from a format's tensors plus an optional 'bias' (as saved by --save_quantized);
    the format is recognised by its tensor names."""
    bias = tensors.get("bias")
    rest = {n: t for n, t in tensors.items() if n != "bias"}
    for fmt in FORMATS:
        if sorted(rest) == sorted(f.name for f in dataclasses.fields(fmt)):
            cls = Int8Linear if fmt is Int8Weight else Int4Linear
            return cls(fmt.from_tensors(rest), bias)
    raise FormatError(f"quantized layer with tensors {sorted(tensors)} matches no known format")


def prepare_linears_for_cuda(module: nn.Module, device: torch.device | str = "cuda") -> nn.Module:
    """Prepare every Int4Linear in `module` for `device` (Int4Linear.prepare_for_cuda: the plain layout for our
    one-token kernel, else tinygemm's layout made there; the tensors stay there and may be moved to pinned
    host memory afterwards). Returns `module`."""
    for m in module.modules():
        if isinstance(m, Int4Linear):
            m.prepare_for_cuda(device)
    return module


def linear_constructors(group_size: int = 128) -> dict[QuantMode, Callable[[nn.Linear], nn.Module]]:
    """The layer each mode makes from a plain nn.Linear, quantized where the linear is."""
    return {
        QuantMode.INT8: Int8Linear.from_linear,
        QuantMode.INT4: partial(Int4Linear.from_linear, group_size=group_size),
        QuantMode.BNB: bnb_int8_linear,
    }


def quantize_linears(module: nn.Module, mode: QuantMode, names: Iterable[str] | None = None, progress: bool = True,
                     group_size: int = 128) -> nn.Module:
    """Replace plain nn.Linear submodules in place, one at a time (the full-size weight of each is freed as it
    goes), quantized where they are: INT8 (Int8Linear), INT4 (Int4Linear, groups of
    int4_group_size(in_features, group_size)) or BNB (bitsandbytes LLM.int8, threshold 6.0). `names` are
    qualified submodule names as in named_modules(); None means every plain nn.Linear. Returns `module`."""
    make = linear_constructors(group_size)[mode]
    # Exactly nn.Linear: bitsandbytes' layers subclass it and must not be quantized twice.
    linears = {n: m for n, m in module.named_modules() if type(m) is nn.Linear}
    wanted = list(linears) if names is None else list(names)
    missing = [n for n in wanted if n not in linears]
    if missing:
        raise KeyError(f"quantize: no nn.Linear named {', '.join(missing[:5])} in the model")
    from tqdm import tqdm

    for name in tqdm(wanted, desc=f"quantizing to {mode.value}", unit="layer", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, make(linears[name]))
    return module
