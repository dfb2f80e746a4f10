"""A GGUF of a real shape (default Llama-2-7B) written as Q4_0, loaded into pinned RAM and streamed in 4 bits.

    python bench/gguf_bench.py [--dir /tmp] [--type Q4_0|Q8_0] [--loads 3] [--markdown out.md]

The file is written with gguf's writer from random blocks (each block's fp16 scale set to a small finite
value; speed does not depend on values), the embedding and output head in F16. Then, as app.py does for
`--use_offload` with everything streamed, it is opened, its blocks converted to our int4 (group 32) or
int8 format and copied into pinned home buffers: "load GB/s" is the file's tensor bytes over that time
(page-cached: the file was just written). Decode is timed as offload_bench.py times it, beside the link
limit measured in the same run: link GB/s / GB streamed per token. The file is loaded --loads times in one
process, each load timed and decoded on its own, with each home buffer's own host-to-GPU rate beside it.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload_bench import Row, decode_count, run_model

from engine.gguf_build import load_gguf_offloaded
from engine.gguf_model import open_gguf_model, weight_bytes
from llama.config import ModelArgs
from llama.kv_cache import KVCache
from offload.link import measure_link_gbps
from offload.policy import OffloadConfig

SCALE = np.array([0.01], dtype=np.float16).view(np.uint8)  # every block's d


def random_blocks(rows: int, cols: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, bytes per row] of `kind` blocks with finite scales."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    data = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    data[..., :2] = SCALE
    if kind == "Q4_1":
        data[..., 2:4] = SCALE
    return data.reshape(rows, -1)


def write_gguf(path: Path, args: ModelArgs, kind: str) -> None:
    import gguf

    from llama.checkpoint_gguf import _IN_BLOCK

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    for key, value in (("context_length", 4096), ("embedding_length", args.dim), ("block_count", args.n_layers),
                       ("feed_forward_length", args.ffn_dim), ("attention.head_count", args.n_heads),
                       ("attention.head_count_kv", args.n_kv_heads)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    ours_to_gguf = {ours: theirs for theirs, ours in _IN_BLOCK.items()}
    for name, shape in args.weight_shapes().items():
        module = name.removesuffix(".weight")
        if module.startswith("layers."):
            _, i, rest = module.split(".", 2)
            gname = f"blk.{i}.{ours_to_gguf[rest]}.weight"
        else:
            gname = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}[module] + ".weight"
        if len(shape) == 1:
            w.add_tensor(gname, np.ones(shape, dtype=np.float32))
        elif module.startswith("layers."):
            w.add_tensor(gname, random_blocks(*shape, kind, rng), raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            w.add_tensor(gname, (rng.standard_normal(shape, dtype=np.float32) / 64).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--type", default="Q4_0", choices=("Q4_0", "Q4_1", "Q8_0"))
    p.add_argument("--dir", type=Path, default=Path("/tmp"))
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--loads", type=int, default=3, help="loads of the file in this process, each timed and decoded")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the code path with a small shape")
    ns = p.parse_args()
    args = ModelArgs(dim=ns.dim, n_layers=ns.layers, n_heads=ns.heads, vocab_size=ns.vocab, ffn_dim=ns.ffn)
    path = ns.dir / f"bench-{ns.type}.gguf"
    start = time.perf_counter()
    write_gguf(path, args, ns.type)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s", flush=True)

    device = torch.device(ns.device)
    dtype = torch.bfloat16  # tinygemm (int4 decode) is bf16-only
    config = OffloadConfig(dtype=dtype, device=device, exclusions=frozenset(), n_slots=2, max_seq_len=ns.ctx,
                           prefill_chunk=ns.prompt)
    first_use = _first_use_seconds(ns.dir, ns.type, config)
    print(f"first use of the load path (imports, lazily built tables; once per process): {first_use:.1f} s")
    lines = [
        "| GGUF | load | streamed GB/token | decode tok/s | link limit tok/s | fraction | load GB/s (file to pinned) "
        "| store buffers' link GB/s (min / median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i in range(ns.loads):
        row, load_gbps, store_link = load_and_decode(path, args, config, ns)
        lines.append(f"| {ns.type} {args.n_layers}x{args.dim} | {i + 1} | {row.streamed_gb:.2f} | "
                     f"{row.decode_tps:.2f} | {row.limit_tps or 0:.2f} | {row.decode_fraction or 0:.1%} | "
                     f"{load_gbps:.2f} | {store_link[0]:.1f} / {store_link[1]:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", f"targets: decode >= 95% of the link limit (the link probed at each load, {row.link_gbps or 0:.1f} "
              f"GB/s at the last), load >= 2 GB/s; "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU dry run'}"]
    print("\n".join(lines))
    if ns.markdown:
        ns.markdown.write_text("\n".join(lines) + "\n")
    path.unlink()


def load_and_decode(path: Path, args: ModelArgs, config: OffloadConfig, ns: argparse.Namespace
                    ) -> tuple[Row, float, tuple[float, float]]:
    """Load the file streamed (timed), check how fast its home buffers cross the link, then time decode."""
    start = time.perf_counter()
    model = open_gguf_model(path)
    net, off = load_gguf_offloaded(model, None, config)
    load_s = time.perf_counter() - start
    load_gbps = weight_bytes(model) / load_s / 1e9
    print(f"loaded {weight_bytes(model) / 1e9:.2f} GB in {load_s:.2f} s = {load_gbps:.2f} GB/s, store pinned="
          f"{off.store.pinned}", flush=True)
    store_link = (0.0, 0.0)
    if config.device.type == "cuda":  # each block's home buffer copied alone: does the store's memory go slower?
        rates = [measure_link_gbps(off.store.buffer(b), config.device, repeats=3) for b in off.store.blocks]
        store_link = (min(rates), statistics.median(rates))
    cache = KVCache(args, ns.ctx, config.dtype, config.device)
    n = decode_count(off.streamed_bytes, off.link_gbps, ns.seconds, ns.ctx - ns.prompt - 2)
    row = run_model(f"gguf_{ns.type}", net, cache, args, config.device, ns.prompt, n, off.streamed_bytes,
                    off.link_gbps)
    off.close()
    del net, off, cache, model
    gc.collect()
    if config.device.type == "cuda":
        torch.cuda.empty_cache()
    return row, load_gbps, store_link


def _first_use_seconds(root: Path, kind: str, config: OffloadConfig) -> float:
    """Load a one-block GGUF through the same path first, so the timed load measures moving bytes."""
    path = root / f"warm-{kind}.gguf"
    write_gguf(path, ModelArgs(dim=256, n_layers=1, n_heads=4, vocab_size=256, ffn_dim=512), kind)
    start = time.perf_counter()
    _, off = load_gguf_offloaded(open_gguf_model(path), None, config)
    off.close()
    path.unlink()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
