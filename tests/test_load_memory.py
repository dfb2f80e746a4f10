"""Loading holds each weight once: peak RSS while loading stays under 1.3x the weights' bytes.

Measured in a fresh subprocess on a model of about 225 MB in float32, from HF and Meta files, and
with a bfloat16 -> float32 conversion. The peak is the kernel's high-water mark of the process's
memory (VmHWM; not ru_maxrss, which Linux carries over from the parent across fork and exec).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import random_state, tiny_args
from llama.checkpoint_writer import write_hf_checkpoint, write_meta_checkpoint
from llama.config import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
ARGS = tiny_args("llama", dim=1024, n_heads=8, n_layers=2, ffn_dim=2816, vocab_size=16000, max_seq_len=64)

# Baseline after imports; then load, read every parameter once (so every page of the file is
# resident), and report the peak and the resident size in bytes.
MEASURE = r"""
import json, re, sys
import psutil, torch
from llama.loader import load_model
proc = psutil.Process()
base = proc.memory_info().rss
model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
with torch.no_grad():
    total = sum(float(p.float().sum()) for p in model.parameters())
    model(torch.tensor([[1, 2, 3]]))
status = open(f"/proc/{proc.pid}/status").read()
peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
print(json.dumps({"base": base, "peak": peak, "resident": proc.memory_info().rss, "finite": total == total}))
"""


def weight_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in args.weight_shapes().values()) * torch.empty((), dtype=dtype).element_size()


def measure(model_dir: Path, dtype: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model_dir), dtype], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    state = random_state(ARGS, seed=0)
    write_hf_checkpoint(state, ARGS, root / "hf")
    write_meta_checkpoint(state, ARGS, root / "meta")
    write_hf_checkpoint({k: v.bfloat16() for k, v in state.items()}, ARGS, root / "hf-bf16")
    return root


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize(
    "fmt, file, dtype",
    [("hf", "model.safetensors", "float32"), ("meta", "consolidated.00.pth", "float32"), ("hf-bf16", "model.safetensors", "float32")],
)
def test_peak_rss_while_loading_is_under_1_3x_the_weights(checkpoints: Path, fmt: str, file: str, dtype: str) -> None:
    file_bytes = (checkpoints / fmt / file).stat().st_size
    target = weight_bytes(ARGS, getattr(torch, dtype))
    assert file_bytes > 100e6 and target >= 200e6
    m = measure(checkpoints / fmt, dtype)
    assert m["finite"]
    # The weights really are in memory at the end (the measurement is not fooled by lazy maps) ...
    assert m["resident"] - m["base"] > 0.9 * target
    # ... and at no point was there much more than one copy of them.
    assert m["peak"] - m["base"] < 1.3 * target, f"peak {(m['peak'] - m['base']) / 1e6:.0f} MB for {target / 1e6:.0f} MB"
    if file_bytes >= target * 0.99:  # same dtype in the file: compared with the file size too
        assert m["peak"] - m["base"] < 1.3 * file_bytes
