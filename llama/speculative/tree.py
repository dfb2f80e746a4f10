"""A token tree: candidate continuations of the last sampled token, verified in one forward pass.

Node 0 is the root, the last token sampled (not yet in the cache). Nodes are numbered in insertion
order, so a parent always precedes its children. Run as one pass at cache position `start`, node i
goes to cache slot start + i and has RoPE position start + depth(i): every node sees the committed
context (slots < start) and its own ancestors, never a sibling's branch.
"""
from __future__ import annotations

import numpy as np
import torch


class TokenTree:
    def __init__(self, root: int) -> None:
        self.tokens = [root]
        self.parents = [-1]
        self.depths = [0]
        self.children: list[dict[int, int]] = [{}]  # per node: token -> child node, in insertion order
        self.lineage = [1]  # per node: a bitset of itself and its ancestors (bit j: node j)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int) -> int:
        """The child of `parent` holding `token`, added if it is not there yet."""
        child = self.children[parent].get(token)
        if child is None:
            child = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1)
            self.children.append({})
            self.children[parent][token] = child
            self.lineage.append(self.lineage[parent] | 1 << child)
        return child

    def add_path(self, parent: int, tokens: list[int], budget: int) -> None:
        """Add a chain of tokens under `parent` while the tree has fewer than `budget` nodes."""
        for token in tokens:
            if token not in self.children[parent] and len(self) >= budget:
                return
            parent = self.add(parent, token)

    def path_tokens(self, node: int) -> list[int]:
        """Tokens from the root's first child down to `node` (empty for the root)."""
        out = []
        while node > 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]

    def ancestors(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """(hi - lo, hi) bool: [i, j] is True when node j is node lo + i or one of its ancestors."""
        hi = len(self) if hi is None else hi
        width = (hi + 7) // 8
        rows = b"".join(bits.to_bytes(width, "little") for bits in self.lineage[lo:hi])
        bits = np.unpackbits(np.frombuffer(rows, np.uint8).reshape(hi - lo, width), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :hi].astype(bool))


def tree_attention(
    tree: TokenTree, start: int, lo: int = 0, hi: int | None = None, window: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions (hi - lo,) and attention mask (hi - lo, start + hi) for nodes lo..hi-1 of `tree`.

    The nodes before lo must already be in the cache at their slots (a draft expands a tree level by
    level). With a sliding window, a query at position p sees keys at positions > p - window only.
    """
    hi = len(tree) if hi is None else hi
    depths = torch.tensor(tree.depths[:hi])
    positions = start + depths[lo:]  # (hi - lo,)
    context = torch.ones(hi - lo, start, dtype=torch.bool)
    mask = torch.cat([context, tree.ancestors(lo, hi)], dim=1)  # (hi - lo, start + hi)
    if window is not None:
        key_pos = torch.cat([torch.arange(start), start + depths])  # (start + hi,)
        mask &= key_pos[None, :] > positions[:, None] - window
    return positions, mask


def tree_paths(tree: TokenTree, start: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """(hi - lo, depth) int32: for nodes lo..hi-1 of `tree` run at cache position `start`, the slots of the node
    and its ancestors, the node first (entry j holds RoPE position start + depth(node) - j), -1 past the root.
    With these, attention sees each node as the one-token step at its position (llama/fused_ops.py)."""
    hi = len(tree) if hi is None else hi
    depth = 1 + max(tree.depths[lo:hi])
    rows = []  # built as lists, one tensor at the end: a round's tree pass waits for this on the host
    for node in range(lo, hi):
        row = []
        while node >= 0:
            row.append(start + node)
            node = tree.parents[node]
        rows.append(row + [-1] * (depth - len(row)))
    return torch.tensor(rows, dtype=torch.int32)
