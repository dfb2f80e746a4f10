"""Building the CUDA int4 kernel, without a GPU: where the library goes, and a compiler failure's report."""
from __future__ import annotations

import stat
from pathlib import Path

import pytest

from offload.kernels import int4_gemv_cuda
from offload.kernels.int4_gemv_cuda import build_library, int4_gemv_library, library_path


def _fake_nvcc(tmp_path: Path, body: str) -> str:
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\n" + body)
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(nvcc)


def test_the_library_is_keyed_by_the_gpu_and_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    nvcc = _fake_nvcc(tmp_path, "exit 0\n")
    a, b = library_path(nvcc, "90"), library_path(nvcc, "89")
    assert a != b and a.parent == tmp_path and "sm90" in a.name
    source = tmp_path / "changed.cu"
    source.write_text(int4_gemv_cuda.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(int4_gemv_cuda, "SOURCE", source)
    assert library_path(nvcc, "90") != a


def test_a_compiler_failure_is_reported_in_one_line_and_leaves_no_library(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    nvcc = _fake_nvcc(tmp_path, "echo 'int4_gemv.cu(1): error: no such GPU' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="nvcc failed: .*no such GPU"):
        build_library(nvcc, "90")
    assert not library_path(nvcc, "90").exists()


def test_no_gpu_means_no_library():
    assert int4_gemv_library("cpu") is None
