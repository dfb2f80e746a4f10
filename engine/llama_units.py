"""The units a Llama block streams in: the seven linears the --offload_exclusion flag names, and where
each sits inside a TransformerBlock. Imports no torch (the flag is checked before anything loads)."""
from __future__ import annotations

# unit name (Meta's) -> submodule path inside one block
BLOCK_LINEARS = {
    "wq": "attention.wq",
    "wk": "attention.wk",
    "wv": "attention.wv",
    "wo": "attention.wo",
    "w1": "feed_forward.w1",
    "w2": "feed_forward.w2",
    "w3": "feed_forward.w3",
}
