"""CPU decode at memory speed: each block's one-token step becomes one compiled call (a module swap).

A small model decoding on the CPU spends more time issuing operator calls than reading weights: on the
SmolLM2-135M shape at 2 threads the unfused block makes some sixty calls per token. `use_cpu_decode_blocks`
swaps every TransformerBlock of a CPU model whose linears the kernel takes (plain, int8, int4) for a
CpuDecodeBlock: the same submodules under the same names (state_dict and exclusion names are unchanged),
whose forward sends a one-token step through offload.kernels.decode_block and everything else (prefill,
token trees, batches at their own positions) through TransformerBlock's own forward. Blocks it cannot take
stay as they are. Without the compiled kernels nothing is swapped: the unfused path is then the faster one.
"""
from __future__ import annotations

import torch

from llama.kv_cache import KVCache
from llama.model import Transformer, TransformerBlock
from offload.kernels import cpu_extension
from offload.kernels.decode_block import LinearTensors, cpu_weight_tensors, decode_block


class CpuDecodeBlock(TransformerBlock):
    """A TransformerBlock whose decode steps (one token per sequence, a plain KV cache) run fused."""

    @classmethod
    def takes(cls, block: TransformerBlock) -> bool:
        """Whether every linear of the block is a format the kernel reads and both norms share one eps."""
        return (type(block) is TransformerBlock and block.attention_norm.eps == block.ffn_norm.eps
                and all(cpu_weight_tensors(m) is not None for m in _linears(block)))

    @classmethod
    def from_block(cls, block: TransformerBlock) -> CpuDecodeBlock:
        fused = cls.__new__(cls)
        fused.__dict__ = block.__dict__.copy()  # the same submodules, parameters and buffers, by name
        return fused

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start_pos: int,
        cache: KVCache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.shape[1] != 1 or mask is not None or type(cache) is not KVCache or torch.is_grad_enabled():
            return super().forward(x, cos, sin, start_pos, cache, mask)
        if start_pos + 1 > cache.max_seq_len:
            raise ValueError(f"KV cache overflow: position {start_pos + 1} > {cache.max_seq_len}")
        weights: list[LinearTensors] = [cpu_weight_tensors(m) for m in _linears(self)]  # type: ignore[misc]
        attention = self.attention
        out = decode_block(x.view(x.shape[0], -1), self.attention_norm.weight, self.ffn_norm.weight,
                           self.attention_norm.eps, weights, cache.keys[self.layer], cache.values[self.layer],
                           start_pos, cos[0].float(), sin[0].float(), attention.n_heads, attention.window or 0)
        return out.view_as(x)


def _linears(block: TransformerBlock) -> tuple[torch.nn.Module, ...]:
    a, f = block.attention, block.feed_forward
    return a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2


def use_cpu_decode_blocks(model: Transformer) -> int:
    """Swap the blocks of a CPU model that the fused kernel takes (module docstring); returns how many."""
    if cpu_extension() is None:
        return 0
    swapped = 0
    for i, block in enumerate(model.layers):
        if CpuDecodeBlock.takes(block):
            model.layers[i] = CpuDecodeBlock.from_block(block)
            swapped += 1
    return swapped
