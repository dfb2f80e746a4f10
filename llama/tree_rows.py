"""A token tree's pass on the GPU whose every node gets the bits of the one-token step at its position.

Greedy speculation must reproduce plain greedy decoding token for token, and at a near-tie of two logits
that holds only if the tree's logits are the very bits the one-token steps would compute. On the GPU the
kernels of a pass of many tokens are others than a one-token step's (cuBLAS picks its algorithm by the
number of rows; attention of many queries was SDPA's), so a pass asked for exactly runs:

- every matmul in calls that give each row the bits of a one-row call (our int4 GEMV: one launch, chunks of 8
  rows; cuBLAS, for a plain nn.Linear and for int8's weight dequantized once a matrix: up to 8 rows where
  llama/dense_row_check.py found so on this GPU, else one; tinygemm, bitsandbytes: one), see linear_rows;
- attention through the split kernel with each node's path (llama/fused_ops.py: attention's `paths`), so a
  node sees its ancestors at the positions a one-token step would find them, in the same splits;
- norms, SiLU(gate) * up, RoPE and the residual adds through the kernels a step takes, one row at a time
  already.

The pass's cache (a KVCache wrapped by TreePass, or a BatchStep) carries the tree as `tree_rows`; the model
looks for it. The CPU needs none of this: its kernels are per row by construction (engine/cpu_decode.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama.dense_row_check import check_rows, checked_rows
from llama.kv_cache import KVCache


@dataclass(frozen=True)
class TreeRows:
    """positions (batch, seqlen) int64: each node's RoPE position; paths (batch, seqlen, depth) int32: the cache
    slots of the node and its ancestors, node first, -1 past the root (llama/speculative/tree.py tree_paths)."""

    positions: torch.Tensor
    paths: torch.Tensor


class TreePass:
    """A KVCache as one exact tree pass sees it: the cache's own update, and the tree."""

    def __init__(self, cache: KVCache, rows: TreeRows) -> None:
        self.cache, self.tree_rows = cache, rows

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(layer, start_pos, k, v)


def tree_rows(cache: object) -> TreeRows | None:
    """The tree of an exact pass over `cache`, or None for any other pass."""
    return getattr(cache, "tree_rows", None)


def check_dense_rows(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Check the shapes of the model's plain nn.Linear layers and quantized layers' dense weights for calls of
    several rows (llama/dense_row_check.py), so that linear_rows may take them: before an exact pass, outside any
    capture."""
    for m in model.modules():
        if type(m) is nn.Linear:
            check_rows(m.out_features, m.in_features, dtype, m.bias is not None, device)
        elif hasattr(m, "dense_weight"):  # QuantizedLinear: its dense weight (int8 on the GPU) without the bias
            check_rows(m.out_features, m.in_features, dtype, False, device)


def linear_rows(linear: nn.Module, x: torch.Tensor, exact: bool) -> torch.Tensor:
    """linear(x) for x (..., in); exact: each row as a call of one row computes it: through the module's
    `exact_forward(rows)` where it has one that takes these rows, else calls of as many rows as the kernel keeps
    that for (a plain nn.Linear on CUDA, or a layer's `dense_weight(rows)`, made once, through F.linear: what
    check_dense_rows found; anything else: 1)."""
    rows = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if not exact or rows.shape[0] == 1:
        return linear(x)
    whole = linear.exact_forward(rows) if hasattr(linear, "exact_forward") else None
    if whole is not None:
        return whole.view(*x.shape[:-1], -1)
    dense = linear.dense_weight(rows) if hasattr(linear, "dense_weight") else None
    if dense is not None:
        step = checked_rows(linear.out_features, linear.in_features, rows.dtype, False, rows.device)
        return linear.with_bias(_calls(lambda part: F.linear(part, dense), rows, step)).view(*x.shape[:-1], -1)
    step = 1
    if type(linear) is nn.Linear and rows.is_cuda:
        step = checked_rows(linear.out_features, linear.in_features, rows.dtype, linear.bias is not None, rows.device)
    if step >= rows.shape[0]:
        return linear(x)
    return _calls(linear, rows, step).view(*x.shape[:-1], -1)


def _calls(fn, rows: torch.Tensor, step: int) -> torch.Tensor:
    """fn over rows (tokens, in) in calls of `step` rows, each call's input where a one-row call's would be."""
    return torch.cat([fn(_own_copy(rows[i : i + step])) for i in range(0, rows.shape[0], step)])


def _own_copy(rows: torch.Tensor) -> torch.Tensor:
    """rows where a one-row call's input would be: at the start of an allocation unless already 256-byte aligned
    (a library may choose its kernel by the alignment of its operands)."""
    return rows if rows.data_ptr() % 256 == 0 else rows.clone()
