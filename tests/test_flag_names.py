"""Every `--flag` that a message or docstring of the program names is a flag app.py really has."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import app

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "llama", "offload", "server")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*")


def _strings(path: Path) -> list[str]:
    """Every string constant in the module, f-string pieces included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _named_flags() -> dict[str, set[str]]:
    files = [ROOT / "app.py", *(p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")))]
    named: dict[str, set[str]] = {}
    for path in files:
        for text in _strings(path):
            for flag in FLAG.findall(text):
                named.setdefault(flag, set()).add(str(path.relative_to(ROOT)))
    return named


def test_every_flag_named_in_a_message_exists() -> None:
    parser_flags = {s for action in app.build_parser()._actions for s in action.option_strings}
    named = _named_flags()
    assert "--gpu_mem" in named and "--offload_exclusion" in named  # the scan does see messages
    unknown = {flag: sorted(files) for flag, files in named.items() if flag not in parser_flags}
    assert not unknown, f"flags named in messages but not in app.py's parser: {unknown}"
