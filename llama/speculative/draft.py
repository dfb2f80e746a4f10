"""A small draft model that grows the token tree from its most probable continuations.

The draft keeps its own KV cache through a Generator (the same prefix reuse as the target's), so each
round it first catches up on the tokens committed since the last one, then expands the tree level by
level: every level is one draft forward of the newest nodes with the tree's attention mask, and keeps
`width` children: the draft's own greedy chain first, then the children with the highest cumulative
draft probability among all children of those nodes (a beam over the tree, as SpecExec grows its tree
from the draft's most probable continuations; keeping the greedy chain, a wider tree never loses what
a chain of the same depth finds).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from llama.decode_graphs import MAX_GRAPH_TOKENS
from llama.generation import Generator, GenerationStats
from llama.speculative.tree import TokenTree, tree_attention


class DraftModel:
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self._ran: set[int] = set()  # nodes of the last tree whose keys are in the draft's cache (slot start + i)
        # Catch-ups of more tokens than a round commits (a new prompt, or speculation was off): a round with one
        # took a one-off time, which the planner must not take for what a round costs.
        self.long_catch_ups = 0

    def propose(self, tree: TokenTree, history: Sequence[int], depth: int, width: int, budget: int) -> None:
        """Add up to `depth` levels of at most `width` nodes each under the root, within `budget` nodes."""
        gen = self.generator
        start = len(history) - 1  # the root's position
        logits = self._catch_up(history)  # (1, vocab): what follows the root
        # The nodes just run, and their cumulative log-probabilities.
        frontier, frontier_logp = [0], torch.zeros(1)
        self._ran = {0}
        for level in range(depth):
            room = min(width, budget - len(tree))
            if room <= 0:
                return
            # (frontier, vocab); the first level's logits may be on the CPU (after a prefill), the others are where
            # the draft runs
            logp = torch.log_softmax(logits.float(), dim=-1) + frontier_logp.to(logits.device)[:, None]
            # The draft's own greedy chain (frontier[0]'s best child) first, then the best of the rest:
            # one copy back per level (the greedy pick, then the top `room` by cumulative probability).
            best = torch.topk(logp.flatten(), min(room, logp.numel())).indices
            chosen = torch.cat([logp[0].argmax()[None], best]).tolist()
            greedy = chosen[0]
            picks = [greedy] + [i for i in chosen[1:] if i != greedy][: room - 1]
            lo = len(tree)
            for flat in picks:  # the draft alone grows the tree here, so every pick is a new node
                tree.add(frontier[flat // logp.shape[1]], flat % logp.shape[1])
            hi = len(tree)
            if level == depth - 1:
                return
            frontier = list(range(lo, hi))
            frontier_logp = logp.flatten()[torch.tensor(picks, device=logp.device)]
            positions, mask = tree_attention(tree, start, lo, hi, gen.model.args.sliding_window)
            logits = gen.tree_logits(tree.tokens[lo:hi], start + lo, positions, mask)  # a captured step when it can be
            self._ran.update(frontier)

    def _catch_up(self, history: Sequence[int]) -> torch.Tensor:
        """Make the draft's cache hold `history` (the root last); the logits (1, vocab) of what follows it.
        A few new tokens (the usual round: the accepted path's deepest and the target's own) run as one chain
        through the decode steps, a captured graph on the GPU; more, or a model with no steps, through prefill."""
        gen = self.generator
        new = list(history[gen.reusable_prefix(history) :])
        far_behind = len(new) > MAX_GRAPH_TOKENS
        self.long_catch_ups += far_behind
        if gen.steps is None or far_behind:
            return gen.prefill(list(history), GenerationStats())[None]
        start = len(history) - len(new)
        chain = TokenTree(new[0])
        chain.add_path(0, new[1:], len(new))
        positions, mask = tree_attention(chain, start, window=gen.model.args.sliding_window)
        logits = gen.tree_logits(new, start, positions, mask)[-1:]
        gen.cached = gen.cached[:start] + new
        return logits

    def accept(self, start: int, nodes: list[int], tree: TokenTree) -> None:
        """Keep the draft's keys of the accepted nodes it ran, so that the next round starts after them."""
        gen = self.generator
        kept = []
        for node in nodes:  # a path: once a node was not run, neither were those below it
            if node not in self._ran:
                break
            kept.append(node)
        gen.cache.keep(start + 1, [start + n for n in kept])
        gen.cached = gen.cached[: start + 1] + [tree.tokens[n] for n in kept]
