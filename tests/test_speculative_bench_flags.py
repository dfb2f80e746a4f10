"""bench/speculative_bench.py refuses ring and tree sizes the engine cannot take with one line and exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("flags, said", [(["--slots", "0"], "--slots must be at least 1, got 0"),
                                         (["--tree-cap", "1"], "--tree-cap must be at least 2, got 1")])
def test_bad_slots_and_tree_cap_are_one_line_errors(flags, said):
    r = subprocess.run([sys.executable, "bench/speculative_bench.py", "--device", "cpu", *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
