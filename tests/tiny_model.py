"""A tiny random Llama directory (Meta format) with a tiny SentencePiece tokenizer, and an Engine over it."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from fixtures import make_meta_checkpoint, tiny_args
from tiny_tokenizer import train_tiny_sentencepiece

from engine.build import Engine, build_engine
from engine.config import DeviceSpec, RunConfig
from llama.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)


def make_tiny_model_dir(root: Path, ctx: int = 256, name: str = "tiny-llama", **shape: Any) -> Path:
    """shape: ModelArgs overrides (e.g. ffn_dim=256 so that int4's 128-wide groups divide every layer)."""
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    make_meta_checkpoint(tiny_args(vocab_size=400, max_seq_len=ctx, **shape), model_dir)
    train_tiny_sentencepiece(model_dir)
    return model_dir


def build_tiny_engine(root: Path, ctx: int = 256, **overrides: Any) -> Engine:
    """Greedy, on the CPU, float32, unless overridden."""
    cfg = RunConfig(model_dir=make_tiny_model_dir(root, ctx), device=DeviceSpec("cpu"), dtype="float32", ctx=ctx, sampling=GREEDY)
    return build_engine(replace(cfg, **overrides))
