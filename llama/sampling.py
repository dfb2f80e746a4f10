"""Choosing the next token from the model's logits.

Order of processors (each a small pure function on a float32 CPU logits vector):

    1. repetition penalty over the last `repetition_window` ids of the history (each id once)
    2. temperature == 0: greedy, the argmax of the penalised logits; stop here
    3. temperature: logits / T
    4. mirostat on (1 or 2): mirostat truncation replaces steps 5-7, then sample
    5. top-k  ->  6. top-p  ->  7. min-p  ->  8. sample from the softmax of what is left

Greedy is pure argmax unless a repetition penalty is asked for: the default penalty is 1.0 (off), as in
transformers, llama.cpp and vLLM, so `temperature 0` matches their greedy output on the same weights.

Every step keeps the logits free of NaN: the penalty saturates at the float32 range, temperature scales
logits relative to their maximum (a tiny temperature becomes greedy instead of overflowing), and a
distribution with no finite mass falls back to the argmax of what is finite; a NaN logit counts as impossible.

Top-k narrows the vocabulary to its k best candidates; top-p, min-p and the draw then see only those.
The other filters remove a token by setting its logit to -inf; each keeps at least one token. Setting a
processor to its neutral value turns it off: top_k 0, top_p 1, min_p 0, repetition_penalty 1 or repetition_window 0.

Mirostat (Basu et al. 2020, "Mirostat: a neural text decoding algorithm that directly controls perplexity")
keeps the surprise -log2 p of sampled tokens near tau with a running bound mu, starting at 2*tau:
  v1: estimate the Zipf exponent s from the top 100 probabilities, derive k from mu, sample from the top k;
  v2: drop the tokens whose surprise exceeds mu, sample from the rest.
Both then update mu -= eta * (surprise - tau), with the surprise of the sampled token measured under the
distribution before truncation, as in the paper (llama.cpp measures it after renormalising).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from llama.sampling_params import SamplingParams

MIROSTAT_ZIPF_TOKENS = 100  # "m" in the paper: how many top probabilities estimate the Zipf exponent


def apply_repetition_penalty(logits: Tensor, recent_ids: Sequence[int], penalty: float) -> Tensor:
    """Make the tokens in `recent_ids` less likely: positive logits / penalty, negative ones * penalty."""
    if penalty == 1.0 or not recent_ids:
        return logits
    ids = torch.tensor(sorted(set(recent_ids)), dtype=torch.long)
    chosen = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(chosen > 0, chosen / penalty, chosen * penalty)
    return out.clamp_(max=torch.finfo(out.dtype).max)  # a tiny penalty must not make +inf logits


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / T, shifted so the largest is 0: the same softmax, and no overflow however small T is.

    T is held inside the positive range of the logits' dtype (1e-300 is 0 in float32, and 0 / 0 is NaN).
    """
    top = logits.max()
    if not torch.isfinite(top):
        return logits
    info = torch.finfo(logits.dtype)
    return (logits - top) / min(max(temperature, info.tiny), info.max)


def top_k_candidates(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits (descending) and their token ids; k <= 0 or k >= vocab: all of them, unsorted.

    Later filters and the draw work on these candidates only, which keeps them cheap on 128k vocabularies.
    """
    if k <= 0 or k >= logits.numel():
        return logits, torch.arange(logits.numel())
    top = torch.topk(logits, k)
    return top.values, top.indices


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    # Only the head of the sorted distribution matters: widen it until it holds mass p (a full sort is slow).
    m = min(64, probs.numel())
    while True:
        head_probs, head_ids = torch.topk(probs, m)
        mass = torch.cumsum(head_probs, dim=-1)
        if mass[-1] >= p or m == probs.numel():
            break
        m = min(4 * m, probs.numel())
    n_keep = int((mass - head_probs < p).sum())  # tokens with less than p ranked above them
    kept = head_ids[:n_keep]
    return torch.full_like(logits, -math.inf).index_copy_(0, kept, logits[kept])


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep the tokens with probability >= min_p * (the largest probability)."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), -math.inf)


def estimate_zipf_exponent(sorted_probs: Sequence[float]) -> float:
    """Least-squares estimate of s in p_i ~ 1/i^s from the top probabilities (mirostat v1).

    Fits log(p_i / p_{i+1}) = s * log((i+1)/i) through the origin over the first MIROSTAT_ZIPF_TOKENS
    probabilities, stopping at the first zero probability. Returns 0 when no pair is usable.
    """
    num = den = 0.0
    top = list(sorted_probs[:MIROSTAT_ZIPF_TOKENS])
    for i in range(len(top) - 1):
        if top[i + 1] <= 0.0:
            break
        t = math.log((i + 2) / (i + 1))
        num += t * math.log(top[i] / top[i + 1])
        den += t * t
    return num / den if den > 0 else 0.0


def mirostat_v1_k(s_hat: float, mu: float, n_vocab: int) -> int:
    """Top-k size whose expected surprise is mu for a Zipf(s_hat) distribution over n_vocab tokens.

    k = (eps * 2^mu / (1 - N^-eps))^(1/s), eps = s - 1, rounded, clamped to [1, N]; a degenerate
    estimate (s <= 0, or eps == 0) gives N, leaving the choice to the distribution.
    """
    eps = s_hat - 1.0
    if s_hat <= 0.0 or eps == 0.0:
        return n_vocab
    try:
        k = (eps * 2.0**mu / (1.0 - n_vocab**-eps)) ** (1.0 / s_hat)
    except OverflowError:
        return n_vocab
    if not math.isfinite(k):
        return n_vocab
    return max(1, min(n_vocab, round(k)))


def mirostat_v2_filter(logits: Tensor, mu: float) -> Tensor:
    """Drop tokens whose surprise -log2 p exceeds mu (the most likely token always stays)."""
    log2_probs = torch.log_softmax(logits, dim=-1) / math.log(2)
    keep = -log2_probs <= mu
    keep[torch.argmax(logits)] = True
    return logits.masked_fill(~keep, -math.inf)


class Sampler:
    """Picks tokens with one SamplingParams; holds the random generator and mirostat's mu."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator(device="cpu")
        self.reset()

    def reset(self) -> None:
        """Back to the initial state: mu = 2*tau, and the generator re-seeded (with `seed` if given)."""
        self.mu = 2.0 * self.params.mirostat_tau
        if self.params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.params.seed)

    def sample(self, logits: Tensor, history: Sequence[int]) -> int:
        """Next token id from one position's logits (shape [vocab], any device/dtype; sampled on CPU in fp32)."""
        p = self.params
        logits = self._penalized(logits, history)
        if p.temperature == 0.0:
            return int(torch.argmax(logits))
        logits = apply_temperature(logits, p.temperature)
        if p.mirostat:
            return self._sample_mirostat(logits)
        values, ids = self._truncated(logits)
        return int(ids[self._draw(values)])

    def distribution(self, logits: Tensor, history: Sequence[int]) -> tuple[Tensor, Tensor]:
        """What sample() draws from when temperature > 0 and mirostat is off: (probs (n,), their token ids (n,))."""
        values, ids = self._truncated(apply_temperature(self._penalized(logits, history), self.params.temperature))
        return torch.softmax(values, dim=-1), ids

    def _penalized(self, logits: Tensor, history: Sequence[int]) -> Tensor:
        p = self.params
        # A NaN logit says nothing about its token: treat it as impossible rather than as the largest.
        logits = logits.detach().to("cpu", torch.float32).nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        if p.repetition_window > 0:
            logits = apply_repetition_penalty(logits, history[-p.repetition_window :], p.repetition_penalty)
        return logits

    def _truncated(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k, top-p, min-p of tempered logits: (candidate logits, their token ids)."""
        values, ids = top_k_candidates(logits, self.params.top_k)
        return min_p_filter(top_p_filter(values, self.params.top_p), self.params.min_p), ids

    def _sample_mirostat(self, logits: Tensor) -> int:
        if self.params.mirostat == 1:
            probs = torch.softmax(logits, dim=-1)
            head = torch.topk(probs, min(MIROSTAT_ZIPF_TOKENS, probs.numel())).values.tolist()
            k = mirostat_v1_k(estimate_zipf_exponent(head), self.mu, logits.numel())
            values, ids = top_k_candidates(logits, k)
            token = int(ids[self._draw(values)])
        else:
            token = self._draw(mirostat_v2_filter(logits, self.mu))
        surprise = -float(torch.log_softmax(logits, dim=-1)[token]) / math.log(2)
        self.mu -= self.params.mirostat_eta * (surprise - self.params.mirostat_tau)
        return token

    def _draw(self, logits: Tensor) -> int:
        """Index drawn from softmax(logits) by inverting its CDF (torch.multinomial is 20x slower at 128k)."""
        cdf = torch.cumsum(torch.softmax(logits, dim=-1), dim=-1)
        if not bool(torch.isfinite(cdf[-1])) or float(cdf[-1]) <= 0.0:  # NaN or no mass: nothing to invert
            return int(torch.argmax(torch.nan_to_num(logits, nan=-math.inf)))
        u = torch.rand((), generator=self.generator) * cdf[-1]
        index = int(torch.searchsorted(cdf, u, right=True))
        if index == cdf.numel():  # u rounded up to the total: take the last token with mass
            index = int(torch.searchsorted(cdf, cdf[-1]))
        return min(index, cdf.numel() - 1)
