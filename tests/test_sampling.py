from __future__ import annotations

import math

import pytest
import torch

from llama.errors import UserError
from llama.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    estimate_zipf_exponent,
    min_p_filter,
    mirostat_v1_k,
    mirostat_v2_filter,
    top_k_candidates,
    top_p_filter,
)

# A distribution with exact probabilities, shuffled so that no filter can rely on the order.
PROBS = torch.tensor([0.15, 0.5, 0.1, 0.25])
LOGITS = PROBS.log()
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


def kept_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, [0, 1, 0, 0], 2.0)  # id 0 three times: penalised once
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # the input is left alone


def test_repetition_window_limits_the_history() -> None:
    logits = torch.tensor([3.0, 2.0, 0.0])
    history = [0, 2, 2]
    narrow = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0, repetition_window=2))
    wide = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0, repetition_window=3))
    off = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0, repetition_window=0))
    assert narrow.sample(logits, history) == 0  # token 0 is outside the last 2 ids
    assert wide.sample(logits, history) == 1  # 3.0 / 2 = 1.5 < 2.0
    assert off.sample(logits, history) == 0


def test_temperature() -> None:
    probs = kept_probs(apply_temperature(torch.tensor([2.0, 0.0]), 2.0))
    e = math.e
    assert torch.allclose(probs, torch.tensor([e / (1 + e), 1 / (1 + e)]))


def test_top_k_candidates() -> None:
    values, ids = top_k_candidates(torch.tensor([1.0, 4.0, 3.0, 2.0]), 2)
    assert values.tolist() == [4.0, 3.0] and ids.tolist() == [1, 2]
    values, ids = top_k_candidates(LOGITS, 0)
    assert torch.equal(values, LOGITS) and ids.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.4, [0, 1, 0, 0]),  # the top token alone already holds 0.5
        (0.7, [0, 2 / 3, 0, 1 / 3]),  # 0.5 + 0.25 = 0.75 >= 0.7
        (0.8, [0.15 / 0.9, 0.5 / 0.9, 0, 0.25 / 0.9]),
        (0.99, [0.15, 0.5, 0.1, 0.25]),
        (1e-6, [0, 1, 0, 0]),  # always at least one
    ],
)
def test_top_p(p: float, expected: list[float]) -> None:
    assert torch.allclose(kept_probs(top_p_filter(LOGITS, p)), torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_top_p_on_a_large_vocabulary_matches_a_full_sort() -> None:
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    n_keep = int((torch.cumsum(sorted_probs, 0) - sorted_probs < 0.9).sum())
    kept = top_p_filter(logits, 0.9).isfinite()
    assert n_keep > 300  # wider than the first head the filter looks at
    assert set(kept.nonzero().flatten().tolist()) == set(order[:n_keep].tolist())


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (0.25, [0.15 / 0.9, 0.5 / 0.9, 0, 0.25 / 0.9]),  # keep p >= 0.125
        (0.6, [0, 1, 0, 0]),  # keep p >= 0.3
        (0.0, [0.15, 0.5, 0.1, 0.25]),
    ],
)
def test_min_p(min_p: float, expected: list[float]) -> None:
    expected_probs = torch.tensor(expected, dtype=torch.float32)
    assert torch.allclose(kept_probs(min_p_filter(LOGITS, min_p)), expected_probs, atol=1e-6)


def test_sampler_draws_from_the_filtered_distribution() -> None:
    sampler = Sampler(SamplingParams(**{**PLAIN, "top_p": 0.8}, seed=0))
    n = 4000
    counts = torch.bincount(torch.tensor([sampler.sample(LOGITS, []) for _ in range(n)]), minlength=4)
    expected = torch.tensor([0.15, 0.5, 0.0, 0.25]) / 0.9
    assert counts[2] == 0
    assert torch.allclose(counts / n, expected, atol=0.03)


def test_processor_order_top_k_then_top_p_then_min_p() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top-k 3 -> [0.4, 0.3, 0.2]/0.9; top-p 0.7 keeps 0.444 + 0.333; min-p 0.8 keeps p >= 0.8 * 0.571: token 0.
    sampler = Sampler(SamplingParams(**{**PLAIN, "top_k": 3, "top_p": 0.7, "min_p": 0.8}, seed=1))
    assert {sampler.sample(logits, []) for _ in range(200)} == {0}
    sampler = Sampler(SamplingParams(**{**PLAIN, "top_k": 3, "top_p": 0.7, "min_p": 0.7}, seed=1))
    assert {sampler.sample(logits, []) for _ in range(200)} == {0, 1}


def test_greedy_is_argmax() -> None:
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.0))
    for _ in range(20):
        logits = torch.randn(1000, generator=gen)
        assert sampler.sample(logits, list(range(50))) == int(logits.argmax())
    bf16 = torch.randn(1000, generator=gen).to(torch.bfloat16)
    assert sampler.sample(bf16, []) == int(bf16.float().argmax())


def test_seed_reproducibility_and_reset() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def run(sampler: Sampler) -> list[int]:
        history: list[int] = []
        for _ in range(40):
            history.append(sampler.sample(logits, history))
        return history

    for mirostat in (0, 1, 2):
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, mirostat=mirostat, seed=123)
        a, b = Sampler(params), Sampler(params)
        first = run(a)
        assert first == run(b)
        assert first != run(Sampler(SamplingParams(**{**params.__dict__, "seed": 124})))
        a.reset()
        assert run(a) == first


def test_mirostat_v2_filter() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])  # surprises 1, 2, 3, 3 bits
    assert mirostat_v2_filter(probs.log(), 2.5).isfinite().tolist() == [True, True, False, False]
    assert mirostat_v2_filter(probs.log(), 0.1).isfinite().tolist() == [True, False, False, False]


def test_mirostat_v2_mu_update() -> None:
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    # tau 0.75: mu starts at 1.5, so only token 0 (1 bit) survives; mu -= 0.1 * (1 - 0.75) each step.
    sampler = Sampler(SamplingParams(**PLAIN, mirostat=2, mirostat_tau=0.75, mirostat_eta=0.1, seed=0))
    assert sampler.mu == 1.5
    assert sampler.sample(logits, []) == 0
    assert sampler.mu == pytest.approx(1.475)
    assert sampler.sample(logits, []) == 0
    assert sampler.mu == pytest.approx(1.45)
    # tau 1.25: mu 2.5 keeps tokens 0 and 1; the update uses the sampled token's surprise (1 or 2 bits).
    sampler = Sampler(SamplingParams(**PLAIN, mirostat=2, mirostat_tau=1.25, mirostat_eta=0.1, seed=0))
    seen = set()
    for _ in range(30):
        mu = sampler.mu
        token = sampler.sample(logits, [])
        seen.add(token)
        assert sampler.mu == pytest.approx(mu - 0.1 * ({0: 1.0, 1: 2.0}[token] - 1.25))
    assert seen == {0, 1}
    sampler.reset()
    assert sampler.mu == 2.5


def test_zipf_exponent_estimate() -> None:
    probs = [i**-1.2 for i in range(1, 1001)]
    total = sum(probs)
    assert estimate_zipf_exponent([p / total for p in probs]) == pytest.approx(1.2, abs=1e-9)
    assert estimate_zipf_exponent([1.0, 0.0, 0.0]) == 0.0


def test_mirostat_v1_k() -> None:
    # s 1.2, mu 10, N 1000: (0.2 * 1024 / (1 - 1000^-0.2)) ^ (1/1.2) = (204.8 / 0.748811) ^ 0.8333 = 107.35
    assert mirostat_v1_k(1.2, 10.0, 1000) == 107
    assert mirostat_v1_k(1.2, 0.0, 1000) == 1  # (0.2 / 0.7488) ^ 0.833 = 0.33 -> at least 1
    assert mirostat_v1_k(1.0, 10.0, 1000) == 1000  # degenerate estimate: no truncation
    assert mirostat_v1_k(3.0, 5000.0, 1000) == 1000  # overflow: no truncation


def test_mirostat_v1_step() -> None:
    zipf = torch.tensor([i**-1.2 for i in range(1, 1001)])
    logits = (zipf / zipf.sum()).log()
    sampler = Sampler(SamplingParams(**PLAIN, mirostat=1, mirostat_tau=5.0, mirostat_eta=0.1, seed=3))
    for _ in range(20):
        mu = sampler.mu
        k = mirostat_v1_k(1.2, mu, 1000)
        token = sampler.sample(logits, [])
        assert token < k  # logits are sorted, so the top k are ids 0..k-1
        surprise = -math.log2(float(zipf[token] / zipf.sum()))
        assert sampler.mu == pytest.approx(mu - 0.1 * (surprise - 5.0), abs=1e-5)


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_p", 1.5), ("top_p", 0.0), ("temperature", -1.0), ("mirostat", 3), ("min_p", 2.0), ("top_k", -1)],
)
def test_bad_params_name_the_flag(field: str, value: float) -> None:
    with pytest.raises(UserError, match=f"--{field} must be"):
        SamplingParams(**{field: value})
