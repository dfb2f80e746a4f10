"""Chat with a Llama-family model that may not fit in GPU memory.

    python app.py [MODEL_DIR] [TOKENIZER] [--use_offload] [--offload_exclusion [w1,w2,w3]] [--use_8bit] ...

With no MODEL_DIR the bundled tiny model (models/pytiny, trained on Python's standard library) runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.config import BUNDLED_MODEL, SAVED_MODES, DeviceSpec, RunConfig
from engine.flag_checks import check_int_flags, default_max_new_tokens, default_threads
from engine.flag_values import (
    check_gpu_flags,
    parse_device,
    parse_dtype,
    parse_exclusions,
    parse_gpu_split,
    parse_gpus,
    parse_quant,
    parse_size,
)
from llama.chat_format import CHAT_FORMATS
from llama.checkpoint_kind import is_prequantized
from llama.errors import UserError
from llama.generation_config import read_generation_config, sampling_params
from llama.sampling_params import SamplingParams
from server.serve_spec import parse_serve_spec

SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "repetition_window", "mirostat",
                  "mirostat_tau", "mirostat_eta", "seed")


class _OneLineParser(argparse.ArgumentParser):
    """Bad flags give one line naming the flag, and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?", type=Path, default=BUNDLED_MODEL,
                   help="checkpoint directory (Meta, HF, GPTQ/AWQ) or a .gguf file")
    p.add_argument("tokenizer", nargs="?", type=Path, help="tokenizer file or directory (default: inside MODEL_DIR)")
    g = p.add_argument_group("model")
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: auto)")
    g.add_argument("--f16", action="store_true", help="same as --dtype float16")
    g.add_argument("--ctx", type=int, help="context length in tokens (default: the model's, at most 4096)")
    g.add_argument("--prefill_chunk", type=int, help="prompt tokens per forward (default: 512, or with "
                   "--use_offload the largest chunk the GPU budget holds)")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: the machine's physical cores)")
    g.add_argument("--no_graphs", action="store_true", help="decode op by op, without CUDA graphs (same tokens)")
    g.add_argument("--chat_format", help="llama2, llama3, chatml or raw (default: detected)")
    g.add_argument("--system", help="system prompt")
    s = p.add_argument_group(
        "sampling (order: repetition penalty, temperature, top-k, top-p, min-p; "
        "defaults: the checkpoint's generation_config.json, else those shown)"
    )
    d = SamplingParams()
    s.add_argument("--temperature", type=float, help=f"0 means greedy (default {d.temperature})")
    s.add_argument("--top_k", type=int, help=f"default {d.top_k}")
    s.add_argument("--top_p", type=float, help=f"default {d.top_p}")
    s.add_argument("--min_p", type=float, help=f"default {d.min_p}")
    s.add_argument("--repetition_penalty", type=float, help=f"default {d.repetition_penalty} (off)")
    s.add_argument("--repetition_window", type=int, help=f"default {d.repetition_window}")
    s.add_argument("--mirostat", type=int, choices=(0, 1, 2), help=f"default {d.mirostat}")
    s.add_argument("--mirostat_tau", type=float, help=f"default {d.mirostat_tau}")
    s.add_argument("--mirostat_eta", type=float, help=f"default {d.mirostat_eta}")
    s.add_argument("--seed", type=int, help="seed for reproducible sampling, in [0, 2**64)")
    o = p.add_argument_group("offload and quantization")
    o.add_argument("--use_offload", action="store_true", help="stream block weights from pinned RAM to the GPU")
    o.add_argument("--offload_exclusion", default="", help="weights kept on the GPU, e.g. [w1,w2,w3]")
    o.add_argument("--prefetch", type=int, default=2, help="device slots in the prefetch ring")
    o.add_argument("--gpu_mem", help="VRAM budget, e.g. 6GiB (default: free VRAM less a margin)")
    o.add_argument("--gpus", help="split the blocks across these GPUs in order, e.g. 0,1 (each streams its own)")
    o.add_argument("--gpu_split", help="VRAM budget per GPU of --gpus, e.g. 10GiB,24GiB (default: each one's free "
                   "VRAM less a margin; alone: GPUs 0, 1, ...)")
    o.add_argument("--use_8bit", action="store_true", help="8-bit weights (bitsandbytes LLM.int8 when resident)")
    o.add_argument("--quant", choices=("int8", "int4"), help="our own weight-only formats")
    o.add_argument("--save_quantized", type=Path, help="write the quantized model to this directory and exit")
    sp = p.add_argument_group("speculative decoding (also for every server request)")
    sp.add_argument("--draft", type=Path, help="draft model directory (same tokenizer), kept resident")
    sp.add_argument("--draft_quant", choices=("int8", "int4"), help="quantize the draft's blocks")
    sp.add_argument("--lookup", action="store_true", help="draft from n-grams already in the context")
    sp.add_argument("--draft_tokens", type=int, help="most tokens verified per target pass (default: chosen)")
    m = p.add_argument_group("modes")
    m.add_argument("--prompt", help="answer this one prompt, print only the reply, exit")
    m.add_argument("--max_new_tokens", type=int, help="reply length limit (default: 512, in the console 256)")
    m.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    m.add_argument("--ppl", type=Path, help="print the perplexity of this text file and exit")
    m.add_argument("--serve", metavar="[HOST:]PORT", help="serve the HTTP API instead of the console")
    m.add_argument("--shared_secret", help="required Authorization for every HTTP request")
    m.add_argument("--max_batch", type=int, metavar="N", help="server: sequences decoded together, one KV cache "
                   "slot each (default: as many as half the free memory holds, at most 16; 1: one at a time)")
    m.add_argument("--allowed_hosts", default="", help="comma-separated Host names the server answers to besides "
                   "localhost and its address ('*': any); without --shared_secret others are refused")
    m.add_argument("--max_body", metavar="SIZE", help="largest HTTP request body, e.g. 16MiB "
                   f"(default {RunConfig.max_body // 2**20}MiB)")
    return p


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """Every flag checked and typed once, before anything slow (no torch is imported here)."""
    check_int_flags(vars(ns))
    if ns.draft_quant and ns.draft is None:
        raise UserError("--draft_quant needs --draft DIR")
    if ns.draft is not None and not ns.draft.is_dir():
        raise UserError(f"--draft: model directory not found: {ns.draft}")
    if ns.serve is not None:
        parse_serve_spec(ns.serve)
    elif ns.max_batch is not None:
        raise UserError("--max_batch only applies with --serve (the console holds one conversation)")
    max_body = RunConfig.max_body if ns.max_body is None else parse_size(ns.max_body, "--max_body")
    if max_body < 1:
        raise UserError("--max_body must be at least 1 byte")
    if ns.chat_format is not None and ns.chat_format not in CHAT_FORMATS:
        raise UserError(f"--chat_format: unknown format {ns.chat_format!r} (valid: {', '.join(sorted(CHAT_FORMATS))})")
    if ns.ppl is not None and not ns.ppl.is_file():
        raise UserError(f"--ppl: no such file: {ns.ppl}")
    exclusions = parse_exclusions(ns.offload_exclusion) if ns.offload_exclusion else None
    gpu_mem = parse_size(ns.gpu_mem) if ns.gpu_mem else None
    if (exclusions is not None or gpu_mem is not None) and not ns.use_offload:
        raise UserError("--offload_exclusion and --gpu_mem only apply with --use_offload")
    device = parse_device(ns.device)
    gpu_split = parse_gpu_split(ns.gpu_split) if ns.gpu_split else None
    gpus = check_gpu_flags(parse_gpus(ns.gpus) if ns.gpus else None, gpu_split, ns.use_offload, gpu_mem, device)
    if gpus is not None and len(gpus) == 1:  # one GPU: today's single-device run on it
        device, gpu_mem, gpu_split = DeviceSpec("cuda", gpus[0]), gpu_split[0] if gpu_split else gpu_mem, None
    quant = parse_quant(ns.quant, ns.use_8bit, ns.use_offload)
    if ns.save_quantized is not None and quant not in SAVED_MODES and not is_prequantized(ns.model_dir):
        raise UserError(f"--save_quantized needs --quant {' or --quant '.join(m.value for m in SAVED_MODES)} "
                        "(the format to write)")
    generation = read_generation_config(ns.model_dir)
    sampling = sampling_params(generation, {name: getattr(ns, name) for name in SAMPLING_FLAGS})
    console = ns.prompt is None and ns.ppl is None and ns.serve is None and ns.save_quantized is None
    return RunConfig(
        model_dir=ns.model_dir,
        tokenizer=ns.tokenizer,
        device=device,
        dtype="float16" if ns.f16 else parse_dtype(ns.dtype),
        ctx=ns.ctx,
        prefill_chunk=ns.prefill_chunk,
        threads=ns.threads or default_threads(),
        graphs=not ns.no_graphs,
        chat_format=ns.chat_format,
        system=ns.system,
        sampling=sampling,
        generation=generation,
        use_offload=ns.use_offload,
        offload_exclusion=exclusions,
        prefetch=ns.prefetch,
        gpu_mem=gpu_mem,
        gpus=gpus,
        gpu_split=gpu_split,
        quant=quant,
        save_quantized=ns.save_quantized,
        prompt=ns.prompt,
        max_new_tokens=ns.max_new_tokens or default_max_new_tokens(console),
        stop=tuple(ns.stop),
        ppl=ns.ppl,
        serve=ns.serve,
        shared_secret=ns.shared_secret,
        max_batch=ns.max_batch,
        draft=ns.draft,
        draft_quant=parse_quant(ns.draft_quant, False, False),
        lookup=ns.lookup,
        draft_tokens=ns.draft_tokens,
        allowed_hosts=tuple(h.strip() for h in ns.allowed_hosts.split(",") if h.strip()),
        max_body=max_body,
    )


def run(cfg: RunConfig) -> None:
    import torch

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # before any work, so every kernel sees it
    from engine.build import build_engine
    from engine.console import run_console, run_prompt

    if cfg.save_quantized is not None:
        from engine.quantized_checkpoint import save_quantized_from_config

        print(f"wrote the quantized model to {save_quantized_from_config(cfg)}")
        return
    engine = build_engine(cfg)
    if cfg.ppl is None:
        from engine.speculative import attach_speculation

        attach_speculation(engine)
    if cfg.ppl is not None:
        from llama.perplexity import run_perplexity

        run_perplexity(engine.model, engine.tokenizer, cfg.ppl, cfg.ctx or min(engine.ctx, 512))
    elif cfg.serve is not None:
        from server.app import serve

        serve(engine, cfg.serve, cfg.shared_secret)
    elif cfg.prompt is not None:
        run_prompt(engine, cfg.prompt)
    else:
        run_console(engine)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        run(config_from_args(ns))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
