"""SamplingParams: the sampling settings, checked once (imports no torch: the flag parser reads its defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from llama.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0  # off, as in transformers, llama.cpp and vLLM
    repetition_window: int = 64
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None

    def __post_init__(self) -> None:
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "mirostat_tau", "mirostat_eta")
        for flag in floats:
            if not math.isfinite(getattr(self, flag)):
                raise UserError(f"--{flag} must be a finite number, got {getattr(self, flag)}")
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("repetition_window", self.repetition_window >= 0, ">= 0"),
            ("mirostat", self.mirostat in (0, 1, 2), "0, 1 or 2"),
            ("mirostat_tau", self.mirostat_tau > 0, "> 0"),
            ("mirostat_eta", self.mirostat_eta > 0, "> 0"),
            ("seed", self.seed is None or 0 <= self.seed < 2**64, "in [0, 2**64)"),
        ]
        for flag, ok, rule in checks:
            if not ok:
                raise UserError(f"--{flag} must be {rule}, got {getattr(self, flag)}")
