"""llama.cpp's CPU decode speed on GGUFs of a real shape, for the table beside bench/cpu_decode.py's figures.

    python bench/llama_cpp_compare.py --llama_bench PATH [--shape smollm2-135m] [--types F32 F16 Q4_1]
                                      [--threads 2] [--tokens 128] [--repeats 5] [--dir /tmp]
                                      [--wait_idle SECONDS]

llama-bench is llama.cpp's own benchmark (built from its sources; no wheel or Debian package of it exists
for this machine). One GGUF per type is written with random weights (speed does not depend on values) and
a placeholder SentencePiece vocabulary of the shape's size: the block linears in the type; the tied
embedding in the same type for F32/F16 and in Q8_0 for quantized types (llama.cpp's quantizer gives a tied
embedding Q6_K, which falls back to Q8_0 for rows that are not a multiple of 256, as SmolLM2's 576 are);
norms in F32. Prints the median of --repeats runs of llama-bench's decode tok/s (`-p 0 -n TOKENS -r 1`:
one generation of TOKENS tokens from an empty context), each after --wait_idle's wait for a quiet second,
as bench/cpu_decode.py does.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_bench import random_blocks  # noqa: E402
from idle_wait import wait_until_idle  # noqa: E402
from shapes import SHAPES  # noqa: E402

from llama.checkpoint_gguf import _IN_BLOCK  # noqa: E402
from llama.config import ModelArgs  # noqa: E402

OUTSIDE_BLOCKS = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}


def placeholder_vocabulary(n: int) -> dict:
    """tokenizer.ggml.* of an n-token SentencePiece vocabulary: unk, bos, eos, the 256 byte pieces, words."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581w{i}" for i in range(n - len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)
    return {"model": "llama", "tokens": pieces, "scores": [0.0] * n, "token_type": types, "bos_token_id": 1,
            "eos_token_id": 2, "unknown_token_id": 0}


def gguf_tensor_name(name: str) -> str:
    module = name.removesuffix(".weight")
    if not module.startswith("layers."):
        return OUTSIDE_BLOCKS[module] + ".weight"
    _, i, rest = module.split(".", 2)
    return f"blk.{i}.{ {ours: theirs for theirs, ours in _IN_BLOCK.items()}[rest] }.weight"


def write_gguf(path: Path, args: ModelArgs, kind: str) -> None:
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    for key, value in (("context_length", args.max_seq_len), ("embedding_length", args.dim),
                       ("block_count", args.n_layers), ("feed_forward_length", args.ffn_dim),
                       ("attention.head_count", args.n_heads), ("attention.head_count_kv", args.n_kv_heads),
                       ("rope.dimension_count", args.head_dim)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", args.norm_eps)
    w.add_float32("llama.rope.freq_base", args.rope_theta)
    for key, value in placeholder_vocabulary(args.vocab_size).items():
        if isinstance(value, list):
            w.add_array(f"tokenizer.ggml.{key}", value)
        elif isinstance(value, str):
            w.add_string(f"tokenizer.ggml.{key}", value)
        else:
            w.add_uint32(f"tokenizer.ggml.{key}", value)
    for name, shape in args.weight_shapes().items():
        if args.tie_embeddings and name == "output.weight":
            continue
        kind_here = kind if name.startswith("layers.") or kind in ("F32", "F16") else "Q8_0"
        if len(shape) == 1:
            w.add_tensor(gguf_tensor_name(name), np.ones(shape, dtype=np.float32))
        elif kind_here in ("F32", "F16"):
            data = rng.standard_normal(shape, dtype=np.float32) / 32
            w.add_tensor(gguf_tensor_name(name), data.astype(np.float16) if kind_here == "F16" else data)
        else:
            w.add_tensor(gguf_tensor_name(name), random_blocks(*shape, kind_here, rng),
                         raw_dtype=gguf.GGMLQuantizationType[kind_here])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def decode_tps(llama_bench: Path, model: Path, threads: int, tokens: int) -> float:
    """llama-bench's decode tok/s of one generation of `tokens` tokens."""
    done = subprocess.run([str(llama_bench), "-m", str(model), "-t", str(threads), "-p", "0", "-n", str(tokens),
                           "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)[0]["avg_ts"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama_bench", type=Path, required=True)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--types", nargs="+", default=["F32", "F16", "Q4_1"], choices=("F32", "F16", "Q4_0", "Q4_1", "Q8_0"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", type=Path, default=Path("/tmp"))
    p.add_argument("--wait_idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each run wait up to this long for the CPUs to be idle (machines shared with others)")
    a = p.parse_args()
    args = SHAPES[a.shape]
    print(f"llama.cpp (llama-bench) on {a.shape}, {a.threads} threads, {a.tokens} tokens, median of {a.repeats}")
    print("| type | file MB | decode tok/s (median) | min | max |\n|---|---|---|---|---|")
    for kind in a.types:
        path = a.dir / f"{a.shape}-{kind}.gguf"
        if not path.exists():
            write_gguf(path, args, kind)
        decode_tps(a.llama_bench, path, a.threads, 8)  # warm up: the file in the page cache
        runs = []
        for _ in range(a.repeats):
            if a.wait_idle:
                wait_until_idle(a.wait_idle)
            runs.append(decode_tps(a.llama_bench, path, a.threads, a.tokens))
        print(f"| {kind} | {path.stat().st_size / 1e6:.0f} | {statistics.median(runs):.2f} | {min(runs):.2f} | "
              f"{max(runs):.2f} |", flush=True)

if __name__ == "__main__":
    main()
