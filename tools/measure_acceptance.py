"""How often the target accepts a draft's tokens on held-out text (greedy), and what that buys on this machine.

Prompts come from the held-out file (the standard-library modules no model was trained on), as the workloads of
tools/speculation_workloads.py: --workload continuation (windows of --prompt-tokens tokens after BOS) or edit (a
function, then its renamed `def` line to rewrite it); the target continues each greedily for --new-tokens. For each
draft source (the draft model, prompt lookup, both) and each fixed tree shape, it reports the tokens
per target pass (the accepted draft tokens plus the target's own one) and decode tok/s on this machine,
beside plain decoding; the last shape of each source is the planner's own choice. Output: one JSON object (stdout, and --out if given).

    python -m tools.measure_acceptance --draft models/pytiny-draft --out models/pytiny-draft/acceptance.json
    python -m tools.measure_acceptance --draft models/pytiny-draft --workload edit --prompts 4 --new-tokens 96 --shape 12x16
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.build import build_engine
from engine.config import BUNDLED_MODEL, RunConfig
from engine.flag_values import parse_device
from engine.speculative import attach_speculation
from llama.sampling import Sampler, SamplingParams
from llama.speculative.planner import TreeShape
from tools.speculation_workloads import continuation_prompts, edit_prompts

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)
SHAPES = (TreeShape(4, 1), TreeShape(4, 4), TreeShape(8, 8))


def parse_shape(text: str) -> TreeShape:
    """--shape DEPTHxWIDTH, e.g. 12x16."""
    try:
        depth, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected DEPTHxWIDTH, e.g. 12x16") from None
    if depth < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: depth and width must be at least 1")
    return TreeShape(depth, width)


def run(engine, windows: list[list[int]], new_tokens: int) -> dict[str, float]:
    tokens = passes = 0
    seconds = 0.0
    outputs = []
    for prompt in windows:
        engine.generator.reset()
        out = engine.generator.generate(prompt, Sampler(GREEDY), new_tokens, stop_ids=set())
        seconds += out.stats.decode_seconds
        tokens += out.stats.new_tokens - 1
        passes += out.stats.decode_passes
        outputs.append(out.token_ids)
    return {"tokens_per_pass": tokens / passes, "decode_tok_s": tokens / seconds, "outputs": outputs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    p.add_argument("--draft", type=Path, required=True)
    p.add_argument("--heldout", type=Path, default=Path("data/heldout_stdlib.txt"))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--workload", choices=("continuation", "edit"), default="continuation")
    p.add_argument("--shape", type=parse_shape, action="append",
                   help="a fixed tree shape DEPTHxWIDTH to measure (repeat for more; default: 4x1, 4x4, 8x8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    base = RunConfig(model_dir=args.model, device=parse_device(args.device), dtype="float32", ctx=1024, sampling=GREEDY)
    engine = build_engine(base)
    text = args.heldout.read_text(encoding="utf-8")
    windows = (continuation_prompts(text, engine.tokenizer, args.prompts, args.prompt_tokens)
               if args.workload == "continuation" else edit_prompts(text, engine.tokenizer, args.prompts))
    plain = run(engine, windows, args.new_tokens)
    record: dict[str, object] = {
        "model": str(args.model), "draft": str(args.draft), "device": args.device,
        "workload": args.workload, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "plain_decode_tok_s": round(plain["decode_tok_s"], 1),
    }
    sources = {"draft": {"draft": args.draft}, "lookup": {"lookup": True}, "both": {"draft": args.draft, "lookup": True}}
    for name, flags in sources.items():
        engine.cfg = RunConfig(**{**base.__dict__, **flags})
        for shape in (*(args.shape or SHAPES), None):
            if shape is not None and shape.width > 1 and name == "lookup":
                continue
            attach_speculation(engine, log=sys.stderr, shape=shape)
            got = run(engine, windows, args.new_tokens)
            assert got["outputs"] == plain["outputs"], f"{name} {shape}: output differs from plain greedy"
            key = f"{name}/{'planner' if shape is None else f'd{shape.depth}w{shape.width}'}"
            record[key] = {
                "tokens_per_pass": round(got["tokens_per_pass"], 3),
                "accepted_per_pass": round(got["tokens_per_pass"] - 1, 3),
                "decode_tok_s": round(got["decode_tok_s"], 1),
            }
            print(key, record[key], file=sys.stderr)
    text = json.dumps(record, indent=2) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
