"""Speculative decoding: draft token trees verified by the target in one forward pass.

    tree.py      the token tree, its attention mask and per-token positions
    lookup.py    prompt-lookup drafting (n-grams already in the context)
    draft.py     a small draft model that expands its most probable continuations
    verify.py    greedy and multi-candidate rejection verification of a tree against the target
    planner.py   tree depth and width from measured pass times and observed acceptance
    decoder.py   the decode loop: draft, one target pass, verify, keep the accepted path
"""
