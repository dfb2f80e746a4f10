"""Streaming offload benchmark on a synthetic model of a real shape (default Llama-2-7B, fp16, random weights).

    python bench/offload_bench.py [--modes off_all,off_ff,...] [--json out.json] [--markdown out.md]

Weights are made on the GPU and copied straight into pinned home buffers through the engine's own loader
(no checkpoint file). The pinned host-to-GPU bandwidth is measured in the same run with a block-sized
copy, and every streaming figure is reported beside the limit it implies:
link limit tokens/s = link GB/s / GB streamed per forward pass.

Modes: resident (all on the GPU), off_all (everything streamed), off_ff ([w1,w2,w3] resident), off_att
([wq,wk,wv,wo] resident), int8 / int4 (everything streamed, quantized; needs offload.kernels), int4_resident,
and accelerate (Hugging Face transformers + accelerate CPU offload at the GPU budget off_all used).
`--device cpu` with a small shape is a dry run of the code paths.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.llama_offload import offload_transformer
from engine.llama_units import BLOCK_LINEARS
from llama.config import ModelArgs
from llama.kv_cache import KVCache
from llama.model import Transformer
from llama.loader import empty_model
from offload.link import probe_link_gbps
from offload.placement import OffloadedModel
from offload.policy import OffloadConfig, plan_placement
from offload.quant_mode import QuantMode

GiB = 2**30
ALL_MODES = ("resident", "off_all", "off_ff", "off_att", "int8", "int4", "int4_resident", "accelerate")
EXCLUSIONS = {
    "resident": frozenset(BLOCK_LINEARS),
    "off_all": frozenset(),
    "off_ff": frozenset({"w1", "w2", "w3"}),
    "off_att": frozenset({"wq", "wk", "wv", "wo"}),
    "int8": frozenset(),
    "int4": frozenset(),
    "int4_resident": frozenset(BLOCK_LINEARS),
}


@dataclass
class Row:
    mode: str
    streamed_gb: float  # per forward pass
    decode_tps: float
    decode_tokens: int
    prefill_tps: float
    prefill_cold_tps: float
    link_gbps: float | None
    peak_decode_gib: float
    peak_prefill_gib: float
    vram_target_gib: float | None = None  # slots + output head + KV cache + 256 MiB
    note: str = ""

    @property
    def limit_tps(self) -> float | None:
        return self.link_gbps / self.streamed_gb if self.streamed_gb and self.link_gbps else None

    @property
    def decode_fraction(self) -> float | None:
        return self.decode_tps / self.limit_tps if self.limit_tps else None

    @property
    def achieved_gbps(self) -> float:
        return self.decode_tps * self.streamed_gb

    def prefill_fraction(self, prompt: int) -> float | None:
        return self.prefill_tps / (prompt * self.limit_tps) if self.limit_tps else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else 0.0


def synthetic_weights(args: ModelArgs, device: torch.device, seed: int = 0,
                      dtype: torch.dtype = torch.float16) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights by canonical name in `dtype`, made on `device` (N(0, 1/fan_in) matrices, norms near 1,
    embeddings N(0, 1))."""
    gen = torch.Generator(device).manual_seed(seed)
    for name, shape in args.weight_shapes().items():
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if "norm" in name:
            x = 1.0 + 0.1 * x
        elif "embeddings" not in name:
            x /= math.sqrt(shape[1])
        yield name, x.to(dtype)


@torch.inference_mode()
def run_model(
    mode: str, model: Transformer, cache: KVCache, args: ModelArgs, device: torch.device, prompt_len: int,
    decode_tokens: int, streamed_bytes: int, link: float | None,
) -> Row:
    prompt = torch.randint(0, args.vocab_size, (1, prompt_len))
    sync(device)
    start = time.perf_counter()
    model(prompt, 0, cache, last_only=True)  # cold: first pass, ring empty, kernels loading
    sync(device)
    cold = time.perf_counter() - start
    reset_peak(device)
    start = time.perf_counter()
    logits = model(prompt, 0, cache, last_only=True)  # warm: this pass's first blocks were prefetched
    sync(device)
    prefill = time.perf_counter() - start
    peak_prefill = peak_gib(device)
    token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1), stays on the device
    pos = prompt_len
    for _ in range(2):  # warm-up
        token = model(token, pos, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        pos += 1
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = model(token, pos, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        pos += 1
    sync(device)
    decode = time.perf_counter() - start
    return Row(
        mode=mode,
        streamed_gb=streamed_bytes / 1e9,
        decode_tps=decode_tokens / decode,
        decode_tokens=decode_tokens,
        prefill_tps=prompt_len / prefill,
        prefill_cold_tps=prompt_len / cold,
        link_gbps=link,
        peak_decode_gib=peak_gib(device),
        peak_prefill_gib=peak_prefill,
    )


def decode_count(streamed_bytes: int, link: float | None, seconds: float, room: int) -> int:
    """Tokens to time: about `seconds` of decoding at the link limit, within the KV cache's room."""
    if not streamed_bytes or not link:
        return min(room, 100)
    return max(4, min(room, round(seconds * link * 1e9 / streamed_bytes)))


def offload_modes(
    modes: list[str], quant: QuantMode | None, args: ModelArgs, ns: argparse.Namespace, device: torch.device,
    link: float | None,
) -> list[Row]:
    """Load the synthetic model once (streamed, in `quant` or fp16) and run each mode by re-planning."""
    dtype = torch.bfloat16 if quant is QuantMode.INT4 else torch.float16  # torch's int4 GEMM is bf16-only
    cache = KVCache(args, ns.ctx, dtype, device)
    config = OffloadConfig(
        dtype=dtype, device=device, exclusions=frozenset(), n_slots=ns.slots, max_seq_len=ns.ctx,
        prefill_chunk=ns.prompt, quant=quant,
    )
    model = empty_model(args)
    start = time.perf_counter()
    off = offload_transformer(model, synthetic_weights(args, device), config)
    label = quant.value if quant else "fp16"
    print(f"[{label}] store {off.store.nbytes / 1e9:.2f} GB, pinned={off.store.pinned}, "
          f"loaded in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for mode in modes:
        plan = plan_placement(off.plan.footprint, None, ns.slots, EXCLUSIONS[mode])
        if device.type == "cuda" and plan.gpu_bytes > torch.cuda.mem_get_info(device)[0] + _gpu_bytes(off):
            print(f"[{mode}] skipped: needs {plan.gpu_bytes / GiB:.1f} GiB of GPU memory", flush=True)
            continue
        off.replan(plan)
        gc.collect()
        n = decode_count(off.streamed_bytes, link, ns.seconds, ns.ctx - ns.prompt - 2)
        print(f"[{mode}] streamed {off.streamed_bytes / 1e9:.2f} GB/pass, timing {n} tokens", flush=True)
        row = run_model(mode, model, cache, args, device, ns.prompt, n, off.streamed_bytes, link)
        if off.streaming is not None:  # slots + output head + resident units + KV cache + 256 MiB
            fp = off.plan.footprint
            slots = off.streaming.n_slots * off.streaming.slot_bytes
            weights = off.plan.resident_weight_bytes - fp.fixed_bytes - fp.n_blocks * fp.block_other_bytes
            row.vram_target_gib = (slots + weights + cache.nbytes() + 256 * 2**20) / GiB
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
    off.close()
    del model, off, cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _gpu_bytes(off: OffloadedModel) -> int:
    """GPU bytes the current placement holds (given back before the next one is made)."""
    return off.plan.gpu_bytes - off.plan.footprint.kv_cache_bytes - off.plan.footprint.activation_bytes


@torch.inference_mode()
def accelerate_peer(args: ModelArgs, budget_gib: float, ns: argparse.Namespace, device: torch.device) -> Row:
    """transformers' LlamaForCausalLM of the same shape, blocks offloaded to the CPU by accelerate."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "model_type")})
    with init_empty_weights():
        hf = LlamaForCausalLM(cfg)
    gen = torch.Generator(device).manual_seed(0)
    for name, p in list(hf.named_parameters()):
        value = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float16)
        if p.dim() == 2 and "embed" not in name:
            value /= math.sqrt(p.shape[1])
        set_module_tensor_to_device(hf, name, "cpu", value=value.cpu(), dtype=torch.float16)
    hf.eval()
    budget = int(budget_gib * GiB)
    device_map = infer_auto_device_map(
        hf, max_memory={device.index or 0: budget, "cpu": 400 * GiB}, no_split_module_classes=["LlamaDecoderLayer"],
        dtype=torch.float16,
    )
    on_cpu = sum(1 for k, v in device_map.items() if v == "cpu" and ".layers." in f".{k}.")
    hf = dispatch_model(hf, device_map=device_map, main_device=device.index or 0)
    note = (f"max_memory GPU {budget_gib:.2f} GiB (off_all's peak less accelerate's KV cache); "
            f"{on_cpu} of {args.n_layers} blocks on the CPU")
    print(f"[accelerate] {note}", flush=True)
    ids = torch.randint(0, args.vocab_size, (1, ns.prompt), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = hf(input_ids=ids, use_cache=True)
    torch.cuda.synchronize(device)
    prefill = time.perf_counter() - start
    peak_prefill = peak_gib(device)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    out = hf(input_ids=token, past_key_values=past, use_cache=True)  # warm-up
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(ns.accelerate_tokens):
        out = hf(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize(device)
    decode = time.perf_counter() - start
    row = Row(
        mode="accelerate", streamed_gb=0.0, decode_tps=ns.accelerate_tokens / decode,
        decode_tokens=ns.accelerate_tokens, prefill_tps=ns.prompt / prefill, prefill_cold_tps=ns.prompt / prefill,
        link_gbps=None, peak_decode_gib=peak_gib(device), peak_prefill_gib=peak_prefill, note=note,
    )
    print(json.dumps(asdict(row)), flush=True)
    return row


def table(rows: list[Row], prompt: int) -> str:
    def f(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    header = (
        "| mode | GB streamed/token | decode tok/s | link limit tok/s | % of limit | achieved GB/s | "
        f"prefill tok/s ({prompt}) | prefill % of limit | peak VRAM decode / prefill GiB | VRAM target GiB |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.streamed_gb:.2f} | {r.decode_tps:.2f} | {f(r.limit_tps, '.2f')} | "
            f"{f(r.decode_fraction and 100 * r.decode_fraction, '.1f')} | {f(r.achieved_gbps or None, '.1f')} | "
            f"{r.prefill_tps:.0f} | {f(r.prefill_fraction(prompt) and 100 * r.prefill_fraction(prompt), '.1f')} | "
            f"{r.peak_decode_gib:.2f} / {r.peak_prefill_gib:.2f} | {f(r.vram_target_gib, '.2f')} |"
        )
    by = {r.mode: r for r in rows}
    if "off_all" in by and "accelerate" in by:
        lines.append("")
        lines.append(f"off_all decode is {by['off_all'].decode_tps / by['accelerate'].decode_tps:.1f}x accelerate's "
                     f"({by['accelerate'].note}).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=1920, help="prefill length")
    p.add_argument("--ctx", type=int, default=2048, help="KV cache length")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0, help="decode time per streamed mode, roughly")
    p.add_argument("--accelerate-tokens", type=int, default=3)
    p.add_argument("--modes", default=",".join(ALL_MODES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    ns = p.parse_args()
    device = torch.device(ns.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(ALL_MODES))
    if unknown:
        p.error(f"unknown mode {unknown[0]} (choose from {', '.join(ALL_MODES)})")
    args = ModelArgs(
        dim=ns.dim, n_layers=ns.layers, n_heads=ns.heads, n_kv_heads=ns.kv_heads, vocab_size=ns.vocab,
        ffn_dim=ns.ffn, max_seq_len=max(ns.ctx, 4096),
    )
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"card: {card}; torch {torch.__version__}; shape {args}", flush=True)

    # One link figure for every row: a 512 MiB pinned block-sized copy, median of 10.
    link = probe_link_gbps(device, True, 512 * 2**20, repeats=10) if device.type == "cuda" else None
    print(f"link: {link} GB/s pinned host-to-device", flush=True)
    rows: list[Row] = []
    fp16_modes = [m for m in ("resident", "off_all", "off_ff", "off_att") if m in modes]
    int8_modes = [m for m in ("int8",) if m in modes]
    int4_modes = [m for m in ("int4", "int4_resident") if m in modes]
    if fp16_modes:
        rows += offload_modes(fp16_modes, None, args, ns, device, link)
    for quant, qmodes in ((QuantMode.INT8, int8_modes), (QuantMode.INT4, int4_modes)):
        if qmodes:
            rows += offload_modes(qmodes, quant, args, ns, device, link)
    if "accelerate" in modes and device.type == "cuda":
        torch.cuda.empty_cache()
        # The same peak VRAM as off_all: max_memory does not count accelerate's KV cache, so it is taken off.
        off_all = next((r for r in rows if r.mode == "off_all"), None)
        kv = args.kv_cache_bytes(ns.prompt + ns.accelerate_tokens + 1, torch.float16) / GiB
        budget = round(off_all.peak_decode_gib - kv, 2) if off_all else 1.0
        try:
            rows.append(accelerate_peer(args, budget, ns, device))
        except Exception as e:  # noqa: BLE001 - a peer's failure must not lose our own rows
            print(f"[accelerate] failed: {type(e).__name__}: {e}", flush=True)

    shape = f"dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, FFN {args.ffn_dim}, vocab {args.vocab_size}"
    end_link = probe_link_gbps(device, True, 512 * 2**20, repeats=10) if device.type == "cuda" else None
    links = f"link {link:.1f} GB/s pinned (at the end {end_link:.1f})" if link and end_link else "link not measured"
    header = (f"{time.strftime('%Y-%m-%d')}, {card}, torch {torch.__version__}; model {shape}, random weights; "
              f"{ns.slots} slots; prompt {ns.prompt}; {links}; "
              f"command: python bench/offload_bench.py {' '.join(sys.argv[1:])}")
    md = header + "\n\n" + table(rows, ns.prompt)
    print("\n" + md, flush=True)
    if ns.json:
        ns.json.write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))
    if ns.markdown:
        ns.markdown.write_text(md + "\n")


if __name__ == "__main__":
    main()
