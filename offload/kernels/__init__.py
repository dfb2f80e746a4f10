"""Quantized weight formats (int8, int4, tinygemm int4) and their matmuls on CPU and CUDA."""
from __future__ import annotations

from offload.kernels.bnb import bnb_int8_linear
from offload.kernels.cpu_ext import cpu_extension
from offload.kernels.int4_format import Int4Weight, quantize_int4
from offload.kernels.int8_format import Int8Weight, quantize_int8
from offload.kernels.linear import (
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    prepare_linears_for_cuda,
    quantize_linears,
    quantized_linear_from_tensors,
)
from offload.kernels.matmul import int4_matmul, int4_matmul_reference, int8_matmul, int8_matmul_reference
from offload.kernels.tinygemm import Int4CudaWeight, prepare_for_cuda, tinygemm_supports

__all__ = [
    "Int4CudaWeight",
    "Int4Linear",
    "Int4Weight",
    "Int8Linear",
    "Int8Weight",
    "QuantizedLinear",
    "bnb_int8_linear",
    "cpu_extension",
    "int4_matmul",
    "int4_matmul_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "prepare_for_cuda",
    "prepare_linears_for_cuda",
    "quantize_int4",
    "quantize_int8",
    "quantize_linears",
    "quantized_linear_from_tensors",
    "tinygemm_supports",
]
