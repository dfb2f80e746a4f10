"""The two workloads speculation is measured on (issue 10), as prompts of token ids from held-out text.

(a) continuation: windows of the held-out standard-library file, each `length` tokens after BOS, spread evenly.
(b) edit: a function of that file (400-2000 characters), then a comment asking for the same function renamed and
the renamed `def` line, so that the reply rewrites the function with small changes.
"""
from __future__ import annotations

import re


def continuation_prompts(text: str, tokenizer, n: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(text)
    step = (len(ids) - length) // n
    return [[tokenizer.bos_id] + ids[i * step : i * step + length] for i in range(n)]


def edit_prompts(text: str, tokenizer, n: int) -> list[list[int]]:
    functions = [m.group(0) for m in re.finditer(r"(?ms)^def \w+\(.*?(?=^\S)", text) if 400 < len(m.group(0)) < 2000]
    prompts = []
    for f in functions[:: max(1, len(functions) // n)][:n]:
        renamed = re.sub(r"^def (\w+)", r"def \1_v2", f.splitlines()[0])
        prompts.append(tokenizer.encode(f + "\n\n# The same, renamed:\n" + renamed + "\n", bos=True))
    return prompts
