"""A few tokens times a plain Int4Weight on CUDA through our own kernel (csrc/int4_gemv.cu), built with nvcc.

tinygemm, the one-token int4 kernel torch ships, read the 7B step's weights at 29-43% of the H200's memory
speed, which held resident int4 decode near 30% of its limit. This kernel reads the plain layout that
streams (no second layout to prepare), rounds x to int8 per 32 inputs and multiplies with integer dot
products (see the .cu file). A call of up to MAX_TOKENS tokens gives each token what a one-token call gives
it, bit for bit, so token trees and one-token steps agree.

It is compiled on first use with the CUDA compiler (`nvcc` under $CUDA_HOME, on PATH, or in /usr/local/cuda)
for the GPU at hand, into the same cache folder as the CPU kernels, and loaded with ctypes: a plain shared
library with one C entry point, so the build needs no torch headers. Without nvcc, or if the build fails,
`int4_gemv_library()` warns once and returns None, and callers keep tinygemm.

LLAMA_OFFLOAD_INT4_GEMV=0 turns it off (tinygemm then serves one-token steps): for debugging, and for
bench/decode_bench.py's comparison. On the H200 the 7B step's matmuls took 1.48 ms against tinygemm's 2.08
(bench/int4_gemv_bench.py; BENCHMARKS.md).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from typing import NamedTuple

import torch

from offload.kernels.int4_format import Int4Weight

SOURCE = Path(__file__).parent / "csrc" / "int4_gemv.cu"
DEFAULT_NVCC = Path("/usr/local/cuda/bin/nvcc")
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC")
# Launch shapes (the .cu file's launch_shape): number -> (warps a block, rows a group, chunks in flight a row, warps
# a group). Shapes of one group size give the same bits.
SHAPES = {1: (4, 4, 2, 1), 2: (4, 8, 1, 1), 3: (8, 4, 2, 1), 4: (4, 2, 2, 1), 5: (8, 4, 2, 2)}
MAX_TOKENS = 8  # tokens summed together; each gets what a one-token call would give it, bit for bit
MAX_CALL_TOKENS = 1024  # tokens one call takes, in chunks of MAX_TOKENS, each summed as a call of its own
SMEM_BYTES_PER_CHUNK = 44  # a token's int8 x per 32 inputs (32 bytes) and its three floats
PLAIN, RMS_NORM = 0, 1  # what the kernel multiplies (its Prologue)
SMEM_LIMIT = 200 * 1024  # of the 227 KB a Hopper block may have
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1}
_BUILD_LOCK = threading.Lock()
SWITCH = "LLAMA_OFFLOAD_INT4_GEMV"  # "0": leave the kernel out (see the module's docstring)


class RopeStore(NamedTuple):
    """A q/k/v projection's epilogue (see RopeStore in the .cu file): RoPE on q and k with cos, sin (batch, seqlen,
    head_dim // 2) in x's dtype, k and v stored into keys, values (slots, n_kv_heads, capacity, head_dim) at row b,
    position slots[b, t] (int64 (batch, seqlen)); as llama/fused_ops.py's rope_store."""
    n_heads: int
    n_kv_heads: int
    head_dim: int
    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


class _RopeStoreArgs(ctypes.Structure):  # the .cu file's struct RopeStore
    _fields_ = [("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("slots", ctypes.c_void_p),
                ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p),
                *[(name, ctypes.c_longlong) for name in ("c_b", "c_t", "c_i", "s_b", "s_t", "kv_b", "kv_h", "kv_p")],
                *[(name, ctypes.c_int) for name in ("seqlen", "n_heads", "n_kv_heads", "head_dim")]]


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found is None and DEFAULT_NVCC.exists():  # the toolkit's own place, often not on PATH
        found = str(DEFAULT_NVCC)
    return found


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def library_path(nvcc: str, arch: str) -> Path:
    """Where this machine's build of the current source for `arch` lives (keyed by source, flags, compiler)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "llama-offload" / "ext")
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (*NVCC_FLAGS, nvcc, str(Path(nvcc).resolve()), arch):
        h.update(part.encode())
    return root / f"llama_offload_int4_gemv_sm{arch}_{h.hexdigest()[:16]}.so"


def build_library(nvcc: str, arch: str) -> ctypes.CDLL:
    """Compile (if needed) and load the kernel's shared library for compute capability `arch`; raises on failure."""
    path = library_path(nvcc, arch)
    if not path.exists():
        print("llama-offload: compiling the CUDA int4 kernel (first use, a few seconds)...", file=sys.stderr,
              flush=True)
        start = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        cmd = [nvcc, *NVCC_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", str(SOURCE), "-o", str(partial)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(f"nvcc failed: {said[0] if said else f'exit status {done.returncode}'}")
        partial.replace(path)  # atomic: a concurrent process sees the whole library or none
        print(f"llama-offload: CUDA int4 kernel built in {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
    lib = ctypes.CDLL(str(path))
    lib.int4_gemv.restype = ctypes.c_int
    lib.int4_gemv.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                              ctypes.c_void_p, ctypes.c_float, *[ctypes.c_void_p] * 4, ctypes.c_int, ctypes.c_int,
                              ctypes.POINTER(_RopeStoreArgs), ctypes.c_void_p, *[ctypes.c_int] * 4, ctypes.c_void_p]
    return lib


def int4_gemv_library(device: torch.device | str = "cuda") -> ctypes.CDLL | None:
    """The compiled kernel for `device`'s GPU, or None: switched off, or (after one warning) it cannot be built
    or loaded."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    with _BUILD_LOCK:
        return _load_once(_arch(device))


@functools.cache
def _load_once(arch: str) -> ctypes.CDLL | None:
    if os.environ.get(SWITCH) == "0":
        return None
    nvcc = _nvcc()
    if nvcc is None:
        warnings.warn("llama-offload: no nvcc found (PATH, $CUDA_HOME): one-token int4 steps use torch's tinygemm",
                      RuntimeWarning, stacklevel=3)
        return None
    try:
        return build_library(nvcc, arch)
    except Exception as e:  # noqa: BLE001 - a build or load failure means "keep tinygemm"
        warnings.warn(f"llama-offload: the CUDA int4 kernel is unavailable ({e}); one-token int4 steps use "
                      "torch's tinygemm", RuntimeWarning, stacklevel=3)
        return None


def int4_gemv_fits(w: Int4Weight, tokens: int = 1) -> bool:
    """Whether the kernel takes this weight's shape for `tokens` tokens: inputs and groups multiples of 32
    inputs, fp16/bf16 scales, a chunk of tokens' int8 x within a block's shared memory."""
    k = w.in_features
    return (k % 32 == 0 and w.group_size % 32 == 0 and w.scales.dtype in _DTYPE_CODES and 1 <= tokens <= MAX_CALL_TOKENS
            and min(tokens, MAX_TOKENS) * ((k // 32) * SMEM_BYTES_PER_CHUNK + 4) <= SMEM_LIMIT)


def int4_gemv_supported(x: torch.Tensor, w: Int4Weight) -> bool:
    """Whether int4_gemv takes this pair: x [tokens <= MAX_CALL_TOKENS, in] in the scales' dtype, both on one CUDA
    device."""
    return (x.device.type == "cuda" and w.packed.device == x.device and x.dtype == w.scales.dtype
            and x.dim() == 2 and x.shape[1] == w.in_features and int4_gemv_fits(w, x.shape[0])
            and int4_gemv_library(x.device) is not None)


def launch_shape(out_features: int, in_features: int) -> int:
    """The launch shape fastest for a matrix of this size on the H200 (bench/int4_gemv_bench.py, Llama-2-7B's
    four): pairs of warps sharing each row for long rows (w2: 11.4 us against 13.5 for a warp a row; groups of 4
    and 8 warps, or more of them for wo, were slower), 8 warps of 4 rows for few rows (wo), 4 warps of 8 rows for
    8-16k rows (wqkv), 4 warps of 4 rows above (w13)."""
    if in_features > 8192:
        return 5
    if out_features <= 4096:
        return 3
    return 2 if out_features <= 16384 else 1


def int4_gemv(
    x: torch.Tensor, w: Int4Weight, shape: int | None = None, *, norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None, gated: bool = False, rope: RopeStore | None = None,
) -> torch.Tensor:
    """x [tokens, in] @ dequantized(w).T -> [tokens, out] in x's dtype (int4_gemv_supported must hold).

    norm (weight [in], eps): multiply RMSNorm(x) * weight instead of x. residual [tokens, out]: added to the
    result. gated: w stacks a gate weight over an up weight (w1 over w3), and the result is
    SiLU(gate) * up, [tokens, out / 2]. rope: w is a stacked q/k/v weight; k and v go to the cache and the result
    is rotated q, [tokens, n_heads * head_dim] (tokens = batch * seqlen of rope's slots)."""
    lib = int4_gemv_library(x.device)
    assert lib is not None and not (gated and (residual is not None or w.out_features % 2))
    x, packed = _aligned(x.contiguous()), _aligned(w.packed.contiguous())
    scales, zeros = w.scales.contiguous(), w.zeros.contiguous()
    outputs = w.out_features // 2 if gated else w.out_features if rope is None else rope.n_heads * rope.head_dim
    y = torch.empty(x.shape[0], outputs, dtype=x.dtype, device=x.device)
    rope_args = None if rope is None else _rope_args(rope, x)
    prologue, norm_ptr, eps = PLAIN, None, 0.0
    if norm is not None:
        norm_weight = _aligned(norm[0].to(x.dtype).contiguous())
        assert norm_weight.shape == (w.in_features,)
        prologue, norm_ptr, eps = RMS_NORM, norm_weight.data_ptr(), float(norm[1])
    res_ptr, res_stride = None, 0
    if residual is not None:
        residual = residual.contiguous()
        assert residual.shape == y.shape and residual.dtype == y.dtype and residual.device == y.device
        res_ptr, res_stride = residual.data_ptr(), residual.stride(0)
    shape = launch_shape(w.out_features, w.in_features) if shape is None else shape
    err = lib.int4_gemv(_DTYPE_CODES[x.dtype], shape, x.shape[0], x.data_ptr(), x.stride(0), prologue, norm_ptr,
                        eps, packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), res_ptr, res_stride,
                        int(gated), None if rope_args is None else ctypes.byref(rope_args), y.data_ptr(), y.stride(0),
                        w.out_features, w.in_features, scales.shape[1], torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"int4_gemv: CUDA error {err} launching the kernel")
    return y


def _rope_args(rope: RopeStore, x: torch.Tensor) -> _RopeStoreArgs:
    bsz, seqlen = rope.slots.shape
    assert bsz * seqlen == x.shape[0] and rope.slots.dtype == torch.int64
    assert rope.cos.shape == rope.sin.shape == (bsz, seqlen, rope.head_dim // 2) and rope.cos.stride() == rope.sin.stride()
    assert all(t.dtype == x.dtype and t.device == x.device for t in (rope.cos, rope.sin, rope.keys, rope.values))
    assert rope.keys.stride() == rope.values.stride() and rope.keys.stride(3) == 1 and rope.slots.device == x.device
    return _RopeStoreArgs(rope.cos.data_ptr(), rope.sin.data_ptr(), rope.slots.data_ptr(), rope.keys.data_ptr(),
                          rope.values.data_ptr(), *rope.cos.stride(), *rope.slots.stride(), *rope.keys.stride()[:3],
                          seqlen, rope.n_heads, rope.n_kv_heads, rope.head_dim)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself when it starts on a 16-byte boundary (the kernel's vector loads), else an aligned copy."""
    return t if t.data_ptr() % 16 == 0 else t.clone()
