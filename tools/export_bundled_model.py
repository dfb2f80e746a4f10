"""Turn a training run (tools/train_bundled_model.py --out RUN) into the bundled HF model directory.

Merges the run's bf16 weight shards into one model.safetensors with config.json (through
llama.checkpoint_writer; the tokenizer.model must already be in --out), copies the training log and
summary beside them, then measures the held-out perplexity of the written directory exactly as the
tests load it (float32, CPU) and records it in eval.json: over the whole held-out file, and over its
first --prefix-chunks chunks (what the test checks).

    python -m tools.export_bundled_model --run RUN --out models/pytiny
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from llama.checkpoint_writer import write_hf_checkpoint
from llama.config import ModelArgs
from llama.loader import load_model
from llama.perplexity import perplexity
from llama.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("models/pytiny"))
    parser.add_argument("--heldout", type=Path, default=Path("data/heldout_stdlib.txt"))
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--prefix-chunks", type=int, default=12)
    args = parser.parse_args()

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(args.run.glob("model-state-*.safetensors")):
        state.update(load_file(str(shard)))
    margs = ModelArgs.from_hf_config(json.loads((args.run / "config.json").read_text()))
    tokenizer = load_tokenizer(args.out)
    special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    write_hf_checkpoint(state, margs, args.out, extra_config=special)
    for name in ("train_log.txt", "summary.json"):
        shutil.copyfile(args.run / name, args.out / name)

    model = load_model(args.out, torch.float32, "cpu")
    ids = tokenizer.encode(args.heldout.read_text(encoding="utf-8"), bos=True)
    full = perplexity(model, ids, args.ctx, bos_id=tokenizer.bos_id, batch_size=4)
    prefix = perplexity(model, ids[: args.prefix_chunks * args.ctx], args.ctx, bos_id=tokenizer.bos_id)
    record = {
        "heldout_file": args.heldout.as_posix(),
        "dtype": "float32",
        "ctx": args.ctx,
        "chunks": len(ids) // args.ctx,
        "perplexity": round(full, 4),
        "prefix_chunks": args.prefix_chunks,
        "prefix_perplexity": round(prefix, 4),
    }
    (args.out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
