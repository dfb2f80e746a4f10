"""CUDA tests that need bitsandbytes skip where it is missing instead of failing (checked without a GPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_resident_use_8bit_case_skips_without_bitsandbytes():
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "pretend_cuda_without_bitsandbytes",
         str(TESTS / "test_engine_cuda.py"), "-k", "use_8bit-resident", "-p", "no:cacheprovider"],
        capture_output=True, text=True, timeout=300, cwd=TESTS.parent,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"},
    )
    assert "1 skipped" in r.stdout and "needs bitsandbytes" in r.stdout, r.stdout + r.stderr
