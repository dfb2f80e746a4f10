"""`app.py --help` and flag errors answer without importing torch (13-17 s on 2 cores before; now well under 1 s)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Run app.main in a fresh interpreter, then report whether torch was ever imported.
PROBE = """
import sys
import app
try:
    code = app.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print("torch imported" if "torch" in sys.modules else "no torch", code, file=sys.stderr)
"""


def _probe(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["--no_such_flag"], 2),
        (["--chat_format", "klingon"], 2),
        (["--offload_exclusion", "[w1,w9]", "--use_offload"], 2),
        (["--gpu_mem", "lots", "--use_offload"], 2),
        (["--gpus", "0,1", "--gpu_split", "4GiB", "--use_offload"], 2),
        (["--ppl", "/nonexistent/text.txt"], 2),
        (["--device", "tpu"], 2),
        (["--serve", "localhost:notaport"], 2),
        (["--use_8bit", "--quant", "int4"], 2),
        (["--save_quantized", "/tmp/out"], 2),
    ],
)
def test_help_and_flag_errors_do_not_import_torch(argv: list[str], code: int) -> None:
    r = _probe(*argv)
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"no torch {code}", r.stderr
    if code == 2:
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr


def test_exclusion_names_are_checked_without_a_gpu() -> None:
    r = _probe("--use_offload", "--offload_exclusion", "[w1,wz]")
    assert "'wz'" in r.stderr and "--offload_exclusion" in r.stderr and r.stderr.strip().endswith("no torch 2")
