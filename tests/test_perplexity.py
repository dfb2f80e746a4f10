"""llama.perplexity against a direct computation, and run_perplexity's file handling."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fixtures import random_state, tiny_args
from tiny_tokenizer import CORPUS, train_tiny_sentencepiece

from llama.errors import UserError
from llama.loader import model_from_state
from llama.model import Transformer
from llama.perplexity import perplexity, run_perplexity
from llama.tokenizer import Tokenizer, load_tokenizer

CTX = 16
BOS = 1


@pytest.fixture(scope="module")
def model() -> Transformer:
    args = tiny_args(vocab_size=64, max_seq_len=32)
    return model_from_state(args, random_state(args, seed=3))


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, 64, (3 * CTX + 5,), generator=gen).tolist()  # three chunks and a tail


def direct_perplexity(model: Transformer, tokens: list[int], ctx: int) -> float:
    """Each whole chunk alone, BOS first; positions ctx/2 .. ctx-2 each predict the next token."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - ctx + 1, ctx):
        chunk = tokens[start : start + ctx]
        logprobs = torch.log_softmax(model(torch.tensor([[BOS] + chunk[1:]]))[0].double(), dim=-1)
        for j in range(ctx // 2, ctx - 1):
            nll -= logprobs[j, chunk[j + 1]].item()
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_matches_direct_computation(model: Transformer, tokens: list[int], batch_size: int) -> None:
    expected = direct_perplexity(model, tokens, CTX)
    got = perplexity(model, tokens, CTX, bos_id=BOS, batch_size=batch_size, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_first_half_and_tail_are_not_scored(model: Transformer, tokens: list[int]) -> None:
    base = perplexity(model, tokens, CTX, bos_id=BOS, progress=False)
    changed = list(tokens)
    changed[CTX + 3] = (changed[CTX + 3] + 1) % 64  # a first-half target of chunk 1
    changed[-1] = (changed[-1] + 1) % 64  # the dropped tail
    assert perplexity(model, changed, CTX, bos_id=BOS, progress=False) != base  # it is still context
    only_tail = tokens[:-1] + [(tokens[-1] + 1) % 64]
    assert perplexity(model, only_tail, CTX, bos_id=BOS, progress=False) == base


def test_uniform_model_has_perplexity_of_vocab_size(model: Transformer, tokens: list[int]) -> None:
    args = model.args
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("rope_")}
    state["output.weight"].zero_()  # every logit 0: each token has probability 1 / vocab
    uniform = model_from_state(args, state)
    assert perplexity(uniform, tokens, CTX, bos_id=BOS, progress=False) == pytest.approx(args.vocab_size, rel=1e-6)


def test_bos_replaces_each_chunks_first_token(model: Transformer, tokens: list[int]) -> None:
    with_bos = [BOS if i % CTX == 0 else t for i, t in enumerate(tokens)]
    assert perplexity(model, tokens, CTX, bos_id=BOS, progress=False) == pytest.approx(
        perplexity(model, with_bos, CTX, bos_id=None, progress=False), rel=1e-6
    )


def test_too_few_tokens_or_tiny_ctx(model: Transformer, tokens: list[int]) -> None:
    with pytest.raises(ValueError, match="fewer than one chunk"):
        perplexity(model, tokens[: CTX - 1], CTX, progress=False)
    with pytest.raises(ValueError, match="at least 4"):
        perplexity(model, tokens, 2, progress=False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return load_tokenizer(train_tiny_sentencepiece(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def text_model(tokenizer: Tokenizer) -> Transformer:
    args = tiny_args(vocab_size=tokenizer.vocab_size, max_seq_len=64)
    return model_from_state(args, random_state(args, seed=1))


def test_run_perplexity_prints_result(
    text_model: Transformer, tokenizer: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "text.txt"
    path.write_text(CORPUS * 3)
    ids = tokenizer.encode(CORPUS * 3, bos=True)
    ppl = run_perplexity(text_model, tokenizer, path, ctx=32)
    assert ppl == pytest.approx(perplexity(text_model, ids, 32, bos_id=tokenizer.bos_id, progress=False))
    out = capsys.readouterr()
    assert out.out == f"perplexity: {ppl:.4f} over {len(ids) // 32} chunks of 32 tokens\n"
    assert "perplexity" in out.err  # the progress bar


@pytest.mark.parametrize(
    ("content", "ctx", "message"),
    [
        (None, 32, "file not found"),
        ("  \n\n", 32, "file is empty"),
        (b"\xff\xfe bad", 32, "not UTF-8"),
        ("def f():\n    return 1\n", 32, "fewer than one chunk of --ctx 32"),
        (CORPUS, 65, "^--ctx 65: longer than the model's context of 64"),
        (CORPUS, 2, "^--ctx 2: must be at least 4"),
    ],
)
def test_run_perplexity_user_errors(
    text_model: Transformer, tokenizer: Tokenizer, tmp_path: Path, content: str | bytes | None, ctx: int, message: str
) -> None:
    path = tmp_path / "input.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        run_perplexity(text_model, tokenizer, path, ctx)
    if not message.startswith("^--ctx"):
        assert str(err.value).startswith(f"--ppl {path}: ")
