"""The inflated twin (tools/inflate_model.py) predicts what the model it was made from predicts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures import random_state, tiny_args

from engine.config import BUNDLED_MODEL
from llama.checkpoint import read_model_args
from llama.loader import load_model, model_from_state
from llama.tokenizer import load_tokenizer
from tools.inflate_model import inflate, inflate_dir


def _logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens]))[0].float()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_twin_of_a_random_model_gives_its_logits(arch: str) -> None:
    small = tiny_args(arch)  # qwen2: GQA and q/k/v biases
    state = random_state(small, seed=3)
    big_state, big = inflate(state, small, dim=128, n_layers=4, ffn_dim=256, dtype=torch.float32, seed=1)
    assert (big.dim, big.n_layers, big.ffn_dim, big.n_kv_heads) == (128, 4, 256, 128 // small.head_dim)
    tokens = torch.randint(0, small.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = _logits(model_from_state(small, state), tokens)
    got = _logits(model_from_state(big, big_state), tokens)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_extra_blocks_are_real_work() -> None:
    """The appended blocks carry random weights of the full shape (they cost what real blocks cost)."""
    small = tiny_args()
    big_state, big = inflate(random_state(small), small, dim=128, n_layers=3, ffn_dim=256, dtype=torch.float32)
    w1 = big_state["layers.2.feed_forward.w1.weight"]
    assert w1.shape == (256, 128) and (w1 != 0).float().mean() > 0.99
    assert 0 < big_state["layers.2.attention.wo.weight"].abs().max() < 1e-4


def test_twin_of_the_bundled_model_predicts_what_the_bundled_model_predicts(tmp_path: Path) -> None:
    """Written to disk and read back as a user would: the same next token at every position of real code."""
    out = tmp_path / "twin"
    big = inflate_dir(BUNDLED_MODEL, out, dim=448, n_layers=7, ffn_dim=1152, dtype=torch.float32)
    assert read_model_args(out) == big and (out / "tokenizer.model").is_file()
    tokenizer = load_tokenizer(out / "tokenizer.model")
    tokens = tokenizer.encode("import os\n\ndef read_lines(path):\n    with open(path) as f:\n        return f.read()\n")
    ref = _logits(load_model(BUNDLED_MODEL), tokens)
    got = _logits(load_model(out), tokens)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
