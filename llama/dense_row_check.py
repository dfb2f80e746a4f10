"""How many rows one cuBLAS matmul may take and still give each row the bits of a one-row call, as checked here.

An exact token tree (llama/tree_rows.py) must give every node what its one-token step gives it. cuBLAS picks
its kernel by the shape of the call, so a call of many rows may sum in another order than a call of one; but
on the H200 (torch 2.11, CUDA 13), for every Llama-2-7B matrix in fp16 and bf16, calls of up to 8 rows gave
each row its one-row bits (9 rows did not at 4096x4096 fp16, nor did 64 at 4096x11008). Whether a GPU and
library do is checked once per (shape, dtype, bias, device) with random values, outside any graph capture:
each call of 2..CHUNK rows against the same rows one at a time. Where every row matches, trees take calls of
CHUNK rows (a kernel chosen by shape sums the same way for any values); else one row a call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 8
_checked: dict[tuple, int] = {}  # (out, in, dtype, bias, device) -> rows a call may take


def _key(out_features: int, in_features: int, dtype: torch.dtype, bias: bool, device: torch.device) -> tuple:
    """The checked shape's key; the device with its index ("cuda" and a tensor's "cuda:0" are one GPU)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return (out_features, in_features, dtype, bias, device)


def checked_rows(out_features: int, in_features: int, dtype: torch.dtype, bias: bool, device: torch.device) -> int:
    """Rows a call of this shape may take exactly, as checked by check_rows (1 where it was not checked)."""
    return _checked.get(_key(out_features, in_features, dtype, bias, device), 1)


def check_rows(out_features: int, in_features: int, dtype: torch.dtype, bias: bool, device: torch.device) -> int:
    """Check (once) whether calls of 2..CHUNK rows of this shape give each row its one-row bits; returns the rows a
    call may take. Syncs with the device: never inside a capture."""
    key = _key(out_features, in_features, dtype, bias, device)
    if key not in _checked:
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(out_features, in_features, device=device, dtype=dtype, generator=gen) * in_features**-0.5
        b = torch.randn(out_features, device=device, dtype=dtype, generator=gen) if bias else None
        x = torch.randn(CHUNK, in_features, device=device, dtype=dtype, generator=gen)
        alone = [F.linear(x[i : i + 1].clone(), w, b) for i in range(CHUNK)]
        same = all(torch.equal(F.linear(x[:n], w, b)[i], alone[i][0]) for n in range(2, CHUNK + 1) for i in range(n))
        _checked[key] = CHUNK if same else 1
    return _checked[key]
