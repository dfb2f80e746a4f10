"""Generation over a persistent KV cache: prefix reuse, chunked prefill, stops, limits, interrupts."""
from __future__ import annotations

import pytest
import torch
from tiny_model import GREEDY, build_tiny_engine

from llama.generation import Generation, GenerationStats
from llama.sampling import Sampler
from llama.stop_strings import partial_stop_len


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("gen"))


def _greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation recomputing the whole sequence each step (no cache at all)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_cached_greedy_matches_uncached_recompute(engine):
    prompt = engine.tokenizer.encode("The quick brown fox", bos=True)
    engine.generator.reset()
    out = engine.generator.generate(prompt, Sampler(GREEDY), 24, stop_ids=set())
    assert out.token_ids == _greedy_reference(engine.model, prompt, 24)
    assert out.stats.stop_reason == "length"


def test_chunked_prefill_matches_one_shot(engine):
    prompt = engine.tokenizer.encode("Numbers like 1234567890 and 3.14159 appear in text too. " * 3, bos=True)
    gen = engine.generator
    gen.reset()
    gen.prefill_chunk = 7
    try:
        chunked = gen.generate(prompt, Sampler(GREEDY), 12, stop_ids=set()).token_ids
    finally:
        gen.prefill_chunk = 512
    gen.reset()
    assert chunked == gen.generate(prompt, Sampler(GREEDY), 12, stop_ids=set()).token_ids


@pytest.mark.parametrize("prompt_len", [7, 8, 15, 22])  # chunks of 7: one, one plus one token, ..., four
def test_chunked_prefill_runs_the_head_once_for_the_last_position(engine, prompt_len):
    prompt = [1] + torch.randint(3, 300, (prompt_len - 1,), generator=torch.Generator().manual_seed(prompt_len)).tolist()
    gen = engine.generator
    heads: list[int] = []
    hook = engine.model.output.register_forward_hook(lambda m, args, out: heads.append(args[0].shape[1]))
    gen.reset()
    gen.prefill_chunk = 7
    try:
        logits = gen.prefill(prompt, GenerationStats())
    finally:
        gen.prefill_chunk = 512
        hook.remove()
    assert heads == [1]  # chunks before the last make no logits
    assert gen.cached == prompt
    with torch.inference_mode():
        whole = engine.model(torch.tensor([prompt]))[0, -1].float()
    torch.testing.assert_close(logits, whole, atol=1e-4, rtol=1e-4)


def test_second_request_prefills_only_the_new_tokens(engine):
    gen = engine.generator
    gen.reset()
    first = engine.tokenizer.encode("Hello world, this is", bos=True)
    out = gen.generate(first, Sampler(GREEDY), 5, stop_ids=set())
    follow = first + out.token_ids + engine.tokenizer.encode(" and more")
    again = gen.generate(follow, Sampler(GREEDY), 3, stop_ids=set())
    # The cache held first + all but the last generated token (the last was sampled, never fed).
    assert again.stats.prefilled_tokens == len(follow) - (len(first) + len(out.token_ids) - 1)
    gen.reset()
    assert again.token_ids == gen.generate(follow, Sampler(GREEDY), 3, stop_ids=set()).token_ids


def test_stop_id_ends_generation_without_emitting_it(engine):
    gen = engine.generator
    prompt = engine.tokenizer.encode("A language model reads", bos=True)
    gen.reset()
    free = gen.generate(prompt, Sampler(GREEDY), 10, stop_ids=set()).token_ids
    gen.reset()
    stopped = gen.generate(prompt, Sampler(GREEDY), 10, stop_ids={free[3]})
    assert stopped.token_ids == free[: free.index(free[3])]
    assert stopped.stats.stop_reason == "eos"


def test_stop_string_trims_text_and_streams_nothing_past_it(engine):
    gen = engine.generator
    prompt = engine.tokenizer.encode("Hello", bos=True)
    gen.reset()
    full = gen.generate(prompt, Sampler(GREEDY), 30, stop_ids=set()).text
    stop = full[10:13]
    assert len(stop) == 3 and stop not in full[:10]
    gen.reset()
    result = Generation()
    pieces = list(gen.stream(prompt, Sampler(GREEDY), 30, stop_ids=set(), stop_strings=[stop], result=result))
    assert "".join(pieces) == result.text == full[: full.index(stop)]
    assert result.stats.stop_reason == "stop_string"


def test_partial_stop_suffix_is_held_back():
    assert partial_stop_len("abc</", ["</s>"]) == 2
    assert partial_stop_len("abc", ["</s>"]) == 0
    assert partial_stop_len("ab<", ["<x>", "<"]) == 0 + 1  # "<" alone is a whole stop, "<x>" a partial


def test_should_stop_interrupts_and_keeps_cache_consistent(engine):
    gen = engine.generator
    prompt = engine.tokenizer.encode("The capital of France", bos=True)
    gen.reset()
    calls = iter(range(100))
    out = gen.generate(prompt, Sampler(GREEDY), 50, stop_ids=set(), should_stop=lambda: next(calls) >= 3)
    assert out.stats.stop_reason == "interrupted" and len(out.token_ids) == 4
    assert gen.cached == prompt + out.token_ids[:-1]


def test_prompt_longer_than_context_is_refused(engine):
    with pytest.raises(ValueError, match="does not fit"):
        engine.generator.generate([1] * engine.ctx, Sampler(GREEDY), 4)


def test_max_new_tokens_is_capped_by_the_context(engine):
    gen = engine.generator
    gen.reset()
    prompt = [1] + engine.tokenizer.encode("word " * 200)[: engine.ctx - 6]
    out = gen.generate(prompt, Sampler(GREEDY), 100, stop_ids=set())
    assert len(out.token_ids) == engine.ctx - len(prompt)
