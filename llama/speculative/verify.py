"""Which path of a token tree the target accepts, and the target's own token after it.

Both rules walk down from the root. At each node the target's logits (that node's row of the tree
pass) go through the sampler's processors with the history extended by the path so far, exactly as
plain decoding would see them at that position, so repetition penalties act along the path.

Greedy: the target's token is sampler.sample() (the argmax); the walk follows the child holding it.
That is plain greedy decoding, token for token, as long as the tree pass gives the same logits.

Sampling: the children of a node are fixed candidates c1, c2, ... (not draws), so each is tried by
rejection against a point-mass proposal (SpecInfer's multi-candidate rule with q = delta(c)): with r the
target's distribution p, accept c_j with probability r(c_j) / sum(r); if rejected set r(c_j) = 0 and try
the next; when all are rejected, draw from r / sum(r). The token that comes out has distribution p:
P(c1) = p(c1), P(c2) = (1 - p(c1)) * p(c2) / (1 - p(c1)) = p(c2), ..., and any other x is drawn from the
rest in proportion to p(x). Accepting moves the walk to that child, where the rule repeats with the
target's distribution given the path; the next token is therefore drawn from p given the tokens before
it at every step, which is the target's distribution for the whole sequence.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from llama.sampling import Sampler
from llama.speculative.tree import TokenTree


def verify_tree(
    tree: TokenTree, logits: torch.Tensor, sampler: Sampler, history: Sequence[int]
) -> tuple[list[int], int]:
    """(accepted nodes below the root, in path order; the target's token after the last of them).

    logits: (len(tree), vocab) from the tree pass; history: the tokens up to and including the root.
    """
    greedy = sampler.params.temperature == 0.0
    path: list[int] = []
    node = 0
    while True:
        context = list(history) + [tree.tokens[n] for n in path]
        children = tree.children[node]
        if greedy:
            token = sampler.sample(logits[node], context)
            child = children.get(token)
        else:
            token, child = _rejection_step(logits[node], sampler, context, children)
        if child is None:
            return path, token
        path.append(child)
        node = child


def _rejection_step(
    logits: torch.Tensor, sampler: Sampler, context: list[int], children: dict[int, int]
) -> tuple[int, int | None]:
    """One node's draw: (token, the child holding it or None), the token distributed as the target's."""
    probs, ids = sampler.distribution(logits, context)
    residual = torch.zeros(logits.numel(), dtype=torch.float64).index_add_(0, ids, probs.double())  # (vocab,)
    for token, child in children.items():
        total = float(residual.sum())
        mass = float(residual[token])
        if mass > 0 and float(torch.rand((), generator=sampler.generator)) * total < mass:
            return token, child
        residual[token] = 0.0
    token = int(torch.multinomial(residual, 1, generator=sampler.generator))
    return token, None
