"""What the console reads: messages over one or more lines, /commands, and text that is not valid UTF-8.

A message is one line, or several: a line ending in a backslash continues on the next one, and a line
that is exactly three double quotes opens a block that the next such line closes. A message whose first
word is a slash and letters only (`/reset`, `/foo`) is a command; other text beginning with a slash
(`/usr/bin is ...`) goes to the model.

Bytes that are not UTF-8 (stdin is read with surrogateescape, as Python reads argv) become U+FFFD, with
a note, so that one stray byte never ends the conversation.
"""
from __future__ import annotations

import re
from typing import TextIO

COMMANDS = {
    "/help": "show these commands",
    "/reset": "forget the conversation",
    "/exit": "quit",
}
HELP = (
    "commands: " + ", ".join(f"{name} {what}" for name, what in COMMANDS.items())
    + '; end a line with \\ to continue it, or put a message between lines of """; Ctrl-C stops a reply'
)
BLOCK_QUOTES = '"""'
_COMMAND = re.compile(r"/[A-Za-z_]+")
_ESCAPED_BYTE = re.compile(r"[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def replace_bad_bytes(text: str) -> tuple[str, int]:
    """text with each undecodable byte (a lone surrogate) replaced by U+FFFD, and how many there were."""
    return _ESCAPED_BYTE.subn("\ufffd", text)


def bad_bytes_note(count: int) -> str:
    return f"(note: {count} byte{'s' * (count > 1)} that are not UTF-8 became U+FFFD)"


def command_of(message: str) -> str | None:
    """The command a message is (its first word, e.g. '/reset'), or None for text meant for the model."""
    words = message.split()
    return words[0] if words and _COMMAND.fullmatch(words[0]) else None


def read_message(inp: TextIO, out: TextIO) -> str | None:
    """The next message, its lines joined by newlines (None at the end of input)."""
    line = inp.readline()
    if not line:
        return None
    text = line.rstrip("\n")
    if text.strip() == BLOCK_QUOTES:
        return _read_block(inp, out)
    parts = []
    while text.endswith("\\"):
        parts.append(text[:-1])
        out.write("... ")
        out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.rstrip("\n")
    else:
        parts.append(text)
    return "\n".join(parts)


def _read_block(inp: TextIO, out: TextIO) -> str:
    lines = []
    while True:
        out.write("... ")
        out.flush()
        line = inp.readline()
        if not line or line.rstrip("\n").strip() == BLOCK_QUOTES:
            return "\n".join(lines)
        lines.append(line.rstrip("\n"))
