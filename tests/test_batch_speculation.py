"""Batching and speculation take turns: a sequence decoding alone verifies token trees, a batch decodes plainly,
and greedy replies are the plain ones either way."""
from __future__ import annotations

import pytest
from batch_testing import Request, alone
from speculative_testing import speculating
from tiny_model import build_tiny_engine, make_tiny_model_dir

from llama.batch_decoder import BatchDecoder
from llama.speculative.planner import TreeShape

CTX = 256
PROMPTS = ["The quick brown fox jumps over the lazy dog. The quick brown fox",
           "Hello world, this is a tiny corpus. Hello world, this", "a b c a b c a b"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """Speculating with a draft of the target's own weights (it proposes what the target picks) and lookup."""
    root = tmp_path_factory.mktemp("batch-spec")
    engine = build_tiny_engine(root, CTX, max_batch=3)
    return speculating(engine, TreeShape(4, 1), draft=make_tiny_model_dir(root), lookup=True)


@pytest.fixture(scope="module")
def requests(engine) -> list[Request]:
    return [Request(engine.tokenizer.encode(p, bos=True), 12 + 8 * i, stop_ids=set()) for i, p in enumerate(PROMPTS)]


def test_a_lone_sequence_speculates_and_replies_as_plain_decoding(engine, requests):
    decoder = BatchDecoder(engine.generator, engine.kv)
    job = requests[0].job()
    decoder.submit(job)
    decoder.drain()
    assert job.result.stats.speculative and job.result.stats.tokens_per_pass > 1.0
    assert job.result.token_ids == alone(engine.model, engine.tokenizer, requests[0], CTX).token_ids


def test_a_batch_decodes_plainly_and_the_last_one_left_speculates(engine, requests):
    decoder = BatchDecoder(engine.generator, engine.kv)
    jobs = [r.job() for r in requests]
    for job in jobs:
        decoder.submit(job)
    decoder.drain()
    assert decoder.largest_batch == 3
    assert jobs[-1].result.stats.speculative  # the longest ends alone, verifying trees
    for request, job in zip(requests, jobs):
        assert job.result.token_ids == alone(engine.model, engine.tokenizer, request, CTX).token_ids
