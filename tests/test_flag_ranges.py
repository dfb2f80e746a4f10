"""Numeric flags: out-of-range values are one line naming the flag; extreme but valid ones never make NaN."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from cli_runner import CPU_GREEDY, main_error, run_app
from tiny_model import make_tiny_model_dir

import app
from llama.sampling import Sampler, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("flags"))


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--seed", str(2**64)),
        ("--seed", "-1"),
        ("--prefill_chunk", "0"),
        ("--threads", "0"),
        ("--threads", "1000000"),
        ("--max_new_tokens", "0"),
        ("--max_batch", "0"),
        ("--top_k", "-1"),
        ("--repetition_window", "-3"),
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--top_p", "nan"),
        ("--repetition_penalty", "inf"),
        ("--mirostat_tau", "inf"),
    ],
)
def test_out_of_range_flag_is_named(model_dir, capsys, flag, value):
    assert flag in main_error(capsys, model_dir, "--prompt", "hi", flag, value)


@pytest.mark.parametrize(
    "flags", [["--temperature", "1e-300"], ["--repetition_penalty", "1e-300", "--temperature", "0.7"],
              ["--repetition_penalty", "1e300", "--temperature", "0.7"], ["--temperature", "1e300"]]
)
def test_extreme_sampling_values_still_reply(model_dir, capsys, flags):
    code = app.main([str(model_dir), "--prompt", "hello there", "--max_new_tokens", "6", "--device", "cpu",
                     "--seed", "3", *flags])
    assert code == 0, capsys.readouterr().err
    assert "decode 6 tok" in capsys.readouterr().err


def test_flags_through_the_command_line(model_dir):
    """A temperature that underflows float32 still answers; a seed past 64 bits is one line, exit 2."""
    r = run_app(str(model_dir), "--prompt", "hi", "--max_new_tokens", "3", "--device", "cpu", "--temperature", "1e-300")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    r = run_app(str(model_dir), "--prompt", "hi", "--seed", str(2**64))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--seed" in r.stderr


def test_tiny_temperature_is_greedy() -> None:
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(SamplingParams(temperature=1e-300, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    assert all(sampler.sample(logits, []) == int(logits.argmax()) for _ in range(20))


def test_tiny_repetition_penalty_keeps_logits_finite() -> None:
    logits = torch.tensor([3.0, 1.0, -2.0])
    sampler = Sampler(SamplingParams(temperature=0.7, repetition_penalty=1e-300, top_k=0, top_p=1.0, min_p=0.0,
                                     seed=1))
    assert {sampler.sample(logits, [1, 2]) for _ in range(20)} <= {0, 1, 2}


def test_nan_distribution_is_never_indexed_past_its_end() -> None:
    logits = torch.full((50,), math.nan)
    logits[7] = 1.0
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=10, top_p=1.0, min_p=0.0, seed=0))
    assert sampler.sample(logits, []) == 7
    all_nan = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    assert 0 <= all_nan.sample(torch.full((50,), math.nan), []) < 50


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_flag_sets_torch_threads(model_dir, capsys, restore_threads):
    assert app.main([str(model_dir), "--prompt", "hi", "--max_new_tokens", "1", "--threads", "1", *CPU_GREEDY]) == 0
    assert torch.get_num_threads() == 1
    assert app.main([str(model_dir), "--prompt", "hi", "--max_new_tokens", "1", "--threads", "3", *CPU_GREEDY]) == 0
    assert torch.get_num_threads() == 3


def test_threads_flag_is_honoured_in_a_user_run(model_dir):
    """As a user runs it (a fresh process, OMP_NUM_THREADS=1 in its environment): the loading line reports
    torch.get_num_threads() after the flag took effect."""
    import psutil

    for flag, threads in (["--threads", "3"], 3), ([], psutil.cpu_count(logical=False)):
        done = run_app(str(model_dir), "--prompt", "hi", "--max_new_tokens", "1", *flag, *CPU_GREEDY)
        assert done.returncode == 0, done.stderr
        assert f"on cpu ({threads} threads)" in done.stderr


def test_threads_default_is_the_physical_cores():
    import psutil

    assert app.config_from_args(app.build_parser().parse_args([])).threads == psutil.cpu_count(logical=False)
