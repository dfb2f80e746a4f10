"""How big a tree to verify per target pass, from what this process measures.

A round costs one target pass over n tree tokens, t(n) = a + b * n (fitted to the tree passes timed so
far: flat while streamed weights dominate, growing on the CPU and when resident), plus the draft's steps
(one per level, timed). It yields E(d, alpha) = (1 - alpha^(d+1)) / (1 - alpha) tokens on average for
a tree of depth d whose nodes the target accepts with probability alpha each (the accepted tokens and
the target's own one after them). alpha is measured per beam width from this conversation's rounds,
counting each level reached as a success and a stop before the full depth as a failure, starting from
an optimistic prior so that a width gets tried. The planner picks the shape of the best E / cost; when
no shape beats plain decoding (1 token per plain step, timed on its own: the one-token decode path is
not the tree path) by MIN_GAIN, speculation is off until that changes.
Each round's wall time is measured too, against what the model above predicted for it: a running mean
of that ratio (one for speculative rounds, one for plain steps) scales the predicted costs, so time the
model does not see (building and verifying the tree, sampling, moving keys, a pass of a few tokens
costing more than the fitted line says) counts, and a plan that only looked good on paper is dropped
at the next replan. Last, the tokens per second that speculative rounds actually delivered (tokens over
seconds of the recent rounds, older ones decayed) must beat plain decoding's: when they do not, speculation
is off from the next round, whatever the model promises.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

MIN_GAIN = 1.05  # a shape must promise this much over plain decoding to be used
PRIOR_TRIALS = 4.0  # weight of the prior acceptance, in levels
PRIOR_ALPHA = 0.6
EXPLORE_ALPHA = 0.9  # the most a chain's level is taken to be accepted when weighing a try while off (the bundled
# pair accepts about 8 tokens a pass on held-out code at depth 12: 0.9 a level)
DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24)
WIDTHS = (1, 2, 4, 8, 16, 32)
DECAY = 0.98  # older rounds count less, so the plan follows the conversation
REPLAN_EVERY = 8  # rounds (or plain steps) between plans
SURPRISE = 1.5  # a round that takes this many times its prediction replans at once
MIN_ROUNDS = 4  # speculative rounds measured before their delivered rate can veto speculation
RATE_DECAY = 0.9  # per speculative round: the delivered rate follows about the last ten
RATIO_WEIGHT = 0.25  # weight of the newest round in the running mean of measured / predicted time


@dataclass(frozen=True)
class TreeShape:
    depth: int
    width: int

    @property
    def budget(self) -> int:
        return 1 + self.depth * self.width  # the root and `width` nodes per level

    def describe(self) -> str:
        return f"chains of {self.depth}" if self.width == 1 else f"trees of depth {self.depth}, width {self.width}"


def expected_tokens(depth: int, alpha: float) -> float:
    """Mean tokens per round: accepted levels (each reached with probability alpha^k) plus the bonus one."""
    return sum(alpha**k for k in range(depth + 1))


class Planner:
    def __init__(
        self,
        max_tokens: int,
        has_draft_model: bool,
        announce: Callable[[str], None],
        fixed: TreeShape | None = None,
    ) -> None:
        self.max_tokens = max_tokens  # --draft_tokens: at most this many tree tokens per pass
        self.fixed = fixed  # measurements (tools/measure_acceptance.py) and tests use one shape throughout
        self.widths = WIDTHS if has_draft_model else (1,)  # prompt lookup proposes few distinct paths
        self.announce = announce
        self.passes: list[tuple[int, float]] = []  # tree passes: (tokens in the pass, seconds), most recent last
        self.plain_passes: list[float] = []  # seconds of one-token decode passes, most recent last
        self.draft_step = 0.0  # seconds per draft level, mean of the timed ones
        self.draft_steps = 0
        # measured / predicted seconds, running mean: {True: speculative rounds, False: plain steps}
        self.time_ratio: dict[bool, float | None] = {True: None, False: None}
        self.spec_rate: float | None = None  # tokens per second that the recent speculative rounds delivered
        self._delivered = (0.0, 0.0)  # their tokens and seconds, decayed
        self.spec_rounds = 0
        self._last_tokens = 1  # tokens the latest round produced (accepted + the target's own)
        self.hits: dict[int, float] = defaultdict(float)  # width -> levels accepted (decayed)
        self.trials: dict[int, float] = defaultdict(float)  # width -> levels tried (decayed)
        self._announced = False
        self._fit: tuple[float, float] | None = None  # (a, b) of t(n), refitted after new passes
        self._plan: TreeShape | None = None
        self._rounds_left = 0  # rounds before the plan is made again

    def needs_probe(self) -> bool:
        return self.fixed is None and (len({n for n, _ in self.passes}) < 2 or not self.plain_passes)

    def observe_pass(self, tokens: int, seconds: float) -> None:
        self.passes = (self.passes + [(tokens, seconds)])[-64:]
        self._fit = None

    def observe_plain_pass(self, seconds: float) -> None:
        self.plain_passes = (self.plain_passes + [seconds])[-16:]

    def plain_seconds(self) -> float:
        """A one-token decode pass: the median of the recent ones."""
        return max(sorted(self.plain_passes)[len(self.plain_passes) // 2], 1e-9)

    def observe_draft(self, steps: int, seconds: float) -> None:
        if steps:
            self.draft_step = (self.draft_step * self.draft_steps + seconds) / (self.draft_steps + steps)
            self.draft_steps += steps

    def round_seconds(self, tokens: int, depth: int) -> float:
        """What the model predicts for a pass of `tokens` after `depth` draft steps (0: a plain step)."""
        if depth == 0:
            return self.plain_seconds()
        return self.pass_seconds(tokens) + depth * self.draft_step

    def observe_round_time(self, tokens: int, depth: int, seconds: float) -> None:
        """A whole round's (depth > 0) or plain step's wall time, after its pass and draft were observed."""
        speculative = depth > 0
        ratio = seconds / self.round_seconds(tokens, depth)
        old = self.time_ratio[speculative]
        self.time_ratio[speculative] = ratio if old is None else old + RATIO_WEIGHT * (ratio - old)
        if speculative and ratio > SURPRISE:
            self._rounds_left = 0  # the plan was made on costs that proved wrong: make it again now
        if speculative:
            tokens, spent = self._delivered
            self._delivered = (RATE_DECAY * tokens + self._last_tokens, RATE_DECAY * spent + seconds)
            self.spec_rate = self._delivered[0] / self._delivered[1]
            self.spec_rounds += 1
            if self._delivery_vetoes():
                self._rounds_left = 0  # speculation delivers less than plain decoding: off from the next round

    def observe_round(self, shape: TreeShape, accepted: int) -> None:
        for width in self.hits:
            self.hits[width] *= DECAY
            self.trials[width] *= DECAY
        self.hits[shape.width] += accepted
        self._last_tokens = accepted + 1
        self.trials[shape.width] += accepted + (accepted < shape.depth)

    def alpha(self, width: int) -> float:
        prior = PRIOR_ALPHA if width == 1 else 1 - (1 - self.alpha(1)) / width**0.5
        return (self.hits[width] + PRIOR_TRIALS * prior) / (self.trials[width] + PRIOR_TRIALS)

    def best_saving(self, draft_share: float) -> float:
        """The share of plain decoding's time speculation could save at best, before anything is measured: passes
        as cheap for a tree as for one token, each draft step costing `draft_share` of a pass, the prior acceptance."""
        cost = lambda depth: 1 + depth * draft_share  # noqa: E731  # a round, in plain passes
        return max(1 - cost(depth) / expected_tokens(depth, PRIOR_ALPHA) for depth in DEPTHS)

    def could_pay(self) -> bool:
        """Whether some chain would beat plain decoding at the measured costs were its levels accepted with
        EXPLORE_ALPHA: where none would (the draft's step costs about what the target's pass does), a try while
        speculation is off cannot find a gain and is not made."""
        plain, spec_ratio = self._plain_rate(), self.time_ratio[True] or 1.0
        return any(expected_tokens(depth, EXPLORE_ALPHA) / (self.round_seconds(1 + depth, depth) * spec_ratio)
                   > plain * MIN_GAIN for depth in DEPTHS if 1 + depth <= self.max_tokens)

    def pass_seconds(self, tokens: int) -> float:
        """t(n) = a + b * n (b >= 0), least squares over the median time of each pass size timed: a one-off
        slow pass (a kernel compiled, a graph captured for a new size) does not tilt the line."""
        if self._fit is None:
            by_size: dict[int, list[float]] = defaultdict(list)
            for n, t in self.passes:
                by_size[n].append(t)
            points = [(n, sorted(ts)[len(ts) // 2]) for n, ts in by_size.items()]
            mean_n, mean_t = sum(n for n, _ in points) / len(points), sum(t for _, t in points) / len(points)
            var = sum((n - mean_n) ** 2 for n, _ in points)
            cov = sum((n - mean_n) * (t - mean_t) for n, t in points)
            slope = max(cov / var, 0.0) if var else 0.0
            self._fit = (mean_t - slope * mean_n, slope)
        a, b = self._fit
        return max(a + b * tokens, 1e-9)

    def choose(self) -> TreeShape | None:
        """The shape to use now, or None for plain decoding; worked out anew every REPLAN_EVERY rounds."""
        if self.fixed is not None:
            return self.fixed
        if self._rounds_left > 0:
            self._rounds_left -= 1
            return self._plan
        self._rounds_left = REPLAN_EVERY - 1
        self._plan = self._best()
        return self._plan

    def _plain_rate(self) -> float:
        """Tokens per second of plain decoding, as measured."""
        return 1.0 / (self.plain_seconds() * (self.time_ratio[False] or 1.0))

    def _delivery_vetoes(self) -> bool:
        return (self.spec_rounds >= MIN_ROUNDS and bool(self.plain_passes) and self.spec_rate is not None
                and self.spec_rate < self._plain_rate() * MIN_GAIN)

    def _best(self) -> TreeShape | None:
        plain = self._plain_rate()
        spec_ratio = self.time_ratio[True] or 1.0
        best, best_rate = None, plain * MIN_GAIN
        for width in self.widths:
            for depth in DEPTHS:
                shape = TreeShape(depth, width)
                if shape.budget > self.max_tokens:
                    break
                cost = self.round_seconds(shape.budget, depth) * spec_ratio
                rate = expected_tokens(depth, self.alpha(width)) / cost
                if rate > best_rate:
                    best, best_rate = shape, rate
        if self._delivery_vetoes():
            best = None  # measured, speculation delivers less than plain decoding here
        if not self._announced:
            self._announced = True
            what = best.describe() if best is not None else "off (plain decoding is faster here)"
            self.announce(
                f"speculation: {what}; target pass {1e3 * self.plain_seconds():.1f} ms for 1 token, "
                f"{1e3 * self.pass_seconds(self.max_tokens):.1f} ms for {self.max_tokens}; "
                f"draft {1e3 * self.draft_step:.2f} ms/step"
            )
        return best
