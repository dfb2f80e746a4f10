"""The batch decoder on its own (no HTTP): every request's reply in a batch is the one the Generator gives it
alone, greedy and seeded sampling, with sequences joining, leaving, waiting and being cancelled."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from batch_testing import Listener, Request, alone, decoder_over
from fixtures import random_state, tiny_args
from tiny_model import build_tiny_engine

from llama.model import Transformer
from llama.sampling import SamplingParams
from server.sampling_extras import DecayingRepetitionPenalty, LogitBias, PresenceFrequencyPenalty

CTX = 256
TEXTS = ["the cat", "hello world and more words here", "x", "once upon a time there was a fox",
         "a b c d e f g h", "import os, sys", "The quick brown fox jumps", "def f(x): return x"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("batch"), CTX)


@pytest.fixture(scope="module")
def requests(engine) -> list[Request]:
    """Eight greedy requests of different lengths and limits; some end on a stop string taken from the middle of
    their own unstopped reply, one on EOS ids that include a token it produces."""
    tok = engine.tokenizer
    out = []
    for i, text in enumerate(TEXTS):
        request = Request(tok.encode(text, bos=True), max_new_tokens=6 + 5 * i, stop_ids=set())
        if i % 3 == 1:  # a stop string it reaches: a piece of its own reply's text
            reply = alone(engine.model, tok, request, CTX).text
            request = replace(request, stop_strings=["\x00never", reply[len(reply) // 2 : len(reply) // 2 + 3]])
        if i == 5:  # a stop id it reaches
            request = replace(request, stop_ids={alone(engine.model, tok, request, CTX).token_ids[4]})
        out.append(request)
    return out


def test_eight_greedy_requests_in_a_batch_reply_as_each_alone(engine, requests):
    decoder = decoder_over(engine.model, engine.tokenizer, slots=4, ctx=CTX, prefill_chunk=4)
    jobs = [r.job() for r in requests]
    listeners = [Listener() for _ in jobs]
    for job, listener in zip(jobs, listeners):
        listener.submit(decoder, job)
    decoder.drain()
    assert decoder.largest_batch == 4
    reasons = set()
    for request, job, listener in zip(requests, jobs, listeners):
        want = alone(engine.model, engine.tokenizer, request, CTX)
        assert job.result.token_ids == want.token_ids
        assert job.result.text == want.text == "".join(listener.pieces)
        assert job.result.stats.stop_reason == want.stats.stop_reason
        assert listener.ends == [None]
        reasons.add(want.stats.stop_reason)
    assert reasons == {"length", "stop_string", "eos"}


def test_sequences_join_and_leave_mid_batch(engine, requests):
    """Three slots, five requests: the fourth joins when the first leaves, while the others keep decoding."""
    lengths = [5, 14, 14, 10, 4]
    picked = [replace(requests[i], max_new_tokens=n, stop_strings=[]) for i, n in enumerate(lengths)]
    decoder = decoder_over(engine.model, engine.tokenizer, slots=3, ctx=CTX)
    jobs = [r.job() for r in picked]
    for job in jobs:
        decoder.submit(job)
    index = {id(job): i for i, job in enumerate(jobs)}
    members = []  # after each step: which jobs decode, by index
    while not decoder.idle:
        decoder.step()
        members.append({index[id(seq.job)] for seq in decoder.decoding})
    assert {0, 1, 2} in members
    joined = next(i for i, m in enumerate(members) if 3 in m)
    assert 0 not in members[joined] and {1, 2} <= members[joined]  # 3 took the slot 0 left, beside 1 and 2
    for request, job in zip(picked, jobs):
        assert job.result.token_ids == alone(engine.model, engine.tokenizer, request, CTX).token_ids


def test_seeded_sampling_is_the_same_alone_and_batched(engine):
    tok = engine.tokenizer
    warm = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    extras = [(), (PresenceFrequencyPenalty(0.5, 0.3),), (DecayingRepetitionPenalty(1.3, 8, 4),),
              (LogitBias({5: 2.0}),)]
    requests = [
        Request(tok.encode(TEXTS[i], bos=True), 12 + i, replace(warm, seed=100 + i, top_k=[0, 20][i % 2]),
                processors=extras[i % 4])
        for i in range(6)
    ]
    decoder = decoder_over(engine.model, tok, slots=6, ctx=CTX)
    jobs = [r.job() for r in requests]
    for job in jobs:
        decoder.submit(job)
    decoder.drain()
    assert decoder.largest_batch == 6
    replies = [job.result.token_ids for job in jobs]
    assert replies == [alone(engine.model, tok, r, CTX).token_ids for r in requests]
    assert len({tuple(r) for r in replies}) == len(replies)  # the seeds differ, so do the replies


def test_a_cancelled_sequence_frees_its_slot_for_the_next_in_line_and_the_others_are_unchanged(engine, requests):
    picked = [replace(r, max_new_tokens=20, stop_strings=[]) for r in requests[:3]]
    decoder = decoder_over(engine.model, engine.tokenizer, slots=2, ctx=CTX)
    jobs = [r.job() for r in picked]
    gone = Listener()
    gone.submit(decoder, jobs[0], should_stop=lambda: len(gone.pieces) >= 3)
    for job in jobs[1:]:
        decoder.submit(job)
    while len(gone.pieces) < 3:
        decoder.step()
    assert decoder.waiting == 1 and decoder.running == 2  # all slots taken, the third waits
    decoder.step()  # job 0 leaves at this step, and job 2 takes its slot
    assert jobs[0].result.stats.stop_reason == "interrupted" and gone.ends == [None]
    assert decoder.waiting == 0 and decoder.prefilling is None and len(decoder.decoding) == 2
    decoder.drain()
    assert jobs[0].result.stats.new_tokens < 20
    for request, job in zip(picked[1:], jobs[1:]):
        assert job.result.token_ids == alone(engine.model, engine.tokenizer, request, CTX).token_ids


def test_full_slots_make_requests_wait_first_come_first_served(engine, requests):
    decoder = decoder_over(engine.model, engine.tokenizer, slots=2, ctx=CTX)
    jobs = [replace(r, max_new_tokens=4, stop_strings=[]).job() for r in requests[:6]]
    started: list[int] = []
    for i, job in enumerate(jobs):
        decoder.submit(job, on_text=lambda piece, i=i: started.append(i) if i not in started else None)
    decoder.step()
    assert decoder.stats().running == 1 and decoder.stats().queued == 5
    decoder.step()
    assert decoder.stats().running == 2 and decoder.stats().queued == 4 and decoder.stats().max_batch == 2
    decoder.drain()
    assert started == list(range(6))
    stats = decoder.stats()
    assert stats.running == stats.queued == 0 and stats.decoded_tokens > 0 and stats.decode_tokens_per_s > 0


def test_a_reply_is_counted_done_when_its_client_hears_it_end(engine, requests):
    """A client told its reply ended (the server then answers it) and asking for the load at once sees that
    reply no longer running and all its decoded tokens counted, though the sequence leaves its slot only at
    the next step."""
    decoder = decoder_over(engine.model, engine.tokenizer, slots=2, ctx=CTX)
    jobs = [replace(r, max_new_tokens=n, stop_strings=[]).job() for r, n in zip(requests[:2], (3, 9))]
    seen = []
    for job in jobs:
        decoder.submit(job, on_end=lambda error, job=job: seen.append((job, decoder.stats())))
    decoder.drain()
    (short, at_short_end), (long, at_long_end) = seen
    assert short is jobs[0] and at_short_end.running == 1  # the long one still runs
    assert at_long_end.running == 0
    assert at_long_end.decoded_tokens == sum(len(job.result.token_ids) - 1 for job in jobs)  # firsts: prefill's


def test_a_waiting_request_whose_client_left_never_runs(engine, requests):
    decoder = decoder_over(engine.model, engine.tokenizer, slots=1, ctx=CTX)
    first, second = requests[0].job(), requests[1].job()
    decoder.submit(first)
    listener = Listener()
    listener.submit(decoder, second, should_stop=lambda: True)
    decoder.drain()
    assert second.result.token_ids == [] and second.result.stats.stop_reason == "interrupted"
    assert listener.ends == [None] and listener.pieces == []


def test_a_request_continuing_an_earlier_one_reuses_its_slot(engine):
    tok = engine.tokenizer
    decoder = decoder_over(engine.model, tok, slots=3, ctx=CTX)
    first = Request(tok.encode("once upon a time", bos=True), 8, stop_ids=set())
    other = Request(tok.encode("import os", bos=True), 8, stop_ids=set())
    jobs = [first.job(), other.job()]
    for job in jobs:
        decoder.submit(job)
    decoder.drain()
    turn = first.prompt + jobs[0].result.token_ids + tok.encode(" and then", bos=False)
    follow = Request(turn, 8, stop_ids=set())
    job = follow.job()
    decoder.submit(job)
    decoder.drain()
    # The first reply's last token was never fed, so it is prefilled again with the new tokens.
    assert job.result.stats.prefilled_tokens == len(turn) - len(first.prompt) - 7
    assert job.result.token_ids == alone(engine.model, tok, follow, CTX).token_ids


def test_errors_end_only_the_requests_they_touch(engine, requests):
    class Broken(Exception):
        pass

    def explode(*_):
        raise Broken("sampler")

    decoder = decoder_over(engine.model, engine.tokenizer, slots=3, ctx=CTX)
    good, bad = [replace(r, stop_strings=[]) for r in requests[:2]]
    bad_job = bad.job()
    bad_job.sampler.sample = explode  # type: ignore[method-assign]
    listeners = [Listener(), Listener()]
    listeners[0].submit(decoder, good_job := good.job())
    listeners[1].submit(decoder, bad_job)
    decoder.drain()
    assert isinstance(listeners[1].ends[0], Broken) and listeners[0].ends == [None]
    assert good_job.result.token_ids == alone(engine.model, engine.tokenizer, good, CTX).token_ids


def test_prompts_that_do_not_fit_are_refused(engine):
    decoder = decoder_over(engine.model, engine.tokenizer, slots=1, ctx=CTX)
    with pytest.raises(ValueError, match="empty"):
        decoder.submit(Request([], 4).job())
    with pytest.raises(ValueError, match="does not fit"):
        decoder.submit(Request([1] * CTX, 4).job())


@torch.inference_mode()
def test_sliding_window_model_in_a_batch(engine):
    """Mistral's window and GQA: past the window, each row attends to its own last `window` keys only."""
    args = tiny_args("mistral", vocab_size=engine.args.vocab_size, sliding_window=6, max_seq_len=CTX)
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed=5), strict=False)
    model.eval()
    tok = engine.tokenizer
    requests = [Request(tok.encode(t, bos=True), 16, stop_ids=set()) for t in TEXTS[:4]]
    decoder = decoder_over(model, tok, slots=4, ctx=CTX, prefill_chunk=3)
    jobs = [r.job() for r in requests]
    for job in jobs:
        decoder.submit(job)
    decoder.drain()
    assert [j.result.token_ids for j in jobs] == [alone(model, tok, r, CTX).token_ids for r in requests]

