"""The console chat (interactive) and the one-shot --prompt mode."""
from __future__ import annotations

import sys
from typing import TextIO

from engine.build import Engine
from llama.chat import ChatSession
from llama.errors import UserError
from llama.generation import Generation, GenerationStats
from llama.sampling import Sampler

HELP = "commands: /reset forgets the conversation, /exit quits; Ctrl-C stops a reply"


def format_stats(stats: GenerationStats) -> str:
    spec = f" ({stats.tokens_per_pass:.2f} tok/pass)" if stats.speculative else ""
    return (
        f"[prefill {stats.prefilled_tokens} tok at {stats.prefill_tps:.1f} tok/s, "
        f"decode {stats.new_tokens} tok at {stats.decode_tps:.1f} tok/s{spec}, stop: {stats.stop_reason}]"
    )


def run_prompt(engine: Engine, text: str, out: TextIO | None = None, err: TextIO | None = None) -> None:
    """One reply to `text`: only the generated text goes to `out`, statistics to `err` (default: the
    process's streams at call time, not at import, which tests replace)."""
    out, err = out or sys.stdout, err or sys.stderr
    cfg = engine.cfg
    session = ChatSession(engine.generator, engine.chat_format, cfg.system, notify=lambda m: print(m, file=err))
    result = Generation()
    for piece in session.reply(text, Sampler(cfg.sampling), cfg.max_new_tokens, result, cfg.stop):
        out.write(piece)
        out.flush()
    out.write("\n")
    print(format_stats(result.stats), file=err)


def run_console(engine: Engine, inp: TextIO | None = None, out: TextIO | None = None,
                err: TextIO | None = None) -> None:
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    cfg = engine.cfg
    session = ChatSession(engine.generator, engine.chat_format, cfg.system, notify=lambda m: print(m, file=err))
    sampler = Sampler(cfg.sampling)
    print(f"chat format: {engine.chat_format.name}; context {engine.ctx} tokens; {HELP}", file=err)
    while True:
        out.write("> ")
        out.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return
        if not line:  # end of input
            out.write("\n")
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            return
        if text.strip() == "/reset":
            session.reset()
            print("(conversation cleared)", file=err)
            continue
        result = Generation()
        stream = session.reply(text, sampler, cfg.max_new_tokens, result, cfg.stop)
        try:
            for piece in stream:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stream.close()
            result.stats.stop_reason = "interrupted"
        except UserError as e:
            print(f"error: {e}", file=err)
            continue
        out.write("\n")
        out.flush()
        print(format_stats(result.stats), file=err)
