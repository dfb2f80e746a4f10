"""The planner's choices from synthetic measurements: big trees where passes are flat, none where they are not."""
from __future__ import annotations

import pytest

from llama.speculative.planner import MIN_ROUNDS, REPLAN_EVERY, Planner, TreeShape


def _planner(plain: float, tree_pass, draft_step: float, max_tokens: int = 256) -> Planner:
    lines: list[str] = []
    planner = Planner(max_tokens, has_draft_model=True, announce=lines.append)
    planner.observe_plain_pass(plain)
    for n in (2, 8, 64):
        planner.observe_pass(n, tree_pass(n))
    planner.observe_draft(4, 4 * draft_step)
    planner.lines = lines
    return planner


def _replan(planner: Planner) -> TreeShape | None:
    planner._rounds_left = 0
    return planner.choose()


def test_flat_passes_get_large_trees() -> None:
    """Streaming: a pass costs 235 ms whatever its size; a draft step 1 ms."""
    planner = _planner(0.235, lambda n: 0.235, 0.001)
    shape = planner.choose()
    assert shape is not None and shape.budget > 32 and shape.budget <= 256
    assert len(planner.lines) == 1 and "speculation:" in planner.lines[0]


def test_passes_that_grow_with_their_tokens_turn_speculation_off() -> None:
    """A CPU: one token 10 ms, each more 10 ms, and the draft as dear as the target."""
    planner = _planner(0.010, lambda n: 0.010 * n, 0.010)
    assert planner.choose() is None
    assert "off" in planner.lines[0]


def test_rounds_slower_than_predicted_turn_it_off_at_the_next_replan() -> None:
    """Pass times promise a gain, but whole rounds measure 4x what the model predicts (overhead it does not see)."""
    planner = _planner(0.020, lambda n: 0.020 + 0.0005 * n, 0.002)
    shape = planner.choose()
    assert shape is not None
    planner.observe_round(shape, accepted=1)
    planner.observe_round_time(shape.budget, shape.depth, 4 * planner.round_seconds(shape.budget, shape.depth))
    assert planner.choose() is None  # at once: the next round is planned anew, without waiting for the replan


def test_the_draft_tokens_cap_bounds_the_tree() -> None:
    planner = _planner(0.235, lambda n: 0.235, 0.001, max_tokens=16)
    shape = planner.choose()
    assert shape is not None and shape.budget <= 16


def test_rounds_that_deliver_fewer_tokens_per_second_than_plain_steps_turn_it_off() -> None:
    """Rounds cost what the model predicts, but accept nothing: their delivered rate is below plain decoding's."""
    planner = _planner(0.020, lambda n: 0.020 + 0.0001 * n, 0.0005)
    shape = planner.choose()
    assert shape is not None
    for _ in range(REPLAN_EVERY):
        planner.observe_round(shape, accepted=0)
        planner.observe_round_time(shape.budget, shape.depth, planner.round_seconds(shape.budget, shape.depth))
    planner.hits.clear()  # forget the acceptance: only the delivered rate is left to say no
    planner.trials.clear()
    assert _replan(planner) is None


def test_a_one_off_slow_pass_does_not_tilt_the_fit() -> None:
    """Streaming, flat: one pass of 256 tokens took 2 s once (a kernel compiled); the others at that size 235 ms."""
    planner = _planner(0.235, lambda n: 0.235, 0.001)
    for seconds in (2.0, 0.235, 0.235):
        planner.observe_pass(256, seconds)
    assert abs(planner.pass_seconds(256) - 0.235) < 0.01
    assert abs(planner.pass_seconds(1) - 0.235) < 0.01


def test_rounds_delivering_less_than_plain_steps_turn_it_off_from_the_next_round() -> None:
    """Each round takes 30 ms for one token where a plain step takes 20: off without waiting for the replan."""
    planner = _planner(0.020, lambda n: 0.020 + 0.0001 * n, 0.0005)
    shape = planner.choose()
    assert shape is not None
    for _ in range(MIN_ROUNDS):
        assert planner.choose() == shape
        planner.observe_round(shape, accepted=0)
        planner.observe_round_time(shape.budget, shape.depth, 0.030)
    assert planner.spec_rate == pytest.approx(1 / 0.030)
    assert planner.choose() is None


def test_the_best_saving_falls_with_the_drafts_cost_and_is_none_for_a_draft_as_big_as_the_target() -> None:
    planner = Planner(256, has_draft_model=True, announce=lambda line: None)
    savings = [planner.best_saving(share) for share in (0.0, 0.01, 0.1, 0.5, 1.0)]
    assert savings == sorted(savings, reverse=True) and len(set(savings)) == len(savings)
    assert 0.5 < savings[0] < 1 and savings[-1] < 0  # at most 1 - 1 / (1 / (1 - alpha)) with the prior's alpha


def test_a_try_while_off_is_worth_making_only_where_a_higher_acceptance_could_pay() -> None:
    """The bundled pair on a 16-core CPU: a pass of 1 token 1.3 ms, of 8 2.1 ms, a draft step 1.08 ms: no chain
    wins even at EXPLORE_ALPHA. A cheaper draft (0.1 ms) would at that acceptance, so a try could find it."""
    grows = lambda n: 0.0013 + 0.000114 * (n - 1)  # noqa: E731
    assert not _planner(0.0013, grows, 0.00108, max_tokens=8).could_pay()
    assert _planner(0.0013, grows, 0.0001, max_tokens=8).could_pay()
