"""Logit processors the HTTP APIs offer beyond SamplingParams, and a sampler that runs them first.

Each processor maps one position's float32 logits (vocab,) to new logits, given the history (prompt and
reply so far) and n_new, the number of reply tokens in it. ExtendedSampler applies them in this order,
then hands the result to llama.sampling.Sampler (its repetition penalty, temperature, top-k, ...):

    1. LogitBias                      OpenAI `logit_bias`: add a bias to chosen ids
    2. PresenceFrequencyPenalty       OpenAI: subtract presence + frequency * count, over the reply only
    3. DecayingRepetitionPenalty      basilisk: repetition penalty with sustain and decay
    4. PositionalRepetitionPenalty    basilisk: `positional_repeat_inhibit`
    5. SuppressTokens                 basilisk: `min_length` (no stop token before n new tokens)

Suppression comes last so no penalty can lift a suppressed token off -inf. The multiplicative penalties
(3, 4) follow the design's rule: positive logits are divided by the factor, negative ones multiplied.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from llama.sampling import Sampler, SamplingParams


class LogitsProcessor(Protocol):
    def __call__(self, logits: Tensor, history: Sequence[int], n_new: int) -> Tensor: ...


def penalize(logits: Tensor, factor: Tensor) -> Tensor:
    """Elementwise repetition penalty: logit / factor where positive, logit * factor otherwise."""
    return torch.where(logits > 0, logits / factor, logits * factor)


@dataclass(frozen=True)
class LogitBias:
    bias: dict[int, float]

    def __call__(self, logits: Tensor, history: Sequence[int], n_new: int) -> Tensor:
        ids = torch.tensor(list(self.bias), dtype=torch.long)
        values = torch.tensor(list(self.bias.values()), dtype=logits.dtype)
        return logits.index_add(0, ids, values)


@dataclass(frozen=True)
class PresenceFrequencyPenalty:
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), counting reply tokens."""

    presence: float
    frequency: float

    def __call__(self, logits: Tensor, history: Sequence[int], n_new: int) -> Tensor:
        if n_new == 0:
            return logits
        reply = torch.tensor(history[len(history) - n_new :], dtype=torch.long)
        counts = torch.bincount(reply, minlength=logits.numel()).to(logits.dtype)
        return logits - self.frequency * counts - self.presence * (counts > 0).to(logits.dtype)


@dataclass(frozen=True)
class DecayingRepetitionPenalty:
    """basilisk's penalty: full strength on ids among the last `sustain` tokens of the history, then fading
    linearly over the `decay` tokens before those (strength (decay - j) / (decay + 1) at the j-th one,
    j = 0..decay-1), none further back. sustain < 0 covers the whole history. An id takes the strength
    of its most recent occurrence; its factor is 1 + (penalty - 1) * strength.
    """

    penalty: float
    sustain: int
    decay: int

    def __call__(self, logits: Tensor, history: Sequence[int], n_new: int) -> Tensor:
        full = len(history) if self.sustain < 0 else self.sustain
        window = list(history[max(0, len(history) - full - self.decay) :])
        if self.penalty == 1.0 or not window:
            return logits
        ids = torch.tensor(window[::-1], dtype=torch.long)  # most recent first
        distance = torch.arange(len(ids), dtype=torch.float32)
        strength = torch.where(
            distance < full, 1.0, (full + self.decay - distance).clamp(min=0) / (self.decay + 1)
        )
        by_id = torch.zeros(logits.numel()).scatter_reduce_(0, ids, strength, reduce="amax")
        return penalize(logits, 1.0 + (self.penalty - 1.0) * by_id.to(logits.dtype))


@dataclass(frozen=True)
class PositionalRepetitionPenalty:
    """basilisk's `positional_repeat_inhibit`: earlier replies (token id lists) are given, and at reply
    position i the ids those replies had at position i are penalized by `penalty`, so a regenerated reply
    does not retrace an earlier one token for token."""

    by_position: tuple[tuple[int, ...], ...]
    penalty: float

    @classmethod
    def from_replies(cls, replies: Sequence[Sequence[int]], penalty: float) -> PositionalRepetitionPenalty:
        longest = max((len(r) for r in replies), default=0)
        columns = tuple(tuple(sorted({r[i] for r in replies if i < len(r)})) for i in range(longest))
        return cls(columns, penalty)

    def __call__(self, logits: Tensor, history: Sequence[int], n_new: int) -> Tensor:
        if n_new >= len(self.by_position):
            return logits
        factor = torch.ones_like(logits)
        factor[list(self.by_position[n_new])] = self.penalty
        return penalize(logits, factor)


@dataclass(frozen=True)
class SuppressTokens:
    """Forbid `ids` while the reply has fewer than `until` tokens (basilisk's min_length)."""

    ids: tuple[int, ...]
    until: int

    def __call__(self, logits: Tensor, history: Sequence[int], n_new: int) -> Tensor:
        if n_new >= self.until or not self.ids:
            return logits
        return logits.index_fill(0, torch.tensor(self.ids, dtype=torch.long), -math.inf)


class ExtendedSampler(Sampler):
    """A Sampler that runs `processors` (in the module's order) on the logits before sampling."""

    def __init__(self, params: SamplingParams, processors: Sequence[LogitsProcessor], prompt_len: int) -> None:
        super().__init__(params)
        self.processors = list(processors)
        self.prompt_len = prompt_len

    def sample(self, logits: Tensor, history: Sequence[int]) -> int:
        return super().sample(self._extras(logits, history), history)

    def distribution(self, logits: Tensor, history: Sequence[int]) -> tuple[Tensor, Tensor]:
        return super().distribution(self._extras(logits, history), history)

    def _extras(self, logits: Tensor, history: Sequence[int]) -> Tensor:
        logits = logits.detach().to("cpu", torch.float32)
        n_new = len(history) - self.prompt_len
        for processor in self.processors:
            logits = processor(logits, history, n_new)
        return logits


def make_sampler(params: SamplingParams, processors: Sequence[LogitsProcessor], prompt_len: int) -> Sampler:
    """A plain Sampler when there is nothing extra to do, else an ExtendedSampler."""
    return ExtendedSampler(params, processors, prompt_len) if processors else Sampler(params)
