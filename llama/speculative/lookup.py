"""Prompt-lookup drafting: what followed earlier occurrences of the context's last n tokens.

Code and chat repeat themselves (names, signatures, a function being rewritten), so the tokens that
followed the most recent earlier occurrences of the current suffix are cheap, often right, candidates.
No model runs: the cost is a scan of the recent context.
"""
from __future__ import annotations

from collections.abc import Sequence

from llama.speculative.tree import TokenTree

MAX_NGRAM = 4  # longest suffix looked for; longer matches are tried first
MIN_NGRAM = 2  # a single repeated token predicts too little to be worth verifying
SCAN_TOKENS = 8192  # how far back the context is searched


class PromptLookup:
    def __init__(self, max_paths: int = 4) -> None:
        self.max_paths = max_paths  # distinct continuations added under the root

    def propose(self, tree: TokenTree, history: Sequence[int], depth: int, budget: int) -> None:
        """Add up to max_paths continuations of `depth` tokens under the root (history[-1] is the root)."""
        recent = list(history[-SCAN_TOKENS:])
        found = 0
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(recent) <= n:
                continue
            suffix = recent[-n:]
            # Most recent occurrences first: an earlier match ending at i continues at recent[i + 1].
            for end in range(len(recent) - 2, n - 2, -1):
                if recent[end] != suffix[-1] or recent[end - n + 1 : end + 1] != suffix:
                    continue
                continuation = recent[end + 1 : end + 1 + depth]
                if continuation:
                    before = len(tree)
                    tree.add_path(0, continuation, budget)
                    found += len(tree) > before
                if found >= self.max_paths or len(tree) >= budget:
                    return
