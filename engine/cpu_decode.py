"""CPU decode at memory speed: a one-token step of all blocks becomes one compiled call (module swaps).

A small model decoding on the CPU spends more time issuing operator calls than reading weights: on the
SmolLM2-135M shape at 2 threads the unfused block makes some sixty calls per token. `use_cpu_decode_blocks`
swaps every TransformerBlock of a CPU model whose linears the kernel takes (plain, int8, int4) for a
CpuDecodeBlock: the same submodules under the same names (state_dict and exclusion names are unchanged),
whose forward sends a one-token step through offload.kernels.decode_block and everything else (prefill,
token trees, batches at their own positions) through TransformerBlock's own forward. Blocks it cannot take
stay as they are. When it takes them all, the model itself becomes a CpuDecodeModel, whose one-token steps
run every block in one call (the C++ DecodeStack). Without the compiled kernels nothing is swapped but an
int8 head (CpuDecodeHead, through its torch twin): the unfused path is then the faster one.
"""
from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from llama.kv_cache import KVCache
from llama.model import Transformer, TransformerBlock
from offload.kernels import cpu_extension
from offload.kernels.decode_block import LinearTensors, cpu_linear, cpu_weight_tensors, decode_block
from offload.kernels.few_token_linear import FEW_TOKENS, FewTokenLinear
from offload.kernels.int8_format import quantize_int8

M = TypeVar("M", bound=nn.Module)


class CpuDecodeBlock(TransformerBlock):
    """A TransformerBlock whose decode steps (one token per sequence, a plain KV cache) run fused."""

    @classmethod
    def takes(cls, block: TransformerBlock) -> bool:
        """Whether every linear of the block is a format the kernel reads and both norms share one eps."""
        return (type(block) is TransformerBlock and block.attention_norm.eps == block.ffn_norm.eps
                and block.attention.wqkv is None and block.feed_forward.w13 is None  # the GPU's fused layout
                and _weight_lists(block) is not None)

    @classmethod
    def from_block(cls, block: TransformerBlock) -> CpuDecodeBlock:
        """The block swapped, its float32/float16 linears FewTokenLinear (a token tree's pass) in attention and
        feed-forward modules of its own (`block`'s are left as they were, for a bench's unfused baseline)."""
        fused = _same_state(cls, block)
        fused._modules = dict(fused._modules)
        for name in ("attention", "feed_forward"):
            part = _same_state(type(fused._modules[name]), fused._modules[name])
            part._modules = {n: _same_state(FewTokenLinear, m) if FewTokenLinear.takes(m) else m
                             for n, m in part._modules.items()}
            fused._modules[name] = part
        fused._bind_weights()
        return fused

    def _bind_weights(self) -> None:
        # Gathered once: gathering them per step cost 50-100 us a block in Python, a tenth of a token; the
        # norms and head counts too (each submodule attribute read is a Python-level lookup).
        self.weight_lists = _weight_lists(self)
        a = self.attention
        self.step_args = (self.attention_norm.weight, self.ffn_norm.weight, self.attention_norm.eps)
        self.heads_and_window = (a.n_heads, a.window or 0)

    def _apply(self, fn, recurse: bool = True):  # .to(), .float(), .cuda() rebind tensors: gather them anew
        out = super()._apply(fn, recurse)
        self._bind_weights()
        return out

    def forward(
        self,
        x: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        start_pos: int,
        cache: KVCache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (x.shape[1] != 1 or mask is not None or type(cache) is not KVCache or self.weight_lists is None
                or torch.is_grad_enabled()):
            return super().forward(x, rotation, start_pos, cache, mask)
        if start_pos + 1 > cache.max_seq_len:
            raise ValueError(f"KV cache overflow: position {start_pos + 1} > {cache.max_seq_len}")
        cos, sin = _rope_row(rotation)
        out = decode_block(x.view(x.shape[0], -1), *self.step_args, self.weight_lists, cache.keys[self.layer],
                           cache.values[self.layer], start_pos, cos, sin, *self.heads_and_window)
        return out.view_as(x)


class CpuDecodeHead(nn.Linear):
    """The output head (an nn.Linear, tied or not), its decode-sized calls through the compiled linear; with
    an int8 copy of its weight (`from_linear(..., int8=True)`), every call reads that copy instead.

    The int8 copy (one scale per row, non-persistent buffers: state_dict and the tied float weight, which the
    embedding reads, are unchanged) is for --quant int8|int4 on the CPU: there the float32 head, 113 MB on
    the SmolLM2-135M shape, was 5 ms of a 13 ms token, and llama.cpp keeps it in 8 bits too (Q8_0)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, int8: bool = False) -> CpuDecodeHead:
        head = _same_state(cls, linear)
        head._buffers = dict(head._buffers)  # buffers of its own, not the swapped-out module's
        head._non_persistent_buffers_set = set(head._non_persistent_buffers_set)
        if int8:
            qweight, scale = _int8_rows(linear.weight.detach())
            head.register_buffer("qweight", qweight, persistent=False)
            head.register_buffer("scale", scale, persistent=False)
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        int8 = "qweight" in self._buffers
        tokens = x.shape[:-1].numel()
        if torch.is_grad_enabled() or x.device.type != "cpu" or (not int8 and (
                tokens > FEW_TOKENS or self.bias is not None)):
            return super().forward(x)
        weight = [self.qweight, self.scale] if int8 else [self.weight]
        if self.bias is not None:
            weight.append(self.bias)
        return cpu_linear(x.reshape(tokens, -1), weight).view(*x.shape[:-1], -1)


class CpuDecodeModel(Transformer):
    """A Transformer whose one-token steps over a plain KV cache run all blocks in one compiled call.

    The DecodeStack is gathered from the blocks at first use and made anew after `.to()` and when `layers`
    is replaced by another list (a bench swaps the unfused blocks back in that way). A token tree of up to
    FEW_TOKENS tokens runs through the stack too (tree_step), each token's row computed as its one-token
    step would compute it, so that speculative decoding on the CPU gives plain greedy's tokens bit for bit;
    anything else (prefill, batches at their own positions, blocks the kernel does not take) runs
    Transformer's own path.
    RoPE's cos and sin come straight from the float32 tables: per block they came from the rotation in
    the model's dtype, so a bfloat16 model's angles are now rounded once fewer."""

    _stack: object | None = None
    _stack_for: nn.ModuleList | None = None  # the layers the stack was gathered from

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._stack_for = None
        return out

    def __getstate__(self) -> dict:  # deepcopy and pickle: the stack (a C++ object) is gathered anew
        return {**self.__dict__, "_stack": None, "_stack_for": None}

    def _through_blocks(
        self,
        tokens: torch.Tensor,
        start_pos: int,
        cache: KVCache | None,
        positions: torch.Tensor | None,
        mask: torch.Tensor | None,
        blocks: int | None = None,
    ) -> torch.Tensor:
        tree = _is_tree(tokens, positions, mask)
        plain = tokens.shape[1] == 1 and positions is None and mask is None
        stack = self._decode_stack() if tree or plain else None
        if stack is None or blocks is not None or type(cache) is not KVCache or torch.is_grad_enabled():
            return super()._through_blocks(tokens, start_pos, cache, positions, mask, blocks)
        if tree:
            assert positions is not None and mask is not None
            return self._tree_through_blocks(stack, tokens, start_pos, cache, positions, mask)
        if start_pos + 1 > min(cache.max_seq_len, self.rope_cos.shape[0]):
            raise ValueError(f"position {start_pos + 1} beyond the KV cache or max_seq_len")
        h = self.tok_embeddings(tokens)  # (batch, 1, dim)
        cos, sin = self.rope_cos[start_pos], self.rope_sin[start_pos]  # (head_dim // 2,)
        if cos.dtype != torch.float32:  # a model moved with .to(dtype) took its tables along
            cos, sin = cos.float(), sin.float()
        out = stack.step(h.view(h.shape[0], -1), cache.keys, cache.values, start_pos, cos, sin)
        return out.view_as(h)

    def _tree_through_blocks(
        self, stack, tokens: torch.Tensor, start_pos: int, cache: KVCache, positions: torch.Tensor, mask: torch.Tensor,
    ) -> torch.Tensor:
        """A token tree (1, T) through every block in one compiled call; each token's hidden state is bit for bit
        the one its one-token step would give after its ancestors (csrc/step_rows.h)."""
        seqlen = tokens.shape[1]
        if start_pos + seqlen > cache.max_seq_len or int(positions.max()) >= self.rope_cos.shape[0]:
            raise ValueError(f"position {start_pos + seqlen} beyond the KV cache or max_seq_len")
        h = self.tok_embeddings(tokens)  # (1, T, dim)
        cos, sin = self.rope_cos[positions].float(), self.rope_sin[positions].float()  # (T, head_dim // 2)
        out = stack.tree_step(h[0], cache.keys, cache.values, start_pos, cos, sin, mask.to(torch.bool).contiguous())
        return out.view_as(h)

    def logits(self, h: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """The head over hidden states (batch, seqlen, dim); a few tokens on the CPU are normed one at a time,
        so that a tree's rows are bit for bit the one-token steps' (the head's kernel already is per row)."""
        if h.device.type != "cpu" or h.shape[0] != 1 or not 1 < h.shape[1] <= FEW_TOKENS:
            return super().logits(h, exact)
        normed = torch.cat([self.norm(h[:, t : t + 1]) for t in range(h.shape[1])], dim=1)
        return self.output(normed)

    def _decode_stack(self):
        if self._stack_for is not self.layers:
            self._stack, self._stack_for = _decode_stack(self.layers), self.layers
        return self._stack


def _is_tree(tokens: torch.Tensor, positions: torch.Tensor | None, mask: torch.Tensor | None) -> bool:
    """Whether a forward's arguments are one sequence's token tree of up to FEW_TOKENS tokens."""
    return (positions is not None and positions.dim() == 1 and mask is not None and mask.dim() == 2
            and tokens.shape[0] == 1 and tokens.shape[1] <= FEW_TOKENS)


def _decode_stack(layers: nn.ModuleList):
    """The DecodeStack of `layers`, or None unless every one is a CpuDecodeBlock of one shape and window."""
    if not layers or not all(type(b) is CpuDecodeBlock and b.weight_lists is not None for b in layers):
        return None
    first = layers[0]
    if any(b.heads_and_window != first.heads_and_window or b.step_args[2] != first.step_args[2] for b in layers):
        return None
    tensors, counts = [], []
    for b in layers:
        tensors += [b.attention_norm.weight, b.ffn_norm.weight] + [t for ws in b.weight_lists for t in ws]
        counts += [len(ws) for ws in b.weight_lists]
    a = first.attention
    cpu_extension()  # the class is registered with the operators
    return torch.classes.llama_offload.DecodeStack(tensors, counts, first.attention_norm.weight.shape[0], a.n_heads,
                                                   a.n_kv_heads, a.head_dim, a.window or 0, first.step_args[2])


HEAD_ROWS = 4096  # head rows quantized at a time: whole, the float temporaries were 3 x 113 MB at peak


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8(w)'s qweight and scale (one scale per row), made HEAD_ROWS rows at a time."""
    qweight = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], HEAD_ROWS):
        part = quantize_int8(w[r : r + HEAD_ROWS])
        qweight[r : r + HEAD_ROWS], scale[r : r + HEAD_ROWS] = part.qweight, part.scale
    return qweight, scale


_last_rope_row: tuple = (None, None, None, None)  # (rotation's two tensors, cos, sin): one step's, for all blocks


def _rope_row(rotation: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [head_dim // 2] of a one-position rotation (rope_rotation's factors (1, 1, head_dim // 2,
    2): (cos, cos) and (-sin, sin) per pair), made once per step: every block of the step gets the same
    rotation. The entry holds its tensors, so an identity match cannot be a later tensor at a reused address."""
    global _last_rope_row
    entry = _last_rope_row  # one read: another thread may replace it meanwhile
    if entry[0] is rotation[0] and entry[1] is rotation[1]:
        return entry[2], entry[3]
    cos, sin = rotation[0][0, 0, :, 0].float().contiguous(), rotation[1][0, 0, :, 1].float().contiguous()
    _last_rope_row = (rotation[0], rotation[1], cos, sin)
    return cos, sin


def _same_state(cls: type[M], module: nn.Module) -> M:
    """An instance of cls over module's own submodules, parameters and buffers, under the same names."""
    swapped = cls.__new__(cls)
    swapped.__dict__ = module.__dict__.copy()
    return swapped


def _weight_lists(block: TransformerBlock) -> list[LinearTensors] | None:
    lists = [cpu_weight_tensors(m) for m in _linears(block)]
    return None if any(w is None for w in lists) else lists  # type: ignore[return-value]


def _linears(block: TransformerBlock) -> tuple[nn.Module, ...]:
    a, f = block.attention, block.feed_forward
    return a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2


def use_cpu_decode_blocks(model: Transformer, int8_head: bool = False) -> int:
    """Swap the blocks of a CPU model that the fused kernel takes, and a plain CPU output head, for their
    fused forms (module docstring); returns how many blocks were swapped. int8_head: the head reads an int8
    copy of its weight (CpuDecodeHead), with the kernels or without them (then through the torch twin)."""
    if int8_head and type(model.output) is nn.Linear and model.output.weight.device.type == "cpu":
        model.output = CpuDecodeHead.from_linear(model.output, int8=True)
    if cpu_extension() is None:
        return 0
    swapped = 0
    for i, block in enumerate(model.layers):
        if CpuDecodeBlock.takes(block):
            model.layers[i] = CpuDecodeBlock.from_block(block)
            swapped += 1
    if type(model.output) is nn.Linear and cpu_weight_tensors(model.output) is not None:
        model.output = CpuDecodeHead.from_linear(model.output)
    if swapped == len(model.layers) and type(model) is Transformer:
        model.__class__ = CpuDecodeModel  # the same object and state: its callers keep their reference
    return swapped
