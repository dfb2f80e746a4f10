"""The bundled model (models/pytiny): complete, small, and as good on held-out text as its card says."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import random_state

from llama.checkpoint import read_model_args
from llama.loader import load_model, model_from_state
from llama.model import Transformer
from llama.perplexity import perplexity
from llama.tokenizer import Tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "pytiny"
HELDOUT = ROOT / "data" / "heldout_stdlib.txt"
RECORD = json.loads((MODEL_DIR / "eval.json").read_text())


@pytest.fixture(scope="module")
def model() -> Transformer:
    return load_model(MODEL_DIR, torch.float32, "cpu")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(MODEL_DIR)


@pytest.fixture(scope="module")
def heldout_ids(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(HELDOUT.read_text(encoding="utf-8"), bos=True)


def test_directory_is_complete_small_and_gqa() -> None:
    files = ("config.json", "model.safetensors", "tokenizer.model")
    assert sum((MODEL_DIR / f).stat().st_size for f in files) <= 30 * 10**6
    args = read_model_args(MODEL_DIR)
    n_params = sum(math.prod(shape) for shape in args.weight_shapes().values())
    assert 10e6 <= n_params <= 15e6
    assert args.n_kv_heads < args.n_heads
    assert 4096 <= args.vocab_size <= 8192


def test_tokenizer_round_trips_code(tokenizer: Tokenizer) -> None:
    text = HELDOUT.read_text(encoding="utf-8")
    assert tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert "<0x0A>" in {tokenizer.id_to_piece(i) for i in tokenizer.encode("a\n\tb")}  # newline: a byte piece


def test_heldout_perplexity_matches_record(model: Transformer, tokenizer: Tokenizer, heldout_ids: list[int]) -> None:
    ctx = RECORD["ctx"]
    ids = heldout_ids[: RECORD["prefix_chunks"] * ctx]
    ppl = perplexity(model, ids, ctx, bos_id=tokenizer.bos_id, batch_size=4, progress=False)
    assert ppl == pytest.approx(RECORD["prefix_perplexity"], rel=0.01)
    random_model = model_from_state(model.args, random_state(model.args, seed=0))
    random_ppl = perplexity(random_model, ids[: 2 * ctx], ctx, bos_id=tokenizer.bos_id, progress=False)
    assert random_ppl > model.args.vocab_size / 4  # an untrained model knows nothing
    assert ppl < random_ppl / 20


def test_card_states_the_recorded_perplexity() -> None:
    card = (MODEL_DIR / "MODEL_CARD.md").read_text()
    assert f"{RECORD['perplexity']:.2f}" in card
    assert "PSF" in card


def test_completes_python(model: Transformer, tokenizer: Tokenizer) -> None:
    prompt = "class Point:\n    def __init__("
    logits = model(torch.tensor([tokenizer.encode(prompt, bos=True)]), last_only=True)
    assert tokenizer.decode([int(logits[0, -1].argmax())]) == "self"
