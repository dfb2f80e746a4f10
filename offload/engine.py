"""The offload front door: plan placement, fill the host store from the checkpoint, attach streaming.

    model, offloaded = build_offloaded_model(model_dir, OffloadConfig(exclusions=frozenset({"w1", "w2", "w3"})))
    logits = model(tokens, start_pos, cache)   # the normal Transformer.forward; KV cache on offloaded.device

Weights arrive one at a time from the checkpoint reader. A block's tensors are gathered until the block
is complete, optionally quantized, then its streamed tensors are copied into one pinned home buffer and
the rest go to the GPU: the model is never held twice in host RAM.
"""
from __future__ import annotations

import copy
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llama.checkpoint_files import Weight
from offload.errors import NoGpu, WeightMismatch
from llama.model import Transformer
from offload.host import HostStore, aligned, page_aligned_empty, pin_buffer, tensor_nbytes
from offload.policy import (
    STREAMABLE,
    Footprint,
    OffloadConfig,
    Plan,
    activation_bytes,
    default_budget,
    plan_placement,
    unit_of,
)
from offload.quant_mode import QuantMode
from offload.streaming import StreamedBlocks, set_tensor

LINK_PROBE_BYTES = 256 * 2**20


def resolve_device(device: torch.device) -> torch.device:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NoGpu("streaming needs a CUDA GPU, and torch.cuda.is_available() is False")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class HostEmbedding(nn.Module):
    """Token embedding kept in host RAM: rows are looked up on the CPU and only they cross the link."""

    def __init__(self, weight: torch.Tensor, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.device = device

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens.cpu(), self.weight)  # (batch, seqlen, dim)
        if self.device.type == "cuda":
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters then buffers, the way a block's tensors are laid out in its home buffer."""
    return itertools.chain(module.named_parameters(), module.named_buffers())


def measure_link_gbps(src: torch.Tensor, device: torch.device, repeats: int = 5) -> float:
    """Host-to-device bandwidth copying `src` (uint8, CPU), median of timed copies, in GB/s."""
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return tensor_nbytes(src) / statistics.median(times) / 1e9


def probe_link_gbps(device: torch.device, pin: bool, nbytes: int = LINK_PROBE_BYTES, repeats: int = 5) -> float:
    """The link's bandwidth from (pinned, if `pin` and possible) host memory, with a probe buffer."""
    probe = page_aligned_empty(nbytes)
    pinned = pin and pin_buffer(probe) == 0
    try:
        return measure_link_gbps(probe, device, repeats)
    finally:
        if pinned:
            torch.cuda.cudart().cudaHostUnregister(probe.data_ptr())


def model_footprint(model: Transformer, config: OffloadConfig) -> Footprint:
    """GPU bytes of each part of the model in the configured dtype and format (from shapes, no data)."""
    args = model.args
    probe = copy.deepcopy(model.layers[0]).to(device="meta", dtype=config.dtype)
    if config.quant:
        # Shapes only; tinygemm's CUDA layout (not made here) takes the same bytes as the portable one.
        quantize_block(probe, config.quant)
    unit_bytes = dict.fromkeys(STREAMABLE, 0)
    other = 0
    for name, t in named_tensors(probe):
        unit = unit_of(name)
        if unit is None:
            other += tensor_nbytes(t)
        else:
            unit_bytes[unit] += aligned(tensor_nbytes(t))
    elem = torch.empty((), dtype=config.dtype).element_size()
    rope = tensor_nbytes(model.rope_cos) + tensor_nbytes(model.rope_sin)
    return Footprint(
        n_blocks=args.n_layers,
        unit_bytes=unit_bytes,
        block_other_bytes=other,
        head_bytes=args.vocab_size * args.dim * elem,
        fixed_bytes=args.dim * elem + rope,
        kv_cache_bytes=args.kv_cache_bytes(config.max_seq_len, config.dtype, config.batch),
        activation_bytes=activation_bytes(args, config.prefill_chunk, config.dtype, config.batch),
    )


def quantize_block(block: nn.Module, quant: QuantMode) -> None:
    """Swap the block's linears for `quant` modules. int4 stays in its plain layout, which streams: on the
    GPU, decode converts it to tinygemm's per call and prefill dequantizes it for cuBLAS (kernels/matmul.py)."""
    from offload.kernels.linear import quantize_linears

    quantize_linears(block, quant, progress=False)


class OffloadedModel:
    """A Transformer whose blocks stream from a HostStore; holds what must outlive the load."""

    def __init__(
        self, model: Transformer, store: HostStore, plan: Plan, config: OffloadConfig, device: torch.device,
        link_gbps: float | None,
    ) -> None:
        self.model = model
        self.store = store
        self.config = config
        self.device = device
        self.link_gbps = link_gbps
        self.plan = plan
        self.streaming: StreamedBlocks | None = None
        self._attach(plan)

    def _attach(self, plan: Plan) -> None:
        streamed: dict[int, list[str]] = {}
        for b in self.store.blocks:
            units = plan.streamed_units(b)
            names = [n for n in self.store.entries(b) if unit_of(n) in units]
            for n in self.store.entries(b):
                if n not in names:
                    set_tensor(self.model.layers[b], n, self.store.view(b, n).to(self.device))
            if names:
                streamed[b] = names
        self.plan = plan
        if streamed:
            self.streaming = StreamedBlocks(
                self.model.layers, self.store, streamed, plan.n_slots, self.device, self.config.sequential
            )

    def replan(self, plan: Plan) -> None:
        """Place the store's tensors anew (more or fewer of them resident) without reloading."""
        if self.streaming is not None:
            self.streaming.detach()
            self.streaming = None
        for b in self.store.blocks:
            for n in self.store.entries(b):
                set_tensor(self.model.layers[b], n, self.store.view(b, n))
        self._attach(plan)

    @property
    def streamed_bytes(self) -> int:
        """Bytes that cross the link per forward pass."""
        return self.streaming.bytes_per_pass if self.streaming is not None else 0

    def close(self) -> None:
        if self.streaming is not None:
            self.streaming.detach()
            self.streaming = None
        self.store.close()


def apply_offload(
    model: Transformer,
    weights: Iterable[tuple[str, torch.Tensor]],
    config: OffloadConfig,
    release: Callable[[str], None] | None = None,
) -> OffloadedModel:
    """Fill a model built on the meta device from (canonical name, tensor) pairs, streaming its blocks.

    Blocks are streamed or resident as the plan says; the token embedding stays in host RAM; the KV
    cache belongs on the returned `.device`. `release(name)` is called once a tensor has been copied
    to its place (the reader can then drop the file pages behind it).
    """
    device = resolve_device(config.device)
    link = probe_link_gbps(device, config.pin) if device.type == "cuda" else None
    footprint = model_footprint(model, config)
    given = config.gpu_mem is not None
    budget = config.gpu_mem if given else (default_budget(device) if device.type == "cuda" else None)
    plan = plan_placement(footprint, budget, config.n_slots, config.exclusions, budget_given=given)
    if config.verbose:
        print(plan.describe(link), file=sys.stderr)
    store = HostStore(pin=config.pin and device.type == "cuda")
    start = time.perf_counter()
    with torch.no_grad():
        _load(model, weights, config, plan, store, device, release or (lambda name: None))
    if config.verbose:
        state = "pinned" if store.pinned else "pageable"
        print(f"host store: {store.nbytes / 1e9:.2f} GB {state} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if device.type == "cuda" and store.blocks and not store.pinned:
        slow = measure_link_gbps(store.buffer(store.blocks[-1]), device)
        tps = plan.predicted_tps(slow)
        print(
            f"warning: streaming from pageable memory at {slow:.1f} GB/s"
            + (f" ({link / slow:.1f}x slower than pinned); predicted {tps:.2f} tokens/s" if link and tps else ""),
            file=sys.stderr,
        )
    return OffloadedModel(model, store, plan, config, device, link)


def _load(
    model: Transformer,
    weights: Iterable[tuple[str, torch.Tensor]],
    config: OffloadConfig,
    plan: Plan,
    store: HostStore,
    device: torch.device,
    release: Callable[[str], None],
) -> None:
    expected = {i: set(block.state_dict(keep_vars=True)) for i, block in enumerate(model.layers)}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    total = sum(math.prod(s) for s in model.args.weight_shapes().values()) * config.dtype.itemsize
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not config.verbose)
    for name, t in weights:
        bar.update(t.numel() * config.dtype.itemsize)
        if name.startswith("layers."):
            index, _, rest = name[len("layers.") :].partition(".")
            i = int(index)
            if i not in expected or rest not in expected[i]:
                raise WeightMismatch(f"unexpected weight {name!r}")
            pending.setdefault(i, {})[rest] = t
            if len(pending[i]) == len(expected[i]):
                done = pending.pop(i)
                names = [f"layers.{i}.{rest}" for rest in done]
                _place_block(model, i, done, config, plan, store, device)
                for n in names:
                    release(n)
        else:
            _place_top_level(model, name, t, config, plan, device)
            release(name)
    bar.close()
    if pending:
        i, got = next(iter(pending.items()))
        raise WeightMismatch(f"missing weight 'layers.{i}.{min(expected[i] - set(got))}'")
    missing = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if missing:
        raise WeightMismatch(f"missing weight {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.rope_cos = model.rope_cos.to(device)
    model.rope_sin = model.rope_sin.to(device)


def _place_block(
    model: Transformer,
    i: int,
    tensors: dict[str, torch.Tensor],
    config: OffloadConfig,
    plan: Plan,
    store: HostStore,
    device: torch.device,
) -> None:
    block = model.layers[i]
    # Quantizing is faster on the GPU; plain blocks go straight from the reader to the home buffer.
    work = device if config.quant else None
    for name, t in tensors.items():
        set_tensor(block, name, t.to(device=work or t.device, dtype=config.dtype if t.is_floating_point() else t.dtype))
    tensors.clear()
    if config.quant:
        quantize_block(block, config.quant)
    units = plan.streamed_units(i)
    streamed = {}
    for name, t in list(named_tensors(block)):
        if unit_of(name) in units:
            streamed[name] = t
        else:
            set_tensor(block, name, t.to(device))
    if streamed:
        store.add_block(i, streamed)
        for name in streamed:
            set_tensor(block, name, store.view(i, name))
    if config.quant is QuantMode.INT4 and device.type == "cuda":
        _prepare_resident_int4(block, units, device)


def _prepare_resident_int4(block: nn.Module, streamed_units: set[str] | frozenset[str], device: torch.device) -> None:
    """Resident int4 linears take tinygemm's layout once (decode ~1.4x faster than converting per call);
    streamed ones keep the plain layout, which also serves prefill through cuBLAS."""
    from offload.kernels.linear import Int4Linear

    for name, module in block.named_modules():
        if isinstance(module, Int4Linear) and unit_of(f"{name}.packed") not in streamed_units:
            module.prepare_for_cuda(device)


def _place_top_level(
    model: Transformer, name: str, t: torch.Tensor, config: OffloadConfig, plan: Plan, device: torch.device
) -> None:
    t = t.to(dtype=config.dtype)
    head_device = device if plan.head_on_gpu else torch.device("cpu")
    if name == "tok_embeddings.weight":
        model.tok_embeddings = HostEmbedding(t.to("cpu"), device)
        if model.args.tie_embeddings:
            set_tensor(model, "output.weight", t.to(head_device))
    elif name == "norm.weight":
        set_tensor(model, name, t.to(device))
    elif name == "output.weight" and not model.args.tie_embeddings:
        set_tensor(model, name, t.to(head_device))
    else:
        raise WeightMismatch(f"unexpected weight {name!r}")


def build_offloaded_model(model_dir: str | Path, config: OffloadConfig) -> tuple[Transformer, OffloadedModel]:
    """Read a checkpoint directory into a streaming model: (the model, its offload state)."""
    from llama.checkpoint import iter_checkpoint, read_model_args

    resolve_device(config.device)  # fail before reading anything
    model_dir = Path(model_dir)
    args = read_model_args(model_dir)
    with torch.device("meta"):
        model = Transformer(args)
    read: dict[str, Weight] = {}

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for w in iter_checkpoint(model_dir, args):
            read[w.name] = w
            yield w.name, w.tensor

    offloaded = apply_offload(model, weights(), config, release=lambda name: read.pop(name).release())
    return model, offloaded
