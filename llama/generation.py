"""Token generation over a persistent KV cache: chunked prefill, decode, stops, streaming.

The Generator remembers which tokens its cache holds. A new request shares the longest common
prefix with them, so a chat turn only prefills its new tokens and a rerun of the same prompt
prefills one token. A prompt's chunks before its last run through the blocks only (no norm, no head,
nothing copied back), so the host queues them without waiting for the GPU.

When the whole model sits on one CUDA device, one-token steps (and a draft's token-tree levels) go
through DecodeSteps (llama/decode_graphs.py): replayed CUDA graphs, or with graphs=False the same steps
op by op. Greedy decoding then takes the argmax on the device and copies one token id back per token;
a sampler that needs the distribution gets the logits copied back instead.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Generator as Gen, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from llama.decode_graphs import DecodeSteps
from llama.tree_rows import TreePass, TreeRows, check_dense_rows
from llama.kv_cache import KVCache
from llama.model import Transformer
from llama.sampling import Sampler
from llama.stop_strings import find_stop, partial_stop_len
from llama.tokenizer import StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from llama.speculative.decoder import Speculator


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # tokens of the request
    prefilled_tokens: int = 0  # tokens actually run through prefill (the rest came from the cache)
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # eos | stop_string | length | interrupted
    decode_passes: int = 0  # target forward passes after prefill
    speculative: bool = False  # decoded by verifying draft tokens

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        # The first new token comes out of prefill; decode steps produce the rest.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Mean tokens a decode pass of the target produced (1 without speculation)."""
        return max(self.new_tokens - 1, 0) / self.decode_passes if self.decode_passes else 0.0


@dataclass
class Generation:
    """What one request produced; filled in while streaming."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)


class Generator:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        device: torch.device | str,
        max_seq_len: int,
        cache_dtype: torch.dtype,
        prefill_chunk: int = 512,
        graphs: bool = True,
        notify: Callable[[str], None] | None = None,
        cache: KVCache | None = None,
    ) -> None:
        """graphs: capture decode steps as CUDA graphs when the whole model is on the CUDA device; notify:
        where a note goes if they cannot be captured (default: stderr); cache: default, a cache of its own
        (the server passes one slot of its many)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.cache = cache if cache is not None else KVCache(model.args, max_seq_len, cache_dtype, self.device)
        self.cached: list[int] = []  # tokens whose keys/values are in the cache, in order
        self.speculator: Speculator | None = None  # set when a draft source is configured
        self._dense_rows_checked = False  # check_dense_rows ran (before the first exact tree pass)
        self.steps = DecodeSteps(model, self.cache, graphs, notify) if _all_on_cuda(model, self.device) else None

    def reset(self) -> None:
        self.cached = []

    def next_token(self, sampler: Sampler, history: list[int]) -> int:
        """history[-1] run at its slot, len(history) - 1: the next token as plain decoding picks it (greedy: the
        device's argmax, where the step takes one)."""
        pos = len(history) - 1
        if self.steps is not None and is_greedy(sampler):
            chosen = self.steps.decode(history[-1], pos).argmax
            self.cached = self.cached[:pos] + [history[-1]]
            return int(chosen[0, -1])  # the one copy back (and the wait for the step)
        return sampler.sample(self._forward([history[-1]], pos), history)

    def warm_up(self) -> None:
        """Do now, as part of loading, what would slow the first reply: capture the first bucket's decode step;
        or, for a CUDA model not wholly on the GPU (streamed), load the CUDA libraries and kernels a prefill and
        a decode step use (a cold first prefill of 3900 tokens lost ~0.27 s to that on the H200, the link idle
        meanwhile, whatever the model's depth). Either writes cache slots that hold nothing yet."""
        self.cached = []
        if self.steps is not None:
            self.steps.decode(0, 0)
        elif self.device.type == "cuda":
            self._warm_first_block()

    @torch.inference_mode()
    def _warm_first_block(self) -> None:
        """A chunk at position 0, a chunk after it (masked attention) and a one-token step through the first block
        alone, and the head once: every kind of kernel of a pass, for the price of a few block copies (the ring
        restarts at the next whole pass)."""
        n = min(self.prefill_chunk, (self.max_seq_len - 1) // 2)
        if n < 1:
            return
        chunk = self._tokens([0] * n)
        for start, tokens in ((0, chunk), (n, chunk), (2 * n, self._tokens([0]))):
            self.model.fill_cache(tokens, start, self.cache, blocks=1)
        norm = self.model.norm.weight
        self.model.logits(torch.zeros(1, 1, norm.shape[0], dtype=norm.dtype, device=norm.device))
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def _forward(self, ids: list[int], start_pos: int) -> torch.Tensor:
        """Run ids at start_pos through the model; return the last position's logits (vocab,) in float32."""
        if len(ids) == 1 and self.steps is not None:
            logits = self.steps.decode(ids[0], start_pos).logits
        else:
            logits = self.model(self._tokens(ids), start_pos, self.cache, last_only=True)
        self.cached = self.cached[:start_pos] + ids  # only after the forward completed
        return logits[0, -1].float().cpu()

    @torch.inference_mode()
    def _fill(self, ids: list[int], start_pos: int) -> None:
        """Run a prompt chunk whose logits nobody reads: keys and values only, and no wait for the GPU, so the
        next chunk's work is queued while this one runs (a streamed model's copies never pause between them)."""
        self.model.fill_cache(self._tokens(ids), start_pos, self.cache)
        self.cached = self.cached[:start_pos] + ids

    def _tokens(self, ids: list[int]) -> torch.Tensor:
        """ids as a (1, n) tensor where the embedding table is: a host-held one (streaming) looks them up on the
        CPU, so they never make a round trip through the GPU (whose copy back would wait for all queued work)."""
        return torch.tensor([ids], dtype=torch.long, device=self.model.tok_embeddings.weight.device)

    @torch.inference_mode()
    def tree_logits(
        self, tokens: list[int], start: int, positions: torch.Tensor, mask: torch.Tensor,
        paths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (n, vocab), on the device, of token-tree nodes at cache slots start, start + 1, ... with RoPE
        positions (n,) and mask (n, start + n) (llama/speculative/tree.py); valid until the next forward. paths
        (n, depth), the nodes' tree_paths: each node's logits are the bits of its one-token step (on the GPU the
        pass runs as llama/tree_rows.py says; the CPU's kernels give those bits anyway)."""
        keys = self.cache.keys[0]
        exact = paths is not None and keys.is_cuda
        if exact and not self._dense_rows_checked:
            check_dense_rows(self.model, keys.dtype, keys.device)
            self._dense_rows_checked = True
        if self.steps is not None:
            return self.steps.tree(tokens, start, positions, mask, paths).logits[0]
        cache = TreePass(self.cache, TreeRows(positions[None].to(keys.device), paths[None].to(keys.device))) if exact \
            else self.cache
        return self.model(self._tokens(tokens), start, cache, positions=positions, mask=mask)[0]

    def reusable_prefix(self, prompt: Sequence[int]) -> int:
        """How many of prompt's first tokens the cache already holds, leaving at least one to run (for logits)."""
        common = 0
        for a, b in zip(self.cached, prompt):
            if a != b:
                break
            common += 1
        return min(common, len(prompt) - 1)

    def prefill(self, prompt: list[int], stats: GenerationStats) -> torch.Tensor:
        """Make the cache hold `prompt`, reusing the common prefix; return the next-token logits."""
        common = self.reusable_prefix(prompt)
        self.cached = self.cached[:common]
        start = time.perf_counter()
        last = common + (len(prompt) - 1 - common) // self.prefill_chunk * self.prefill_chunk  # the final chunk's start
        for pos in range(common, last, self.prefill_chunk):
            self._fill(prompt[pos : pos + self.prefill_chunk], pos)
        logits = self._forward(prompt[last:], last)
        self._sync()
        stats.prefill_seconds = time.perf_counter() - start
        stats.prefilled_tokens = len(prompt) - common
        return logits

    def stream(
        self,
        prompt: list[int],
        sampler: Sampler,
        max_new_tokens: int,
        stop_ids: set[int] | None = None,
        stop_strings: list[str] | None = None,
        result: Generation | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Yield text pieces of the reply as they become final. `result` collects ids, text and stats.

        A KeyboardInterrupt (or should_stop() turning true) ends the reply early; the tokens made so
        far stay in `result` and in the cache, so the conversation stays consistent.
        """
        result = result if result is not None else Generation()
        stats = result.stats
        stats.prompt_tokens = len(prompt)
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_seq_len}")
        stop_ids = stop_ids if stop_ids is not None else self.tokenizer.stop_ids
        stop_strings = [s for s in (stop_strings or []) if s]
        max_new_tokens = min(max_new_tokens, self.max_seq_len - len(prompt))
        decoder = StreamDecoder(self.tokenizer)
        held = ""  # text not yet yielded because it may be the start of a stop string
        history = list(prompt)
        start = time.perf_counter()
        tokens: Gen[int, None, None] | None = None
        try:
            logits = self.prefill(prompt, stats)
            start = time.perf_counter()
            tokens = self._decode_tokens(logits, sampler, history, stats, max_new_tokens)
            for token in tokens:
                if token in stop_ids:
                    stats.stop_reason = "eos"
                    break
                result.token_ids.append(token)
                history.append(token)
                stats.new_tokens += 1
                held += decoder.push(token)
                hit = find_stop(held, stop_strings)
                if hit is not None:
                    held = held[:hit]
                    stats.stop_reason = "stop_string"
                    break
                safe = len(held) - partial_stop_len(held, stop_strings)
                if safe > 0:
                    result.text += held[:safe]
                    yield held[:safe]
                    held = held[safe:]
                if stats.new_tokens >= max_new_tokens:
                    stats.stop_reason = "length"
                    break
                if should_stop is not None and should_stop():
                    stats.stop_reason = "interrupted"
                    break
        except KeyboardInterrupt:
            stats.stop_reason = "interrupted"
        finally:
            if tokens is not None:
                tokens.close()
            self.cached = self.cached[: len(history)]  # a verified path may reach past the last token kept
            self._sync()
            if stats.new_tokens:
                stats.decode_seconds = time.perf_counter() - start
        if stats.stop_reason != "stop_string":
            held += decoder.flush()
        if held:
            result.text += held
            yield held

    def _decode_tokens(
        self, logits: torch.Tensor, sampler: Sampler, history: list[int], stats: GenerationStats,
        budget: int | None = None,
    ) -> Gen[int, None, None]:
        """The reply's tokens; each is fed to the model only when the caller asks for the one after it. budget: the
        most the caller will take (None: no limit but the context)."""
        if self.speculator is not None and self.speculator.applies(sampler):
            stats.speculative = True
            yield from self.speculator.tokens(self, logits, sampler, history, stats, budget)
            return
        token = sampler.sample(logits, history)
        if self.steps is not None and is_greedy(sampler):
            yield from self._greedy_on_device(token, history, stats)
            return
        while True:
            yield token
            logits = self._forward([token], len(history) - 1)
            stats.decode_passes += 1
            token = sampler.sample(logits, history)

    def _greedy_on_device(self, token: int, history: list[int], stats: GenerationStats) -> Gen[int, None, None]:
        """Greedy decoding whose argmax is taken by the step on the device: one token id crosses back per token."""
        assert self.steps is not None
        while True:
            yield token
            pos = len(history) - 1  # the caller appended `token`: it goes to this slot
            chosen = self.steps.decode(token, pos).argmax
            self.cached = self.cached[:pos] + [token]
            stats.decode_passes += 1
            token = int(chosen[0, -1])  # the one copy back (and the wait for the step)

    def generate(self, prompt: list[int], sampler: Sampler, max_new_tokens: int, **kwargs) -> Generation:
        result = Generation()
        for _ in self.stream(prompt, sampler, max_new_tokens, result=result, **kwargs):
            pass
        return result


def _all_on_cuda(model: Transformer, device: torch.device) -> bool:
    """Whether every weight and table of the model is on one CUDA device (a streamed or host-held part is not,
    nor a model split across GPUs: a graph records one device's work)."""
    places = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    return device.type == "cuda" and len(places) == 1 and places.pop().type == "cuda"


def is_greedy(sampler: Sampler) -> bool:
    """The sampler takes the plain argmax of the logits (no penalty that would change them first)."""
    p = sampler.params
    return p.temperature == 0.0 and (p.repetition_penalty == 1.0 or p.repetition_window == 0)
