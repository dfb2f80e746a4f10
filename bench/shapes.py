"""Real model shapes for the CPU benchmarks (random weights of these shapes: speed does not depend on values)."""
from __future__ import annotations

from llama.config import ModelArgs

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M: the model the CPU figures of issue 11 were measured on.
    "smollm2-135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536,
                              rope_theta=100000.0, tie_embeddings=True, max_seq_len=2048),
    # A small Llama of no particular release: quick to build, big enough that weights dominate.
    "small": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=32000, ffn_dim=2048,
                       max_seq_len=1024),
}
