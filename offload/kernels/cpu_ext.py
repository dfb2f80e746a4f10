"""Builds the CPU kernel extension just in time with ninja on first use, once per process.

The build lands in $TORCH_EXTENSIONS_DIR (default ~/.cache/llama-offload/ext), in a folder keyed by the
sources and where they are (ninja's build file holds their absolute paths: two checkouts sharing one
folder would rebuild each other's), flags, compiler ($CXX), torch and Python versions and the CPU's features (-march=native code must
not run on another CPU). If it cannot be built or loaded, `cpu_extension()` warns once and returns None,
and callers use the pure-torch reference path. LLAMA_OFFLOAD_EXT_VERBOSE=1 shows the compiler's output.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("bindings.cpp", "ext_int8.cpp", "ext_int4.cpp", "ext_decode.cpp", "block_step.cpp", "decode_stack.cpp",
           "gemv_int8.cpp", "gemv_int4.cpp", "gemv_int4_vnni.cpp", "gemv_dense.cpp", "linears.cpp", "decode_steps.cpp",
           "work_sharing.cpp", "gguf_blocks.cpp", "cpu_paths.cpp", "step_rows.cpp")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast")
NAME = "llama_offload_cpu_kernels"
_LOAD_LOCK = threading.Lock()  # the operators may be registered once per process


def _cpu_features() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in wanted}))


def build_directory() -> Path:
    """Where this machine's build of the current sources lives."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "llama-offload" / "ext")
    h = hashlib.sha256(str(CSRC.resolve()).encode())
    for f in sorted(CSRC.iterdir()):
        if f.suffix in (".cpp", ".h"):
            h.update(f.name.encode() + f.read_bytes())
    for part in (*CFLAGS, os.environ.get("CXX", "c++"), torch.__version__, sys.version, _cpu_features()):
        h.update(part.encode())
    return root / f"{NAME}_{h.hexdigest()[:16]}"


def build_cpu_extension(build_dir: Path) -> Any:
    """Compile (if needed) and load the extension from `build_dir`; returns its operator namespace
    `torch.ops.llama_offload` (int8_matmul, int4_matmul, linear, decode_block, vector_width,
    int4_rounds_activations, cpu_paths, set_cpu_paths, the gguf_* converters; the class DecodeStack is
    torch.classes.llama_offload.DecodeStack); raises if that fails."""
    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not (build_dir / f"{NAME}.so").exists()
    if fresh:
        print("llama-offload: compiling CPU kernels (first use, up to a minute)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cpp_extension.load(
        name=NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=os.environ.get("LLAMA_OFFLOAD_EXT_VERBOSE") == "1",
        is_python_module=False,
    )
    if fresh:
        print(f"llama-offload: CPU kernels built in {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
    return torch.ops.llama_offload


def cpu_extension() -> Any | None:
    """The compiled CPU kernels (`torch.ops.llama_offload`), or None after one warning when they cannot be
    built or loaded on this machine."""
    with _LOAD_LOCK:
        return _load_once()


@functools.cache
def _load_once() -> Any | None:
    try:
        return build_cpu_extension(build_directory())
    except Exception as e:  # no compiler, no ninja, build error, ABI mismatch: all mean "use the reference"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"llama-offload: CPU kernels unavailable ({reason}); using the slower pure-torch path",
                      RuntimeWarning, stacklevel=2)
        return None
