"""Quantized matmuls, dispatched on where the weight's tensors are, each with a pure-torch reference twin.

CPU: the compiled kernels (cpu_ext.py) for every token count, since they stay ahead of dequantize-then-
matmul even for prefill on the machines measured (bench/cpu_kernels.py); the reference if they cannot build.
CUDA: int4 through tinygemm (tinygemm.py): a prepared weight directly; a plain Int4Weight (what streams,
and what stays resident where our kernel builds) takes our kernel for up to 8 tokens (int4_gemv_cuda.py),
is converted to tinygemm's layout per call for other decode-sized inputs (one cheap pass over the packed bytes),
and for larger inputs (token trees, prefill) multiplied by a Triton kernel that dequantizes inside the matmul
(int4_gemm_triton.py), since tinygemm is a small-batch kernel. int8, and int4 where neither kernel runs
(float32 activations, no Triton), are dequantized on the device per call (a transient copy, freed after
the call). int8 with grouped scales (GGUF Q8_0, 32 inputs per scale) has no
CPU kernel (ours takes one scale per row): on the CPU it is dequantized DEQUANT_ROWS rows at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offload.kernels.cpu_ext import cpu_extension
from offload.kernels.int4_gemm_triton import int4_gemm, int4_gemm_supported
from offload.kernels.int4_gemv_cuda import MAX_TOKENS as GEMV_MAX_TOKENS, int4_gemv, int4_gemv_supported
from offload.kernels.int4_format import Int4Weight
from offload.kernels.int8_format import Int8Weight
from offload.kernels.tinygemm import Int4CudaWeight, int4_matmul_converting, int4_matmul_tinygemm, tinygemm_supports

TINYGEMM_MAX_TOKENS = 16  # above this many rows of x, dequantize-then-cuBLAS beats tinygemm
DEQUANT_ROWS = 2048  # weight rows dequantized at a time: bounds the transient copy (2048 x in)


def int8_matmul_reference(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """Dequantize, then F.linear in float32; result in x's dtype."""
    return F.linear(x.float(), w.dequantize(torch.float32)).to(x.dtype)


def int4_matmul_reference(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """Dequantize, then F.linear in float32; result in x's dtype."""
    return F.linear(x.float(), w.dequantize(torch.float32)).to(x.dtype)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # (tokens, in)


def int8_dense_weight(w: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype` that int8_matmul multiplies a GPU input by: the one transient copy."""
    return w.dequantize(dtype) if w.scale.dim() == 2 else w.qweight.to(dtype).mul_(w.scale.to(dtype)[:, None])


def int8_matmul(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x [..., in] @ dequantized(w).T -> [..., out] in x's dtype, computed where w's tensors are."""
    x2 = _tokens(x)
    if w.qweight.device.type == "cuda":
        y = F.linear(x2, int8_dense_weight(w, x.dtype))
    elif w.scale.dim() == 2:
        y = _dequantized_linear(x2, w)  # grouped scales (GGUF Q8_0): the CPU kernel takes one scale per row
    elif w.qweight.device.type == "cpu" and (ext := cpu_extension()) is not None:
        y = ext.int8_matmul(x2, w.qweight.contiguous(), w.scale)
    else:
        y = int8_matmul_reference(x2, w)
    return y.reshape(*x.shape[:-1], w.out_features)


def int4_matmul(x: torch.Tensor, w: Int4Weight | Int4CudaWeight) -> torch.Tensor:
    """x [..., in] @ dequantized(w).T -> [..., out] in x's dtype, computed where w's tensors are."""
    x2 = _tokens(x)
    if isinstance(w, Int4CudaWeight):
        y = int4_matmul_tinygemm(x2, w)
    elif w.packed.device.type == "cuda" and x2.shape[0] <= GEMV_MAX_TOKENS and int4_gemv_supported(x2, w):
        y = int4_gemv(x2, w)
    elif w.packed.device.type == "cuda" and x2.shape[0] <= TINYGEMM_MAX_TOKENS and tinygemm_supports(w):
        y = int4_matmul_converting(x2, w)
    elif w.packed.device.type == "cuda" and int4_gemm_supported(x2, w):
        y = int4_gemm(x2, w)
    elif w.packed.device.type == "cuda":
        y = _dequantized_linear(x2, w)
    elif w.packed.device.type == "cpu" and (ext := cpu_extension()) is not None:
        y = ext.int4_matmul(x2, w.packed.contiguous(), w.scales.contiguous(), w.zeros.contiguous())
    else:
        y = int4_matmul_reference(x2, w)
    return y.reshape(*x.shape[:-1], w.out_features)


def _dequantized_linear(x: torch.Tensor, w: Int4Weight | Int8Weight) -> torch.Tensor:
    """x [tokens, in] @ w.T, dequantizing DEQUANT_ROWS weight rows at a time into x's dtype."""
    parts = []
    for r in range(0, w.out_features, DEQUANT_ROWS):
        rows = type(w).from_tensors({n: t[r : r + DEQUANT_ROWS] for n, t in w.tensors().items()})
        parts.append(F.linear(x, rows.dequantize(x.dtype)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
