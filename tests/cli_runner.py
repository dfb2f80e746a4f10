"""app.py run two ways: as a subprocess (what a user sees) and through app.main (the same code, no start-up cost)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import app
from offload.kernels.cpu_ext import build_directory

ROOT = Path(__file__).resolve().parent.parent
CPU_GREEDY = ["--temperature", "0", "--device", "cpu", "--dtype", "float32"]


def run_app(*args: str, stdin: str | bytes = "", timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """app.py in a subprocess; stdin as text, or as raw bytes (then stdout and stderr are bytes too); env: more
    environment variables."""
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        input=stdin,
        capture_output=True,
        text=isinstance(stdin, str),
        timeout=timeout,
        cwd=ROOT,
        # The compiled CPU kernels of this checkout, wherever this process keeps them: built once, not per run.
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TORCH_EXTENSIONS_DIR": str(build_directory().parent),
             **(env or {})},
    )


def main_error(capsys, *args: str) -> str:
    """The one error line app.main prints for args, asserting exit code 2 and nothing else on stderr but notes."""
    code = app.main([str(a) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    return errors[0]
