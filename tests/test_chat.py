"""The chat session: cache reuse across turns, context overflow, interrupted and failed turns."""
from __future__ import annotations

import pytest
from tiny_model import GREEDY, build_tiny_engine

from llama.chat import ChatSession
from llama.chat_format import Message
from llama.errors import UserError
from llama.generation import Generation
from llama.sampling import Sampler


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("chat"), ctx=160)


def _turn(session: ChatSession, text: str, n: int = 6) -> Generation:
    result = Generation()
    for _ in session.reply(text, Sampler(GREEDY), n, result):
        pass
    return result


def test_second_turn_prefills_only_its_new_tokens(engine):
    engine.generator.reset()
    session = ChatSession(engine.generator, engine.chat_format, system="You are brief.")
    first = _turn(session, "hello there")
    assert first.stats.prefilled_tokens == first.stats.prompt_tokens
    reply_ids = list(first.token_ids)
    second = _turn(session, "how are you today")
    followup = engine.chat_format.encode_followup(Message("user", "how are you today"))
    # New tokens: the last reply token (sampled, never fed) plus the follow-up that closes it and asks again.
    expected = 1 + len(followup) if first.stats.stop_reason == "length" else len(followup)
    assert second.stats.prefilled_tokens == expected
    assert session.ids[: second.stats.prompt_tokens][-len(followup) :] == followup
    assert reply_ids == session.exchanges[0].reply_ids


def test_reply_matches_a_fresh_session_given_the_same_dialog(engine):
    engine.generator.reset()
    session = ChatSession(engine.generator, engine.chat_format)
    _turn(session, "hello there")
    continued = _turn(session, "tell me a story")
    fresh_prompt = session.ids[: continued.stats.prompt_tokens]
    engine.generator.reset()
    again = engine.generator.generate(fresh_prompt, Sampler(GREEDY), 6, stop_ids=engine.chat_format.stop_ids | engine.tokenizer.stop_ids)
    assert again.token_ids == continued.token_ids


def test_overflow_drops_oldest_exchanges_with_a_notice(engine):
    engine.generator.reset()
    notices: list[str] = []
    session = ChatSession(engine.generator, engine.chat_format, notify=notices.append)
    long_message = "The quick brown fox jumps over the lazy dog. " * 3
    for _ in range(8):
        out = _turn(session, long_message, n=10)
        assert out.stats.prompt_tokens + 10 <= engine.ctx
    assert notices and "dropped the oldest" in notices[0]
    assert 1 <= len(session.exchanges) < 8


def test_message_too_long_for_the_context_fails_and_keeps_the_conversation(engine):
    engine.generator.reset()
    session = ChatSession(engine.generator, engine.chat_format)
    _turn(session, "hello there")
    before = (list(session.ids), list(session.exchanges))
    with pytest.raises(UserError, match="longer than the context"):
        _turn(session, "word " * 400)
    assert (session.ids, session.exchanges) == before
    assert _turn(session, "and now?").token_ids


def test_interrupted_reply_is_kept_in_the_dialog(engine):
    engine.generator.reset()
    session = ChatSession(engine.generator, engine.chat_format)
    stream = session.reply("hello there", Sampler(GREEDY), 20, result := Generation())
    next(stream)
    next(stream)
    stream.close()  # what the console does on Ctrl-C between pieces
    assert session.exchanges[0].reply_ids == result.token_ids and result.token_ids
    assert session.ids[-len(result.token_ids) :] == result.token_ids
    follow = _turn(session, "go on")
    assert follow.stats.prefilled_tokens < follow.stats.prompt_tokens
