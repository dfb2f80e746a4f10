"""The console chat (interactive) and the one-shot --prompt mode."""
from __future__ import annotations

import sys
from typing import TextIO

from engine.build import Engine
from engine.console_input import COMMANDS, HELP, bad_bytes_note, command_of, read_message, replace_bad_bytes
from llama.chat import ChatSession
from llama.errors import UserError
from llama.generation import Generation, GenerationStats
from llama.sampling import Sampler


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
    text, bad = replace_bad_bytes(text)
    if bad:
        print(bad_bytes_note(bad), file=err)
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
    """The interactive chat (default streams: stdin, stdout, stderr, looked up at call time) until /exit or the end of input."""
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    if hasattr(inp, "reconfigure"):
        inp.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 reach replace_bad_bytes
    cfg = engine.cfg
    session = ChatSession(engine.generator, engine.chat_format, cfg.system, notify=lambda m: print(m, file=err))
    sampler = Sampler(cfg.sampling)
    print(f"chat format: {engine.chat_format.name}; context {engine.ctx} tokens; replies up to "
          f"{cfg.max_new_tokens} tokens; {HELP}", file=err)
    while True:
        out.write("> ")
        out.flush()
        try:
            message = read_message(inp, out)
        except KeyboardInterrupt:
            message = None
        if message is None:  # end of input
            out.write("\n")
            return
        message, bad = replace_bad_bytes(message)
        if bad:
            print(bad_bytes_note(bad), file=err)
        command = command_of(message)
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            print("(conversation cleared)", file=err)
        elif command == "/help":
            print(HELP, file=err)
        elif command is not None:
            print(f"(unknown command {command}; the commands are {', '.join(COMMANDS)})", file=err)
        elif message.strip():
            _reply(session, message, sampler, cfg.max_new_tokens, cfg.stop, out, err)


def _reply(session: ChatSession, message: str, sampler: Sampler, max_new_tokens: int, stop: tuple[str, ...],
           out: TextIO, err: TextIO) -> None:
    result = Generation()
    stream = session.reply(message, sampler, max_new_tokens, result, stop)
    try:
        for piece in stream:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        stream.close()
        result.stats.stop_reason = "interrupted"
    except UserError as e:
        print(f"error: {e}", file=err)
        return
    out.write("\n")
    out.flush()
    print(format_stats(result.stats), file=err)
