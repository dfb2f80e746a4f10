"""What goes where: the offload configuration, a model's footprint and the VRAM budget planner.

A block's weights are split into "units" (for Llama the seven linears the exclusion flag names; the
adapter that describes a model says which). A unit is either resident on the GPU or streamed from
pinned host RAM through a ring of device slots. The rest of a block (its norms) is small and always
resident. The planner picks the placement that streams the fewest bytes per forward pass within a GPU
memory budget; a plain resident run is the plan that keeps every unit resident.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from offload.errors import BudgetTooSmall
from offload.host import FillMethod, format_bytes
from offload.layout import Part
from offload.quant_mode import QuantMode

# Left free on the GPU when no --gpu_mem is given: allocator slack and other processes' growth.
DEFAULT_MARGIN_BYTES = 512 * 2**20
DEFAULT_MARGIN_FRACTION = 0.02
# cuBLAS workspaces and the allocator's rounding, beyond the tensors the activation estimate counts.
WORKSPACE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class OffloadConfig:
    """How to run a model whose blocks stream from host RAM. Sizes in bytes."""

    dtype: torch.dtype = torch.float16
    device: torch.device = torch.device("cuda")  # cpu runs the same machinery with synchronous copies (tests)
    # None: the planner chooses. A set without gpu_mem: exactly these units stay resident (the older
    # tool's meaning). A set with gpu_mem: these stay resident and the planner may add more.
    exclusions: frozenset[str] | None = None
    gpu_mem: int | None = None  # None: free VRAM less a margin
    # Two or more: the blocks split in contiguous ranges across these (offload/split.py), `device` unused;
    # device_budgets their budgets (None: each one's free memory less a margin), split the blocks each gets
    # (None: the planner chooses). A device may be listed twice (one GPU standing in for two, in tests).
    devices: tuple[torch.device, ...] = ()
    device_budgets: tuple[int, ...] | None = None
    split: tuple[int, ...] | None = None
    n_slots: int = 2  # --prefetch: device slots in the ring (blocks in flight while one computes)
    max_seq_len: int = 2048  # KV cache length the budget must hold
    batch: int = 1
    kv_sequences: int = 1  # sequences the KV cache holds (a server's batch); each prefills alone
    prefill_chunk: int = 2048  # longest forward the activation estimate must hold
    quant: QuantMode | None = None  # INT8 | INT4: linears held, streamed and multiplied in that format
    pin: bool = True  # False: pageable home buffers (for machines that cannot lock memory)
    fill: FillMethod = FillMethod()  # how home buffers are filled and locked (bench/load_bench.py compares)
    sequential: bool = False  # reference schedule: copy each block right before it runs, no overlap
    verbose: bool = True

    def __post_init__(self) -> None:
        if self.n_slots < 1:
            raise ValueError(f"OffloadConfig: need at least 1 device slot, got {self.n_slots}")
        if self.device_budgets is not None and len(self.device_budgets) != len(self.devices):
            raise ValueError(f"OffloadConfig: {len(self.device_budgets)} budgets for {len(self.devices)} devices")


@dataclass(frozen=True)
class Footprint:
    """GPU bytes a model needs, per part, for one dtype/format. Blocks are alike."""

    n_blocks: int
    unit_bytes: Mapping[str, int]  # one block's streamable units, bytes each (as laid out in a slot)
    block_other_bytes: int  # the rest of one block (norms): always resident
    head_bytes: int  # output head
    fixed_bytes: int  # final norm, RoPE tables: always on the GPU
    kv_cache_bytes: int
    activation_bytes: int  # one forward of `prefill_tokens` positions
    prefill_tokens: int = 1
    activation_bytes_per_token: int = 0  # what each further position of a forward adds

    @property
    def block_bytes(self) -> int:
        return sum(self.unit_bytes.values()) + self.block_other_bytes


@dataclass(frozen=True)
class Plan:
    """Where each part lives. Streamed blocks come first; the last `n_resident_blocks` are whole on the GPU."""

    footprint: Footprint
    resident_units: frozenset[str]  # resident in every streamed block
    n_resident_blocks: int
    head_on_gpu: bool
    n_slots: int
    budget: int | None
    literal: bool = field(default=False, compare=False)  # exclusions taken as given, not optimized
    embedding_on_gpu: bool = False  # streaming plans keep the lookup table in host RAM; a resident run does not

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(self.footprint.unit_bytes)

    def streamed_units(self, block: int) -> frozenset[str]:
        if block >= self.n_streamed_blocks:
            return frozenset()
        return frozenset(self.units) - self.resident_units

    def on_gpu(self, part: Part) -> bool:
        """Whether a top-level part lives on the device (a streamed model's embedding does not: only its rows
        cross)."""
        return {Part.EMBEDDING: self.embedding_on_gpu, Part.HEAD: self.head_on_gpu, Part.FIXED: True}[part]

    @property
    def n_streamed_blocks(self) -> int:
        if self.resident_units >= frozenset(self.units):
            return 0
        return self.footprint.n_blocks - self.n_resident_blocks

    def prefill_chunk(self, longest: int) -> int:
        """The most prompt tokens one forward may take: the largest chunk (at most `longest`) whose activations
        fit what the plan leaves of the budget, and never fewer than the footprint was planned with."""
        fp = self.footprint
        if self.budget is None or not fp.activation_bytes_per_token:
            return longest
        extra = max(0, self.budget - self.gpu_bytes) // fp.activation_bytes_per_token
        return min(longest, fp.prefill_tokens + extra)

    @property
    def slot_bytes(self) -> int:
        fp = self.footprint
        return sum(b for u, b in fp.unit_bytes.items() if u not in self.resident_units)

    @property
    def ring_bytes(self) -> int:
        """All slots; the ring never holds more slots than there are streamed blocks."""
        n = min(self.n_slots, self.n_streamed_blocks)
        return n * self.slot_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes crossing the link per forward pass."""
        return self.n_streamed_blocks * self.slot_bytes

    @property
    def resident_weight_bytes(self) -> int:
        fp = self.footprint
        per_streamed = sum(fp.unit_bytes[u] for u in self.resident_units) + fp.block_other_bytes
        n_streamed = self.n_streamed_blocks
        head = fp.head_bytes if self.head_on_gpu else 0
        return n_streamed * per_streamed + (fp.n_blocks - n_streamed) * fp.block_bytes + head + fp.fixed_bytes

    @property
    def gpu_bytes(self) -> int:
        fp = self.footprint
        return self.resident_weight_bytes + self.ring_bytes + fp.kv_cache_bytes + fp.activation_bytes

    def predicted_tps(self, link_gbps: float | None) -> float | None:
        """Decode tokens/s the link allows (batch 1); None when nothing streams or the link is unknown."""
        if not self.streamed_bytes or not link_gbps:
            return None
        return link_gbps * 1e9 / self.streamed_bytes

    def describe(self, link_gbps: float | None) -> str:
        fp = self.footprint
        budget = format_bytes(self.budget) if self.budget is not None else "unlimited"
        n_stream = self.n_streamed_blocks
        lines = [f"offload plan ({'as given' if self.literal else 'planned'}; GPU budget {budget}):"]
        if n_stream:
            units = ",".join(u for u in self.units if u in self.resident_units) or "none"
            lines.append(
                f"  streamed: {n_stream} of {fp.n_blocks} blocks through {min(self.n_slots, n_stream)} slots of "
                f"{format_bytes(self.slot_bytes)}; resident in those blocks: {units}"
            )
        if n_stream < fp.n_blocks:
            lines.append(f"  whole blocks on the GPU: {fp.n_blocks - n_stream}")
        lines.append(
            f"  GPU: {format_bytes(self.gpu_bytes)} = weights {format_bytes(self.resident_weight_bytes)}"
            f" + slots {format_bytes(self.ring_bytes)} + KV cache {format_bytes(fp.kv_cache_bytes)}"
            f" + activations {format_bytes(fp.activation_bytes)}"
        )
        head = "GPU" if self.head_on_gpu else "host RAM (computed on the CPU)"
        embedding = "GPU" if self.embedding_on_gpu else "host RAM (rows looked up on the CPU)"
        lines.append(f"  output head: {head}; token embedding: {embedding}")
        tps = self.predicted_tps(link_gbps)
        if not self.streamed_bytes:
            lines.append("  streamed per token: nothing (every weight is on the GPU)")
        elif tps is None:
            lines.append(f"  streamed per token: {format_bytes(self.streamed_bytes)} (link not measured)")
        else:
            lines.append(
                f"  streamed per token: {format_bytes(self.streamed_bytes)}; link {link_gbps:.1f} GB/s"
                f" -> predicted {tps:.2f} tokens/s (decode, batch 1)"
            )
        return "\n".join(lines)


def resident_plan(units: Iterable[str], n_blocks: int) -> Plan:
    """Everything on the device, the embedding too: the plan of a run that streams nothing. Nothing is sized
    against a budget, so its footprint holds no byte counts."""
    footprint = Footprint(n_blocks=n_blocks, unit_bytes=dict.fromkeys(units, 0), block_other_bytes=0,
                          head_bytes=0, fixed_bytes=0, kv_cache_bytes=0, activation_bytes=0)
    return Plan(footprint, frozenset(footprint.unit_bytes), n_blocks, head_on_gpu=True, n_slots=1, budget=None,
                literal=True, embedding_on_gpu=True)


def plan_placement(
    footprint: Footprint,
    budget: int | None,
    n_slots: int,
    exclusions: frozenset[str] | None = None,
    budget_given: bool = False,
) -> Plan:
    """The plan that streams the fewest bytes per token and fits `budget` (None: no limit).

    An exclusion list with no explicit budget is taken literally (only the head's place is chosen);
    otherwise the listed units are a floor and the planner adds resident units and whole blocks.
    Raises BudgetTooSmall with the smallest budget that would work when nothing fits.
    """
    literal = exclusions is not None and not budget_given
    forced = exclusions or frozenset()
    free = [u for u in footprint.unit_bytes if u not in forced]
    if literal:
        unit_sets = [forced]
        block_counts: Iterable[int] = [0]
    else:
        unit_sets = [forced | frozenset(c) for r in range(len(free) + 1) for c in itertools.combinations(free, r)]
        block_counts = range(footprint.n_blocks + 1)
    candidates = [
        Plan(footprint, units, k, head, n_slots, budget, literal)
        for units, k, head in itertools.product(unit_sets, block_counts, (True, False))
    ]

    def host_bytes(p: Plan) -> int:  # bytes read from host RAM per token: streamed, or CPU-computed head
        return p.streamed_bytes + (0 if p.head_on_gpu else footprint.head_bytes)

    fitting = [p for p in candidates if budget is None or p.gpu_bytes <= budget]
    if not fitting:
        smallest = min(candidates, key=lambda p: p.gpu_bytes)
        fp = footprint
        what = "the GPU budget" if budget_given else "free GPU memory"
        raise BudgetTooSmall(
            f"{what} {format_bytes(budget or 0)} is too small: this model needs at least "
            f"{format_bytes(smallest.gpu_bytes)} on the GPU ({min(n_slots, max(smallest.n_streamed_blocks, 1))} "
            f"slots x {format_bytes(smallest.slot_bytes)}, KV cache {format_bytes(fp.kv_cache_bytes)}, "
            f"activations {format_bytes(fp.activation_bytes)}, resident weights "
            f"{format_bytes(smallest.resident_weight_bytes)})",
            budget or 0, smallest.gpu_bytes, budget_given,
        )
    return min(fitting, key=lambda p: (host_bytes(p), p.gpu_bytes))


def default_budget(device: torch.device) -> int:
    """Free GPU memory less a margin."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, free - DEFAULT_MARGIN_BYTES - int(DEFAULT_MARGIN_FRACTION * total))
