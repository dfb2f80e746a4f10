"""The one placement path: plan where each part of a model lives, then put every weight there as it arrives.

    off = apply_offload(layout, footprint, weights, OffloadConfig(exclusions=frozenset({"w1", "w2", "w3"})))
    logits = layout.root(tokens, start_pos, cache)   # the model's own forward; KV cache on off.device
    place_model(layout, resident_plan(layout.units, len(layout.blocks)), weights, config)   # nothing streams

Weights arrive one at a time from a reader. A block's tensors are gathered until the block is complete,
optionally quantized, then each tensor goes where the plan puts its unit: streamed ones into one pinned
home buffer, the rest to the device, so the model is never held twice in host RAM. Top-level tensors go
where the plan puts their Part (a streaming plan keeps the embedding in host RAM). Every load takes this
path: streamed, resident, quantized here, or arriving quantized. The model is known only through its
ModelLayout (offload/layout.py).
"""
from __future__ import annotations

import copy
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from offload.errors import NoGpu, WeightMismatch
from offload.host import HostStore, aligned, tensor_nbytes
from offload.layout import ModelLayout, Part
from offload.link import measure_link_gbps, probe_link_gbps
from offload.policy import Footprint, OffloadConfig, Plan, default_budget, plan_placement
from offload.split import SplitPlan
from offload.quant_mode import QuantMode
from offload.streaming import StreamedBlocks, is_parameter, set_tensor


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


def block_unit_bytes(layout: ModelLayout, config: OffloadConfig) -> tuple[dict[str, int], int]:
    """One block's bytes per unit (as laid out in a slot) and the rest of it, in the configured dtype and
    format, from shapes alone (blocks are alike)."""
    probe = copy.deepcopy(layout.blocks[0]).to(device="meta")
    for name, t in list(probe.named_parameters()):  # cast as place_block casts: parameters, not formats' buffers
        if t.is_floating_point():
            set_tensor(probe, name, t.to(config.dtype))
    if config.quant:
        # Shapes only; tinygemm's CUDA layout (not made here) takes the same bytes as the portable one.
        quantize_block(probe, config.quant)
    unit_bytes = dict.fromkeys(layout.units, 0)
    other = 0
    for name, t in named_tensors(probe):
        unit = layout.unit_of(name)
        if unit is None:
            other += tensor_nbytes(t)
        else:
            unit_bytes[unit] += aligned(tensor_nbytes(t))
    return unit_bytes, other


def quantize_block(block: nn.Module, quant: QuantMode) -> None:
    """Swap the block's linears for `quant` modules. int4 stays in its plain layout, which streams: on the
    GPU, decode converts it to tinygemm's per call and prefill dequantizes it for cuBLAS (kernels/matmul.py)."""
    from offload.kernels.linear import quantize_linears

    quantize_linears(block, quant, progress=False)


def prepare_resident_int4(block: nn.Module, is_streamed: Callable[[str], bool], device: torch.device) -> None:
    """Resident int4 linears are prepared once (Int4Linear.prepare_for_cuda: kept plain for our one-token
    kernel, else tinygemm's layout, decode ~1.4x faster than converting per call); streamed ones keep the
    plain layout, which also serves prefill through the Triton kernel."""
    from offload.kernels.linear import Int4Linear

    for name, module in block.named_modules():
        if isinstance(module, Int4Linear) and not is_streamed(f"{name}.packed"):
            module.prepare_for_cuda(device)


class OffloadedModel:
    """A model whose blocks stream from a HostStore; holds what must outlive the load."""

    def __init__(
        self, layout: ModelLayout, store: HostStore, plan: Plan, config: OffloadConfig, device: torch.device,
        link_gbps: float | None,
    ) -> None:
        self.layout = layout
        self.store = store
        self.config = config
        self.device = device
        self.link_gbps = link_gbps
        self.plan = plan
        self.streaming: StreamedBlocks | None = None
        # The load put exactly the plan's streamed tensors in the store: all of them stream.
        self._stream({b: list(store.entries(b)) for b in store.blocks})

    def _stream(self, streamed: dict[int, list[str]]) -> None:
        if streamed:
            self.streaming = StreamedBlocks(
                self.layout.blocks, self.store, streamed, self.plan.n_slots, self.device, self.config.sequential
            )

    def replan(self, plan: Plan) -> None:
        """Place the store's tensors anew without reloading: a plan may keep more of them resident (what it
        streams must be among what the load put in the store)."""
        if self.streaming is not None:
            self.streaming.detach()
            self.streaming = None
        streamed: dict[int, list[str]] = {}
        for b in self.store.blocks:
            units = plan.streamed_units(b)
            block = self.layout.blocks[b]
            for n in self.store.entries(b):
                if self.layout.unit_of(n) in units:
                    streamed.setdefault(b, []).append(n)
                    set_tensor(block, n, self.store.view(b, n))
                else:
                    set_tensor(block, n, self.store.view(b, n).to(self.device))
        self.plan = plan
        self._stream(streamed)

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
    layout: ModelLayout,
    footprint: Footprint,
    weights: Iterable[tuple[str, torch.Tensor]],
    config: OffloadConfig,
    release: Callable[[str], None] | None = None,
) -> OffloadedModel:
    """Fill a model built on the meta device from (name, tensor) pairs, streaming its blocks.

    The plan comes from the GPU budget: blocks are streamed or resident as it says, the embedding stays in
    host RAM, the KV cache belongs on the returned `.device`. The plan's prefill chunk
    (`off.plan.prefill_chunk`) is the largest whose activations fit the budget. `release` as in place_model.
    """
    device = resolve_device(config.device)
    link = probe_link_gbps(device, config.pin) if device.type == "cuda" else None
    given = config.gpu_mem is not None
    budget = config.gpu_mem if given else (default_budget(device) if device.type == "cuda" else None)
    plan = plan_placement(footprint, budget, config.n_slots, config.exclusions, budget_given=given)
    if config.verbose:
        print(plan.describe(link), file=sys.stderr)
    return place_model(layout, plan, weights, config, release, link=link)


def place_model(
    layout: ModelLayout,
    plan: Plan,
    weights: Iterable[tuple[str, torch.Tensor]],
    config: OffloadConfig,
    release: Callable[[str], None] | None = None,
    finish_block: Callable[[nn.Module], object] | None = None,
    link: float | None = None,
) -> OffloadedModel:
    """Fill a model built on the meta device from (name, tensor) pairs, each part where `plan` puts it (a
    streaming plan, or resident_plan: everything on the device).

    Each block, once complete, is cast, quantized if config.quant says so, placed, handed to
    `finish_block` if the plan keeps it whole on the device (a resident run fuses projections there), and
    its resident int4 linears take tinygemm's layout. `release(name)` is called once a tensor has been
    copied to its place (the reader can then drop the file pages behind it); a tensor the model keeps
    using as it came (a CPU run in the file's dtype) is not released.
    """
    device = resolve_device(config.device)
    store = fill_model(layout, plan, weights, config, (device,) * len(layout.blocks), release, finish_block)
    if device.type == "cuda" and store.blocks and not store.pinned:
        slow = measure_link_gbps(store.buffer(store.blocks[-1]), device)
        tps = plan.predicted_tps(slow)
        print(
            f"warning: streaming from pageable memory at {slow:.1f} GB/s"
            + (f" ({link / slow:.1f}x slower than pinned); predicted {tps:.2f} tokens/s" if link and tps else ""),
            file=sys.stderr,
        )
    return OffloadedModel(layout, store, plan, config, device, link)


def fill_model(
    layout: ModelLayout,
    plan: Plan | SplitPlan,
    weights: Iterable[tuple[str, torch.Tensor]],
    config: OffloadConfig,
    block_devices: Sequence[torch.device],
    release: Callable[[str], None] | None = None,
    finish_block: Callable[[nn.Module], object] | None = None,
) -> HostStore:
    """place_model's filling, block i on block_devices[i] (the embedding's rows and the RoPE tables go to the
    first device, the head and the final norm to the last): the HostStore holding the streamed tensors."""
    store = HostStore(pin=config.pin and block_devices[0].type == "cuda", fill=config.fill)
    start = time.perf_counter()
    with torch.no_grad():
        _load(layout, weights, config, plan, store, block_devices, release or (lambda name: None), finish_block)
    if config.verbose and store.blocks:
        state = "pinned" if store.pinned else "pageable"
        seconds = time.perf_counter() - start
        print(f"host store: {store.nbytes / 1e9:.2f} GB {state} in {seconds:.1f} s "
              f"({store.nbytes / 1e9 / max(seconds, 1e-9):.1f} GB/s)", file=sys.stderr)
    return store


def _load(
    layout: ModelLayout,
    weights: Iterable[tuple[str, torch.Tensor]],
    config: OffloadConfig,
    plan: Plan | SplitPlan,
    store: HostStore,
    block_devices: Sequence[torch.device],
    release: Callable[[str], None],
    finish_block: Callable[[nn.Module], object] | None,
) -> None:
    root = layout.root
    expected = {i: set(block.state_dict(keep_vars=True)) for i, block in enumerate(layout.blocks)}
    distinct = {id(t): t for t in root.state_dict(keep_vars=True).values()}.values()  # a tied weight once
    doing = "loading weights" + (f" and quantizing them to {config.quant.value}" if config.quant else "")
    pending: dict[int, dict[str, torch.Tensor]] = {}
    prefixes: dict[int, str] = {}  # block index -> what its tensors' full names start with
    total = sum(t.numel() for t in distinct) * config.dtype.itemsize
    # A context: an error mid-load ends the bar's line before the message is printed.
    with tqdm(total=total, unit="B", unit_scale=True, desc=doing, disable=not config.verbose) as bar:
        for name, t in weights:
            bar.update(t.numel() * config.dtype.itemsize)
            where = layout.block_tensor(name)
            if where is None:
                source = t.data_ptr()
                _place_top_level(layout, name, t, config, plan, block_devices)
                del t
                if source not in _host_pointers(named_tensors(root)):
                    release(name)
                continue
            i, inner = where
            if i not in expected or inner not in expected[i]:
                raise WeightMismatch(f"unexpected weight {name!r}")
            pending.setdefault(i, {})[inner] = t
            prefixes[i] = name[: len(name) - len(inner)]
            if len(pending[i]) == len(expected[i]):
                done = pending.pop(i)
                sources = {prefixes[i] + n: s.data_ptr() for n, s in done.items()}
                place_block(layout, i, done, config, plan, store, block_devices[i], finish_block)
                kept = _host_pointers(named_tensors(layout.blocks[i]))
                for n, source in sources.items():
                    if source not in kept:
                        release(n)
    if pending:
        i, got = next(iter(pending.items()))
        raise WeightMismatch(f"missing weight {prefixes[i] + min(expected[i] - set(got))!r}")
    missing = [n for n, t in named_tensors(root) if t.is_meta]
    if missing:
        raise WeightMismatch(f"missing weight {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for name, t in root.named_buffers():  # tables the model made itself (RoPE): on the GPU of the first block
        if layout.block_tensor(name) is None and not name.startswith(f"{layout.embedding_module}."):
            set_tensor(root, name, t.to(block_devices[0]))


def _host_pointers(tensors: Iterable[tuple[str, torch.Tensor]]) -> set[int]:
    """Where the host-held tensors start: a source among them is used as it came and must not be released."""
    return {t.data_ptr() for _, t in tensors if t.device.type == "cpu" and not t.is_meta}


def place_block(
    layout: ModelLayout,
    i: int,
    tensors: dict[str, torch.Tensor],
    config: OffloadConfig,
    plan: Plan | SplitPlan,
    store: HostStore,
    device: torch.device,
    finish_block: Callable[[nn.Module], object] | None = None,
) -> None:
    """Put one complete block where the plan says: cast its parameters (the buffers of a format that arrived
    quantized keep their dtypes), quantize (on the GPU when there is one: faster), then each tensor to the home
    buffer (its unit streams) or the device (it stays); finish_block as in place_model."""
    block = layout.blocks[i]
    work = device if config.quant else None
    for name, t in tensors.items():
        dtype = config.dtype if t.is_floating_point() and is_parameter(block, name) else t.dtype
        # Convert where it moves fewer bytes: widening waits until the tensor is on the device.
        where = work or (device if dtype.itemsize > t.element_size() else t.device)
        set_tensor(block, name, t.to(device=where, dtype=dtype))
    tensors.clear()
    if config.quant:
        quantize_block(block, config.quant)
    units = plan.streamed_units(i)

    def is_streamed(name: str) -> bool:
        return layout.unit_of(name) in units

    streamed = {}
    for name, t in list(named_tensors(block)):
        if is_streamed(name):
            streamed[name] = t
        elif t.device != device:
            set_tensor(block, name, t.to(device))
    if streamed:
        store.add_block(i, streamed)
        for name in streamed:
            set_tensor(block, name, store.view(i, name))
    if not units and finish_block is not None:
        finish_block(block)
    if device.type == "cuda":  # int4 linears, quantized here or arriving in the format (GGUF, GPTQ)
        prepare_resident_int4(block, is_streamed, device)


def _place_top_level(
    layout: ModelLayout, name: str, t: torch.Tensor, config: OffloadConfig, plan: Plan | SplitPlan,
    block_devices: Sequence[torch.device],
) -> None:
    if name not in layout.top_level:
        raise WeightMismatch(f"unexpected weight {name!r}")
    t = t.to(dtype=config.dtype)
    placed: dict[torch.device, nn.Parameter] = {}  # one tensor per place: a tied head shares the embedding's
    for path, part in layout.top_level[name]:
        device = block_devices[0] if part is Part.EMBEDDING else block_devices[-1]  # beside the blocks it feeds
        if part is Part.EMBEDDING and not plan.on_gpu(part):
            layout.root.set_submodule(layout.embedding_module, HostEmbedding(t.to("cpu"), device))
            continue
        where = device if plan.on_gpu(part) else torch.device("cpu")
        if where not in placed:
            placed[where] = nn.Parameter(t.to(where), requires_grad=False)
        set_tensor(layout.root, path, placed[where])
