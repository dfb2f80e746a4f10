"""The speculative decode loop: draft a tree, run it through the target in one pass, keep what verifies.

Tokens come out one at a time, and a round runs only when the caller asks for a token past the ones
already verified, so every stop (EOS, stop strings, the token limit, an interrupt) acts at the exact
token, inside an accepted path too. Between rounds the target's cache holds the committed tokens
(all but the last one, which is the next tree's root), exactly as after plain decoding; the caller
trims `generator.cached` to the tokens it kept.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from llama.config import ModelArgs
from llama.sampling import Sampler
from llama.sampling_params import SamplingParams
from llama.speculative.draft import DraftModel
from llama.speculative.lookup import PromptLookup
from llama.speculative.planner import DEPTHS, Planner, TreeShape
from llama.speculative.tree import TokenTree, tree_attention, tree_paths
from llama.speculative.verify import verify_tree

if TYPE_CHECKING:
    from llama.generation import GenerationStats, Generator

EXPLORE_EVERY = 32  # while speculation is off, try one small round after this many plain tokens,
MAX_EXPLORE_EVERY = 512  # twice as many after each try that leaves it off (a try first catches the draft up);
# a try is made only where a higher acceptance could make speculation pay (Planner.could_pay)
PROBE_AFTER = 16  # plain tokens (timed) before the first probe: a short reply pays nothing for speculation,
PROBE_SECONDS = 0.5  # unless they took this long already (a streamed or large model: speculation pays at once)
# Starting speculation costs once (the probe, the tree steps' graphs, the draft's catch-up on the context); it starts
# only when the tokens ahead could repay that PAYBACK times over at the best saving the planner's prior allows
# (Planner.best_saving). The cost, estimated:
START_PASSES = 6  # the probe's 3-4 passes, the large ones up to 2.5 plain passes each (CPU: 2.3);
START_PASSES_STREAMED = 3  # a streamed target's probe: 3 passes, each as dear as one token's (the link dominates),
START_GRAPHS = 10  # graphs (the target's tree steps of 4 and 8 tokens, the draft's), each at the target's estimate,
# and the first uses of the tree steps' and the draft's kernels, as long as the target's first capture took (H200, the
# 7B twin resident: first capture 1.0 s; a start's probe 0.4-1.1 s, the draft's first prefill 0.1-0.2 s)
PAYBACK = 2.0  # (H200, the 7B twin resident: 10 captures in one 96-token reply, 0.74 s more than plain decoding)
GREEDY_DRAFT = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.0))  # times the draft's step, drawing
# nothing from the reply's sampler


class Speculator:
    def __init__(
        self,
        draft: DraftModel | None,
        lookup: PromptLookup | None,
        planner: Planner,
        announce: Callable[[str], None],
    ) -> None:
        self.draft = draft
        self.lookup = lookup
        self.planner = planner
        self.announce = announce
        self._said_mirostat = False
        self._pass_seconds = 0.0  # the latest tree pass
        self._explore_every = EXPLORE_EVERY  # plain tokens between tries while speculation is off
        self.decoded = 0  # tokens given out, over all replies
        self._said_waiting = False
        self._starts: bool | None = None  # this reply's start verdict, once made
        self._step_share: float | None = None  # a draft step over a plain pass, once estimated
        # Where the speculative rounds' time went, summed (benchmarks report it): drafting, the target's tree
        # passes, whole rounds (the rest is verifying, moving keys, sampling).
        self.spent = {"draft": 0.0, "target": 0.0, "round": 0.0, "rounds": 0.0}

    def applies(self, sampler: Sampler) -> bool:
        if sampler.params.mirostat and sampler.params.temperature > 0:
            if not self._said_mirostat:
                self._said_mirostat = True
                self.announce("speculation: off with Mirostat (its state depends on every token drawn)")
            return False
        return True

    def tokens(
        self, gen: Generator, logits: torch.Tensor, sampler: Sampler, history: list[int], stats: GenerationStats,
        budget: int | None = None,
    ) -> Iterator[int]:
        """Next tokens; `history` grows by each one (the caller appends it) before the next is asked for. budget: the
        most the caller will take (None: no limit but the context)."""
        pending = [sampler.sample(logits, history)]
        plain_run = 0
        self._starts = None
        end = None if budget is None else self.decoded + budget  # self.decoded when the caller has taken them all
        while True:
            for token in pending:
                self.decoded += 1
                yield token
            start = len(history) - 1  # the root (history[-1]) goes to this slot; the cache holds the rest
            begin, one_offs = time.perf_counter(), self._one_offs(gen)
            if self.planner.needs_probe():
                early = plain_run < PROBE_AFTER and sum(self.planner.plain_passes) < PROBE_SECONDS
                if early or not self._start_pays(gen, history, stats, end):
                    plain_run += 1
                    pending = [self._plain_token(gen, sampler, history)]
                    stats.decode_passes += 1
                    continue
                self._probe(gen, history, start)
                plain_run = 0
                begin, one_offs = time.perf_counter(), self._one_offs(gen)
            shape = self.planner.choose()
            if shape is not None:
                self._explore_every = EXPLORE_EVERY
            elif plain_run >= self._explore_every:
                plain_run = 0
                self._explore_every = min(2 * self._explore_every, MAX_EXPLORE_EVERY)
                if self.planner.could_pay():
                    shape = TreeShape(2, 1)
            tree = TokenTree(history[-1])
            if shape is not None:
                self._draft(gen, tree, history, shape)
            drafted = time.perf_counter()
            if len(tree) == 1:
                plain_run += 1
                pending = [self._plain_token(gen, sampler, history)]
            else:
                pending = self._verify(gen, tree, sampler, history, start, shape)
            depth = shape.depth if shape is not None and len(tree) > 1 else 0
            seconds = time.perf_counter() - begin
            if self._one_offs(gen) == one_offs:
                self.planner.observe_round_time(len(tree), depth, seconds)
            if depth:
                self._account(drafted - begin, seconds)
            stats.decode_passes += 1

    def _start_pays(self, gen: Generator, history: list[int], stats: GenerationStats, end: int | None) -> bool:
        """Whether the tokens ahead could repay what starting speculation costs: this reply's remaining ones and as
        many as were decoded before it (a conversation that has gone on is taken to go on). Decided once a reply:
        the tokens ahead stay the same while it goes on (one fewer left, one more decoded)."""
        if not self.planner.plain_passes:
            return False
        if self._starts is None:
            self._starts = self._decide_start(gen, history, stats, end)
        return self._starts

    def _decide_start(self, gen: Generator, history: list[int], stats: GenerationStats, end: int | None) -> bool:
        if end is None:
            return True
        left = min(end - self.decoded, gen.max_seq_len - len(history))
        ahead_seconds = (left + self.decoded) * self.planner.plain_seconds()
        cost = self._start_seconds(gen, history, stats)
        if ahead_seconds * self.planner.best_saving(self._draft_step_share(gen, history)) >= PAYBACK * cost:
            return True
        if not self._said_waiting:
            self._said_waiting = True
            self.announce(f"speculation: not started yet (starting costs about {1e3 * cost:.0f} ms, more than "
                          f"{left} tokens left can repay)")
        return False

    def _start_seconds(self, gen: Generator, history: list[int], stats: GenerationStats) -> float:
        """What starting speculation would cost, estimated before it starts: the probe's passes, the graphs of tree
        steps (at the target's estimate of a capture) and the first uses of their kernels, the draft's catch-up on
        the context (a prefill at the target's prefill rate of this reply, scaled by the draft's share of the
        weights)."""
        streamed = gen.steps is None and gen.device.type == "cuda"
        seconds = (START_PASSES_STREAMED if streamed else START_PASSES) * self.planner.plain_seconds()
        steps = gen.steps
        if steps is not None and steps.capture and steps.captured:
            seconds += START_GRAPHS * steps.capture_estimate + steps.first_capture_seconds
        if self.draft is not None and stats.prefilled_tokens:
            behind = len(history) - self.draft.generator.reusable_prefix(history)
            seconds += behind * stats.prefill_seconds / stats.prefilled_tokens * self._draft_weight_share(gen)
        return seconds

    def _draft_weight_share(self, gen: Generator) -> float:
        """The draft model's weights over the target's (0 without one): about what its prefill costs in the target's."""
        if self.draft is None:
            return 0.0
        return _weights(self.draft.generator.model.args) / _weights(gen.model.args)

    def _draft_step_share(self, gen: Generator, history: list[int]) -> float:
        """What a draft step costs in plain passes, estimated once: timed where a step costs only itself (the draft's
        steps are not captured graphs, whose capture would cost more than the step: the CPU), else its share of the
        weights (a step reading its weights once, as the graphs' steps do). A small draft on the CPU is bound by its
        per-layer overhead, not its weights: the bundled pair's draft step took 0.47-0.83 of a plain pass, its
        weights 0.24."""
        if self._step_share is None:
            self._step_share = self._draft_weight_share(gen)
            draft = self.draft.generator if self.draft is not None else None
            if draft is not None and (draft.steps is None or not draft.steps.capture):
                self._step_share = max(self._step_share, _timed_draft_step(draft, history) / self.planner.plain_seconds())
        return self._step_share

    def _one_offs(self, gen: Generator) -> int:
        """Graphs the target's and the draft's decode steps have captured so far, and the draft's long catch-ups:
        a round with one took a one-off time, which the planner does not take for a round's cost."""
        steps = [gen.steps, self.draft.generator.steps if self.draft is not None else None]
        catch_ups = self.draft.long_catch_ups if self.draft is not None else 0
        return catch_ups + sum(s.captured for s in steps if s is not None)

    def _account(self, draft_seconds: float, round_seconds: float) -> None:
        spent = self.spent
        spent["draft"] += draft_seconds
        spent["target"] += self._pass_seconds  # the round's tree pass, timed by _timed
        spent["round"] += round_seconds
        spent["rounds"] += 1

    def _draft(self, gen: Generator, tree: TokenTree, history: list[int], shape: TreeShape) -> None:
        begin, one_offs = time.perf_counter(), self._one_offs(gen)
        room = gen.max_seq_len - (len(history) - 1)
        budget = min(shape.budget, room)
        if self.draft is not None:
            self.draft.propose(tree, history, shape.depth, shape.width, budget)
        if self.lookup is not None:  # after the draft, so that its paths never block the draft's
            extra = shape.depth * self.lookup.max_paths if self.draft is not None else 0
            self.lookup.propose(tree, history, shape.depth, min(budget + extra, room, self.planner.max_tokens))
        if self._one_offs(gen) == one_offs:
            self.planner.observe_draft(shape.depth, time.perf_counter() - begin)

    def _verify(
        self, gen: Generator, tree: TokenTree, sampler: Sampler, history: list[int], start: int, shape: TreeShape
    ) -> list[int]:
        positions, mask = tree_attention(tree, start, window=gen.model.args.sliding_window)
        logits = self._timed(self._tree_pass, len(tree), gen, tree, start, positions, mask)  # (nodes, vocab)
        nodes, bonus = verify_tree(tree, logits, sampler, history)
        gen.cached = gen.cached[:start] + [history[-1]]  # the root's keys are at its slot
        gen.cache.keep(start + 1, [start + n for n in nodes])
        gen.cached += [tree.tokens[n] for n in nodes]
        if self.draft is not None:
            self.draft.accept(start, nodes, tree)
        self.planner.observe_round(shape, len(nodes))
        return [tree.tokens[n] for n in nodes] + [bonus]

    @staticmethod
    def _tree_pass(
        gen: Generator, tree: TokenTree, start: int, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The tree's logits (nodes, vocab) on the CPU, each node's the bits of its one-token step (so greedy speculation
        gives plain greedy's tokens): a captured step when the target is resident and the tree small."""
        return gen.tree_logits(tree.tokens, start, positions, mask, tree_paths(tree, start)).float().cpu()

    def _plain_token(self, gen: Generator, sampler: Sampler, history: list[int]) -> int:
        """The next token through the plain decode path (what decoding without speculation costs), timed."""
        begin, one_offs = time.perf_counter(), self._one_offs(gen)
        token = gen.next_token(sampler, history)
        if self._one_offs(gen) == one_offs:
            self.planner.observe_plain_pass(time.perf_counter() - begin)
        return token

    def _timed(self, fn: Callable[..., torch.Tensor], n: int, gen: Generator, *args: object) -> torch.Tensor:
        begin, one_offs = time.perf_counter(), self._one_offs(gen)
        out = fn(gen, *args)  # on the CPU: the device has finished
        self._pass_seconds = time.perf_counter() - begin
        if self._one_offs(gen) == one_offs:
            self.planner.observe_pass(n, self._pass_seconds)
        return out

    def _probe(self, gen: Generator, history: list[int], start: int) -> None:
        """Time tree passes of 2 tokens and of the most the planner may use, at the current position (the
        tree's keys are overwritten by the next round), then a draft step; the plain passes before it were
        timed already. The two sizes lie far apart, so the slope of pass time in tokens is not a few
        milliseconds of noise divided by a few tokens. Each size runs once untimed first where that first run
        is slow: the large one always (a kernel chosen or compiled for its shape), the small one where the
        target's steps are captured graphs."""
        room = gen.max_seq_len - start
        small, large = min(2, room), min(self.planner.max_tokens, room)
        runs = [(large, False), (small, True), (large, True)]
        if gen.steps is not None:
            runs.insert(0, (small, False))
        for size, timed in runs:
            tree = _probe_tree(history[-1], size)
            positions, mask = tree_attention(tree, start, window=gen.model.args.sliding_window)
            if timed:
                self._timed(self._tree_pass, size, gen, tree, start, positions, mask)
            else:
                self._tree_pass(gen, tree, start, positions, mask)
        self._draft(gen, TokenTree(history[-1]), history, TreeShape(2, 1))  # the draft's step time too, after a warm-up
        self.planner.draft_step, self.planner.draft_steps = 0.0, 0
        for _ in range(2):  # from a run that captured no graph
            self._draft(gen, TokenTree(history[-1]), history, TreeShape(2, 1))
            if self.planner.draft_steps:
                break


def _timed_draft_step(draft: Generator, history: list[int]) -> float:
    """Seconds of the draft's one-token step at the context's end, the second of two (the first may set up kernels).
    The draft has run nothing yet (it starts with the probe), so its cache is left empty again."""
    seconds = 0.0
    for _ in range(2):
        begin = time.perf_counter()
        draft.next_token(GREEDY_DRAFT, history)
        seconds = time.perf_counter() - begin
    draft.reset()
    return seconds


def _weights(args: ModelArgs) -> int:
    return sum(math.prod(shape) for shape in args.weight_shapes().values())


def _probe_tree(root: int, size: int) -> TokenTree:
    """A tree of `size` nodes no deeper than the planner's deepest shape: chains of DEPTHS[-1] tokens under the
    root (their first tokens 0, 1, ... tell them apart), as a planned tree's attention sees paths no longer than
    that (one chain of `size` nodes would time paths of `size` slots a query)."""
    tree = TokenTree(root)
    for chain in range(size):
        tree.add_path(0, [chain] + [root] * (DEPTHS[-1] - 1), size)
        if len(tree) >= size:
            break
    return tree
