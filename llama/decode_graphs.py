"""Decode steps replayed from CUDA graphs: one capture per step shape and kv-length bucket, static buffers.

Eager decode of one token launches a few hundred small kernels from Python, one after another: a
resident 7B model decoded at 26.7 tok/s on an H200 whose memory reads its weights 350 times a second.
A CUDA graph records a step's kernels once and replays them with one launch. A graph replays fixed
shapes at fixed addresses, so a step reads its inputs from static buffers (token ids, RoPE positions,
cache slots, and for a token tree its mask), writes keys and values at those slots through a BatchStep
(llama/slot_cache.py), and attends over a fixed number of cache positions, a bucket: a power of two from
MIN_BUCKET up to the cache's capacity, positions past the sequence masked (and, with a sliding window,
those before it). Each step also takes the argmax on the device, so greedy decoding copies one token id
back per token.

`capture=False` (the --no_graphs switch) runs the same step op by op, so the tokens are the same either
way: what the numbers depend on is the bucket, not whether the step was captured. Capture is refused,
with one note, when the step synchronizes with the host (bitsandbytes' LLM.int8 finds its outlier
columns there): a warm-up run under torch's sync debug mode finds that before anything is captured.
Outputs of a captured step live in the graph's memory: they are valid until the next step.

Measured (bench/decode_bench.py, H200): the 7B shape decodes at 222 tok/s in fp16 (69% of the HBM limit;
183 with torch's ops in place of llama/fused_ops.py's kernels, 46 op by op) and 491 tok/s in int4 (44%; 317
with torch's ops around our int4 GEMV; 327 in the seventh session with tinygemm's one-row matmul instead).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from llama.kv_cache import KVCache
from llama.model import Transformer
from llama.slot_cache import BatchStep
from llama.tree_rows import TreeRows

MIN_BUCKET = 256  # the smallest kv length a step attends over: short contexts share one graph
MAX_GRAPH_TOKENS = 32  # steps of more tokens (a large token tree) run eagerly: their shapes seldom repeat
EXACT_TREE_STEP = 4  # an exact tree's graphs come in sizes of multiples of this


def kv_bucket(length: int, capacity: int) -> int:
    """The kv length a step needing `length` cached positions attends over: the smallest power of two
    >= length, at least MIN_BUCKET, at most the cache's capacity."""
    if length > capacity:
        raise ValueError(f"KV cache overflow: position {length} > {capacity}")
    return min(capacity, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


@dataclass(frozen=True)
class StepOutput:
    logits: torch.Tensor  # (1, tokens, vocab) in the model's dtype
    argmax: torch.Tensor  # (1, tokens) int64: each position's greedy token (a NaN logit never wins)


@dataclass(frozen=True)
class _Inputs:
    """The static buffers of steps of one token count: (1, tokens) ids, RoPE positions, cache slots, a mask
    (1, tokens, capacity) whose first `bucket` columns a tree step reads, and an exact tree's paths (1, tokens,
    tokens) (llama/tree_rows.py)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor
    paths: torch.Tensor


DECODE, TREE, EXACT_TREE = "decode", "tree", "exact tree"  # what a step runs: one token, a draft's tree, a target's


class DecodeSteps:
    """Steps of a model that is entirely on one CUDA device (or, uncaptured, anywhere) over `cache`."""

    def __init__(
        self, model: Transformer, cache: KVCache, capture: bool, notify: Callable[[str], None] | None = None
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = cache.keys[0].device
        self.capture = capture and self.device.type == "cuda"
        self.notify = notify or (lambda line: print(line, file=sys.stderr))
        self._inputs: dict[int, _Inputs] = {}
        self._graphs: dict[tuple[str, int, int], tuple[torch.cuda.CUDAGraph, StepOutput]] = {}
        self._pool: tuple[int, int] | None = None  # one memory pool for every graph: they never run at once
        self.captured = 0  # graphs captured so far: a step that captured one took a one-off time
        self.cheapest_recording = math.inf  # seconds, the shortest recording of a graph so far
        self.first_capture_seconds = 0.0  # the first capture, warm-up included (libraries set up, kernels loaded)

    @torch.inference_mode()
    def decode(self, token: int, pos: int) -> StepOutput:
        """One token at cache slot and RoPE position `pos`, attending over positions <= pos."""
        inputs = self._buffers(1)
        inputs.tokens.fill_(token)
        inputs.positions.fill_(pos)
        inputs.slots.fill_(pos)
        return self._run(DECODE, 1, kv_bucket(pos + 1, self.cache.max_seq_len))

    @torch.inference_mode()
    def tree(
        self, tokens: list[int], start: int, positions: torch.Tensor, mask: torch.Tensor,
        paths: torch.Tensor | None = None,
    ) -> StepOutput:
        """Nodes of a token tree at cache slots start, start + 1, ...: their RoPE positions (n,) and which of
        the cache positions each sees, mask (n, start + n) bool (llama/speculative/tree.py). paths (n, depth):
        each node's path (tree_paths), for a pass whose every node gets its one-token step's bits.

        A tree that a graph can take is padded (to the next power of two; an exact tree to a multiple of
        EXACT_TREE_STEP), so that a few graphs serve trees of every size: each padding node sees only its own
        slot, past the tree's, and nobody reads its output (the cache holds nothing there that a later step reads
        before writing it)."""
        n, seen = len(tokens), mask.shape[1]
        size = self._tree_size(n, start, paths is not None)
        inputs = self._buffers(size)
        pad = size - n
        inputs.tokens.copy_(torch.tensor([tokens + [0] * pad]), non_blocking=True)
        inputs.positions.copy_(torch.cat([positions, positions.new_full((pad,), start)])[None], non_blocking=True)
        inputs.slots.copy_(torch.arange(start, start + size)[None], non_blocking=True)
        bucket = kv_bucket(start + size, self.cache.max_seq_len)
        inputs.mask[:, :n, :seen].copy_(mask[None], non_blocking=True)
        inputs.mask[:, :n, seen:bucket].fill_(False)
        if pad:
            inputs.mask[:, n:, :bucket].fill_(False)
            inputs.mask[0, torch.arange(n, size), torch.arange(start + n, start + size)] = True  # (pad,): own slots
        if paths is not None:
            own = torch.full((size, size), -1, dtype=torch.int32)
            own[:n, : paths.shape[1]] = paths
            own[n:, 0] = torch.arange(start + n, start + size)  # padding nodes: the context and their own slots
            inputs.paths.copy_(own[None], non_blocking=True)
        out = self._run(TREE if paths is None else EXACT_TREE, size, bucket)
        return StepOutput(out.logits[:, :n], out.argmax[:, :n])

    def _tree_size(self, n: int, start: int, exact: bool) -> int:
        """The token count a tree of n nodes at `start` runs as where a graph would take it (captured or not: the
        tokens must not depend on --no_graphs), else n: the next power of two, or for an exact tree (whose rows
        each cost a matmul call) the next multiple of EXACT_TREE_STEP."""
        size = -(-n // EXACT_TREE_STEP) * EXACT_TREE_STEP if exact else 1 << (n - 1).bit_length()
        return size if size <= MAX_GRAPH_TOKENS and start + size <= self.cache.max_seq_len else n

    def _buffers(self, n: int) -> _Inputs:
        if n not in self._inputs:
            ids = lambda: torch.zeros(1, n, dtype=torch.long, device=self.device)  # noqa: E731
            mask = torch.zeros(1, n, self.cache.max_seq_len, dtype=torch.bool, device=self.device)
            paths = torch.full((1, n, n), -1, dtype=torch.int32, device=self.device)
            self._inputs[n] = _Inputs(ids(), ids(), ids(), mask, paths)
        return self._inputs[n]

    def _step(self, kind: str, n: int, bucket: int) -> StepOutput:
        """The step itself, from the static buffers: what a graph records and what runs uncaptured."""
        inputs = self._inputs[n]
        step = BatchStep(self.cache, inputs.slots, bucket)  # type: ignore[arg-type]  # a KVCache has its tensors
        if kind == EXACT_TREE:
            step.tree_rows = TreeRows(inputs.positions, inputs.paths)
        mask = inputs.mask[:, :, :bucket] if kind != DECODE else step.mask(self.model.args.sliding_window)
        logits = self.model(inputs.tokens, 0, step, positions=inputs.positions, mask=mask)
        return StepOutput(logits, logits.nan_to_num(nan=float("-inf")).argmax(-1))

    def _run(self, kind: str, n: int, bucket: int) -> StepOutput:
        if not self.capture or n > MAX_GRAPH_TOKENS:
            return self._step(kind, n, bucket)
        key = (kind, n, bucket)
        if key not in self._graphs:
            captured = self._capture(kind, n, bucket)
            if captured is None:
                return self._step(kind, n, bucket)
            self._graphs[key] = captured
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _capture(self, kind: str, n: int, bucket: int) -> tuple[torch.cuda.CUDAGraph, StepOutput] | None:
        """Warm up on a side stream (torch's recipe: libraries set up their handles outside the capture),
        watching for host syncs, then record the step. The warm-up writes the same keys and values the
        replay does, so it is harmless."""
        begin = time.perf_counter()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side), _host_syncs_raise():
                self._step(kind, n, bucket)
        except RuntimeError as e:
            torch.cuda.current_stream(self.device).wait_stream(side)
            return self._give_up("the step synchronizes with the host", e)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph, recording = torch.cuda.CUDAGraph(), time.perf_counter()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._step(kind, n, bucket)
        except RuntimeError as e:
            return self._give_up("capturing the step failed", e)
        self._pool = graph.pool()
        if not self.captured:
            self.first_capture_seconds = time.perf_counter() - begin
        self.captured += 1
        self.cheapest_recording = min(self.cheapest_recording, time.perf_counter() - recording)
        return graph, out

    @property
    def capture_estimate(self) -> float:
        """Seconds capturing one more graph would take: its warm-up run and its recording, each about the cheapest
        recording so far (both launch the step's kernels one by one). Not the mean of the captures made: the first
        warm-up of a process also sets up libraries and loads kernels (the 7B twin on the H200: ~0.45 s, later
        captures ~0.07 s), which later captures do not pay again."""
        return 2 * self.cheapest_recording

    def _give_up(self, why: str, error: Exception) -> None:
        self.capture = False
        text = str(error).strip()
        self.notify(f"note: decode steps run without CUDA graphs: {why} ({text.splitlines()[0] if text else type(error).__name__})")


@contextmanager
def _host_syncs_raise() -> Iterator[None]:
    """torch raises on any operation that waits for the device (a capture would fail, or worse, on those)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():  # torch calls the mode a prototype, once per process: not the user's concern
        warnings.simplefilter("ignore")
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
