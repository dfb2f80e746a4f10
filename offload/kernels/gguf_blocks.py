"""GGUF's 32-value blocks in our formats, bit for bit: nothing is re-quantized.

Q8_0 block: fp16 d, then 32 int8 q; w = q * d. -> Int8Weight with one fp16 scale per group of 32.
Q4_0 block: fp16 d, then 16 bytes; value j in the low nibble of byte j, value j + 16 in its high nibble;
w = (q - 8) * d. -> Int4Weight, group 32, scale d, zero 8 (fp16: both exact).
Q4_1 block: fp16 d, fp16 m, then 16 bytes as Q4_0; w = q * d + m = (q - (-m / d)) * d. -> Int4Weight,
group 32, scale d, zero -m / d in float32 (a fractional zero point, which every int4 kernel takes; fp16
would round it). A block with d = 0 (all its values equal m) becomes scale -m / 8, zero 8, which gives m for
q = 0, the only level ggml's quantizer writes there.

The *_reference functions do it with torch ops; `convert` (CONVERTERS) with the compiled extension
(csrc/gguf_blocks.cpp) where it can, bit for bit the same.
"""
from __future__ import annotations

import functools

import torch

from offload.kernels.cpu_ext import cpu_extension
from offload.kernels.int4_format import Int4Weight
from offload.kernels.int8_format import Int8Weight

BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def _blocks(raw: torch.Tensor, out: int, inp: int, kind: str) -> torch.Tensor:
    """raw uint8 [out, bytes per row] -> (out, in / 32, block bytes); ValueError if the sizes disagree."""
    if inp % BLOCK or tuple(raw.shape) != (out, inp // BLOCK * BLOCK_BYTES[kind]):
        raise ValueError(f"{kind} data {tuple(raw.shape)} does not hold a [{out}, {inp}] weight")
    return raw.reshape(out, inp // BLOCK, BLOCK_BYTES[kind])


def _fp16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of every block: (out, groups)."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16).squeeze(-1)


def _repack_nibbles(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Our packed bytes for the 32 4-bit values of every block: uint8 (out, groups * 16).

    In a block's 16 bytes, byte i holds value i (low nibble) and value i + 16 (high). Our byte j holds values
    2j (high) and 2j + 1 (low). With e, o the even and odd bytes of the block, our bytes 0..7 are
    (e << 4) | (o & 15) (values 0..15) and bytes 8..15 are (e & 0xF0) | (o >> 4) (values 16..31).
    """
    out, groups = blocks.shape[:2]
    pairs = blocks[..., start:].contiguous().view(out, groups, 8, 2)  # (out, groups, 8, [even, odd])
    e, o = pairs[..., 0], pairs[..., 1]
    packed = torch.empty(out, groups, 2, 8, dtype=torch.uint8, device=blocks.device)
    torch.bitwise_or(e << 4, o & 15, out=packed[:, :, 0])
    torch.bitwise_or(e & 0xF0, o >> 4, out=packed[:, :, 1])
    return packed.view(out, groups * 16)


def q8_0_to_int8_reference(raw: torch.Tensor, out: int, inp: int) -> Int8Weight:
    blocks = _blocks(raw, out, inp, "Q8_0")
    q = blocks[..., 2:].contiguous().view(torch.int8).reshape(out, inp)
    return Int8Weight(qweight=q, scale=_fp16(blocks, 0))


def q4_0_to_int4_reference(raw: torch.Tensor, out: int, inp: int) -> Int4Weight:
    blocks = _blocks(raw, out, inp, "Q4_0")
    scales = _fp16(blocks, 0)
    return Int4Weight(packed=_repack_nibbles(blocks, 2), scales=scales, zeros=torch.full_like(scales, 8.0))


def q4_1_to_int4_reference(raw: torch.Tensor, out: int, inp: int) -> Int4Weight:
    blocks = _blocks(raw, out, inp, "Q4_1")
    d, m = _fp16(blocks, 0).float(), _fp16(blocks, 2).float()
    flat = d == 0
    scales = torch.where(flat, -m / 8, d)
    zeros = torch.where(flat, torch.full_like(d, 8.0), -m / torch.where(flat, 1.0, d))
    return Int4Weight(packed=_repack_nibbles(blocks, 4), scales=scales, zeros=zeros)


REFERENCES = {"Q8_0": q8_0_to_int8_reference, "Q4_0": q4_0_to_int4_reference, "Q4_1": q4_1_to_int4_reference}
FILE_SCALE_DTYPES = {"Q8_0": torch.float16, "Q4_0": torch.float16, "Q4_1": torch.float32}  # what the twins give


def convert(kind: str, raw: torch.Tensor, out: int, inp: int,
            into: Int8Weight | Int4Weight | None = None) -> Int8Weight | Int4Weight:
    """A [out, in] weight's GGUF blocks (raw: uint8 [out, bytes per row]) in our format, written into `into`
    when given (the format's shapes; scales and zeros in any float dtype, rounded to it as .to() rounds), else
    into new tensors with the twins' dtypes. By the compiled converters (one pass over the bytes, on all of
    torch's threads) for data on the CPU, else by the torch twins (meta tensors, or no extension here)."""
    _blocks(raw, out, inp, kind)  # the sizes must agree
    ext = cpu_extension() if raw.device.type == "cpu" else None
    if ext is None:
        w = REFERENCES[kind](raw, out, inp)
        if into is None:
            return w
        for name, t in into.tensors().items():
            t.copy_(w.tensors()[name])
        return into
    if into is None:
        scales = torch.empty(out, inp // BLOCK, dtype=FILE_SCALE_DTYPES[kind])
        into = (Int8Weight(qweight=torch.empty(out, inp, dtype=torch.int8), scale=scales) if kind == "Q8_0" else
                Int4Weight(packed=torch.empty(out, inp // 2, dtype=torch.uint8), scales=scales,
                           zeros=torch.empty_like(scales)))
    raw = raw if raw.stride(-1) == 1 else raw.contiguous()
    op = {"Q8_0": ext.gguf_q8_0_to_int8, "Q4_0": ext.gguf_q4_0_to_int4, "Q4_1": ext.gguf_q4_1_to_int4}[kind]
    op(raw, *into.tensors().values())
    return into


CONVERTERS = {kind: functools.partial(convert, kind) for kind in REFERENCES}
