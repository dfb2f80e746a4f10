"""Command-line values parsed into the types RunConfig holds; each raises a UserError naming its flag.

Imports no torch: these run before anything slow.
"""
from __future__ import annotations

import re

from engine.config import DTYPE_NAMES, DeviceSpec
from engine.llama_units import BLOCK_LINEARS
from llama.errors import UserError
from offload.quant_mode import QuantMode

_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_exclusions(text: str) -> frozenset[str]:
    """`[w1,w2,w3]` (the older tool's syntax), `w1,w2,w3` or `w1 w2`; `[]` or "" is the empty set."""
    names = [n for n in re.split(r"[\s,]+", text.strip().strip("[]").strip()) if n]
    unknown = [n for n in names if n not in BLOCK_LINEARS]
    if unknown:
        raise UserError(
            f"--offload_exclusion: unknown weight name {unknown[0]!r} (valid names: {', '.join(BLOCK_LINEARS)})"
        )
    return frozenset(names)


def parse_size(text: str, flag: str = "--gpu_mem") -> int:
    """A byte count from `6GiB`, `6000MB`, `6G` (binary), `1.5 GiB`; a unit is required."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise UserError(f"{flag}: cannot read {text!r} as a size (examples: 6GiB, 6000MB, 1.5G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_device(text: str) -> DeviceSpec:
    """`auto`, `cpu`, `cuda` or `cuda:N`."""
    m = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", text.strip())
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise UserError(f"--device: unknown device {text!r} (use cpu, cuda or cuda:N)")
    return DeviceSpec(m.group(1), None if m.group(2) is None else int(m.group(2)))


def parse_dtype(text: str) -> str:
    if text not in DTYPE_NAMES:
        raise UserError(f"--dtype: unknown dtype {text!r} (choose from {', '.join(DTYPE_NAMES[1:])})")
    return text


def parse_quant(quant: str | None, use_8bit: bool, use_offload: bool) -> QuantMode | None:
    """--quant names our formats; --use_8bit means LLM.int8 when resident and our int8 when streamed."""
    if quant and use_8bit:
        raise UserError("--use_8bit and --quant are alternatives: give one of them")
    if use_8bit:
        return QuantMode.INT8 if use_offload else QuantMode.BNB
    return None if quant is None else QuantMode(quant)


def parse_gpus(text: str) -> tuple[int, ...]:
    """`0,1`: CUDA device indices, in the order the blocks go through them."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UserError(f"--gpus: cannot read {text!r} as GPU indices (example: 0,1)")
    return tuple(int(p) for p in parts)


def parse_gpu_split(text: str) -> tuple[int, ...]:
    """`10GiB,24GiB`: a VRAM budget per GPU, each a size as --gpu_mem takes it, none zero."""
    sizes = tuple(parse_size(p, "--gpu_split") for p in text.split(","))
    if min(sizes) < 1:
        raise UserError(f"--gpu_split: every budget must be more than 0 bytes, got {text!r}")
    return sizes


def check_gpu_flags(gpus: tuple[int, ...] | None, split: tuple[int, ...] | None, use_offload: bool,
                    gpu_mem: int | None, device: DeviceSpec) -> tuple[int, ...] | None:
    """The GPUs --gpus and --gpu_split describe together (--gpu_split alone: GPUs 0, 1, ...), or None; a UserError
    for flags that disagree. Whether each index exists is checked where torch is (engine/choices.py)."""
    if gpus is None and split is None:
        return None
    if not use_offload:
        raise UserError("--gpus and --gpu_split only apply with --use_offload")
    if gpu_mem is not None and split is not None:
        raise UserError("--gpu_mem and --gpu_split are alternatives: give one budget, or one per GPU")
    if device.kind != "auto":
        raise UserError(f"--device {device} and --gpus are alternatives: --gpus names the GPUs")
    gpus = gpus if gpus is not None else tuple(range(len(split or ())))
    if split is not None and len(split) != len(gpus):
        raise UserError(f"--gpu_split gives {len(split)} budgets for the {len(gpus)} GPUs of --gpus")
    twice = next((g for g in gpus if gpus.count(g) > 1), None)
    if twice is not None and split is None:
        raise UserError(f"--gpus lists GPU {twice} twice: give --gpu_split to say each share's budget")
    return gpus
