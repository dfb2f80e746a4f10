"""The README stays true to the code: every flag documented and no documented flag missing; the CPU install."""
from __future__ import annotations

import re
from pathlib import Path

import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _parser_flags() -> set[str]:
    return {s for a in app.build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_every_flag_is_in_the_flag_table_and_every_documented_flag_exists():
    table = "\n".join(line for line in README.splitlines() if line.startswith("| `--"))
    documented = set(re.findall(r"--[a-z0-9_]+", table))
    assert _parser_flags() - documented == set()
    assert documented - _parser_flags() == set()


def test_cpu_install_uses_pytorchs_cpu_wheel_index_and_names_the_compiler():
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in README
    assert "C++ compiler" in README
