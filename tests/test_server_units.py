"""Server pieces without HTTP: logit processors, basilisk prompt encoding, --serve parsing."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_tokenizer import train_tiny_sentencepiece

from llama.errors import UserError
from llama.sampling import SamplingParams
from llama.tokenizer import load_tokenizer
from server.app import parse_serve_spec
from server.basilisk import encode_prompt, fragments, newline_ids
from server.sampling_extras import (
    DecayingRepetitionPenalty,
    ExtendedSampler,
    LogitBias,
    PositionalRepetitionPenalty,
    PresenceFrequencyPenalty,
    SuppressTokens,
)

VOCAB = 10


def logits_of(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- logit processors ---------------------------------------------------------------------------------


def test_decaying_repetition_penalty_sustains_then_fades_linearly() -> None:
    logits = torch.full((VOCAB,), 2.0)
    logits[9] = -2.0
    # history, oldest first; distances from the end: 9 -> 0, 3 -> 1, 4 -> 2, 5 -> 3, 6 -> 4, 7 -> 5
    history = [7, 6, 5, 4, 3, 9]
    out = DecayingRepetitionPenalty(penalty=2.0, sustain=2, decay=3)(logits, history, n_new=0)
    # sustain 2: ids 9 and 3 at full strength; decay 3: 4, 5, 6 at strengths 3/4, 2/4, 1/4; 7 is too old
    factors = {9: 2.0, 3: 2.0, 4: 1.75, 5: 1.5, 6: 1.25}
    for token in range(VOCAB):
        f = factors.get(token, 1.0)
        expected = -2.0 * f if token == 9 else 2.0 / f
        assert out[token].item() == pytest.approx(expected), token


def test_decaying_repetition_penalty_uses_the_most_recent_occurrence_and_whole_history() -> None:
    logits = torch.full((VOCAB,), 3.0)
    out = DecayingRepetitionPenalty(2.0, sustain=1, decay=1)(logits, [5, 1, 5], 0)  # 5 is also the last token
    assert out[5].item() == pytest.approx(1.5)
    assert out[1].item() == pytest.approx(3.0 / 1.5)  # strength 1/2 in the decay zone
    everything = DecayingRepetitionPenalty(3.0, sustain=-1, decay=0)(logits, [0, 1, 2, 3], 0)
    assert torch.allclose(everything[:4], torch.full((4,), 1.0)) and torch.allclose(everything[4:], logits[4:])


def test_positional_penalty_hits_ids_of_earlier_replies_at_the_same_position() -> None:
    proc = PositionalRepetitionPenalty.from_replies([[1, 2, 3], [4, 2]], penalty=2.0)
    assert proc.by_position == ((1, 4), (2,), (3,))
    logits = torch.full((VOCAB,), 4.0)
    at0 = proc(logits, [7, 7], n_new=0)
    assert at0[1].item() == at0[4].item() == 2.0 and at0[2].item() == 4.0
    at1 = proc(logits, [7, 7, 1], n_new=1)
    assert at1[2].item() == 2.0 and at1[1].item() == 4.0
    assert torch.equal(proc(logits, [7] * 5, n_new=3), logits)  # past the longest earlier reply


def test_suppress_tokens_until_min_length() -> None:
    proc = SuppressTokens((2, 5), until=2)
    logits = torch.arange(VOCAB, dtype=torch.float32)
    early = proc(logits, [0, 0, 1], n_new=1)
    assert early[2] == -math.inf and early[5] == -math.inf and early[3] == 3.0
    assert torch.equal(proc(logits, [0, 0, 1, 1], n_new=2), logits)


def test_presence_and_frequency_penalties_count_the_reply_only() -> None:
    proc = PresenceFrequencyPenalty(presence=0.5, frequency=1.0)
    out = proc(torch.zeros(VOCAB), [3, 3, 3, 4, 4, 6], n_new=3)  # reply: 4, 4, 6
    assert out[4].item() == pytest.approx(-2.5) and out[6].item() == pytest.approx(-1.5)
    assert out[3].item() == 0.0  # prompt tokens are not counted


def test_logit_bias_adds() -> None:
    out = LogitBias({1: 5.0, 3: -100.0})(torch.ones(VOCAB), [], 0)
    assert out[1].item() == 6.0 and out[3].item() == -99.0 and out[0].item() == 1.0


def test_extended_sampler_applies_processors_before_greedy_choice() -> None:
    greedy = SamplingParams(temperature=0.0, repetition_penalty=1.0)
    logits = logits_of(0.0, 1.0, 9.0, 3.0)
    sampler = ExtendedSampler(greedy, [SuppressTokens((2,), until=1)], prompt_len=2)
    assert sampler.sample(logits, [0, 1]) == 3  # 2 is the argmax but suppressed as the first new token
    assert sampler.sample(logits, [0, 1, 3]) == 2
    biased = ExtendedSampler(greedy, [LogitBias({0: 20.0}), SuppressTokens((0,), until=5)], prompt_len=0)
    assert biased.sample(logits, []) == 2  # suppression comes after the bias


# -- basilisk prompts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(train_tiny_sentencepiece(tmp_path_factory.mktemp("sp")))


def test_stx_etx_become_bos_and_eos_in_place(sp_tokenizer) -> None:
    tok = sp_tokenizer
    ids = encode_prompt("\x02Hello world\x03\x02the cat", tok, special_convert=False)
    hello, cat = tok.encode("Hello world"), tok.encode("the cat")
    assert ids == [tok.bos_id, *hello, tok.eos_id, tok.bos_id, *cat]
    assert encode_prompt("Hello world", tok, special_convert=False) == hello  # no automatic BOS


def test_special_convert_maps_literal_s_tags(sp_tokenizer) -> None:
    tok = sp_tokenizer
    converted = encode_prompt("<s>the cat</s>", tok, special_convert=True)
    assert converted == [tok.bos_id, *tok.encode("the cat"), tok.eos_id]
    literal = encode_prompt("<s>the cat</s>", tok, special_convert=False)
    assert tok.bos_id not in literal and tok.eos_id not in literal
    assert literal == tok.encode("<s>the cat</s>")


def test_fragments_join_to_the_decoded_text(sp_tokenizer) -> None:
    tok = sp_tokenizer
    ids = tok.encode("Café crème, naïve 1234 the fox")
    parts = fragments(ids, tok)
    assert len(parts) == len(ids) and "".join(parts) == tok.decode(ids)
    assert newline_ids(tok) and all(tok.decode([i]) == "\n" for i in newline_ids(tok))


# -- --serve ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [("8000", ("127.0.0.1", 8000)), ("0.0.0.0:8080", ("0.0.0.0", 8080)), ("localhost:1", ("localhost", 1)),
     ("[::1]:9000", ("::1", 9000)), (" 5000 ", ("127.0.0.1", 5000))],
)
def test_parse_serve_spec(spec: str, expected: tuple[str, int]) -> None:
    assert parse_serve_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "host", "host:", "1.2.3.4:70000", "0", "a:b:80", "8000x"])
def test_parse_serve_spec_rejects(spec: str) -> None:
    with pytest.raises(UserError, match="--serve"):
        parse_serve_spec(spec)
