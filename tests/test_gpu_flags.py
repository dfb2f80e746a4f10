"""--gpus and --gpu_split: parsed and checked at the edge (one line naming the flag, exit 2), and the streaming
settings they give; the split they ask for, run with both devices on the CPU, decodes the unsplit tokens."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_runner import main_error
from conftest import greedy
from fixtures import make_meta_checkpoint, tiny_args
from offload_testing import PROMPT, resident

import app
from engine.build import _offload_config
from engine.choices import pick_gpus
from engine.config import DeviceSpec
from engine.llama_offload import build_offloaded_model
from llama.errors import UserError

GiB = 2**30


def config(*argv: str):
    return app.config_from_args(app.build_parser().parse_args(list(argv)))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "0,x", "--use_offload"], "--gpus: cannot read '0,x'"),
        (["--gpus", "0,1"], "--gpus and --gpu_split only apply with --use_offload"),
        (["--gpu_split", "4GiB,lots", "--use_offload"], "--gpu_split: cannot read 'lots'"),
        (["--gpu_split", "4GiB,0GiB", "--use_offload"], "--gpu_split: every budget must be more than 0"),
        (["--gpus", "0,1", "--gpu_split", "4GiB", "--use_offload"], "--gpu_split gives 1 budgets for the 2 GPUs"),
        (["--gpus", "0,0", "--use_offload"], "--gpus lists GPU 0 twice"),
        (["--gpu_split", "4GiB,4GiB", "--gpu_mem", "4GiB", "--use_offload"], "--gpu_mem and --gpu_split"),
        (["--gpus", "0,1", "--device", "cuda:1", "--use_offload"], "--device cuda:1 and --gpus"),
    ],
)
def test_gpu_flag_errors(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    assert message in main_error(capsys, *argv)


def test_gpu_flags_parse() -> None:
    cfg = config("--use_offload", "--gpus", "1,0", "--gpu_split", "10GiB,24GiB")
    assert cfg.gpus == (1, 0) and cfg.gpu_split == (10 * GiB, 24 * GiB) and cfg.gpu_mem is None
    assert config("--use_offload", "--gpu_split", "4GiB,6GiB").gpus == (0, 1)
    assert config("--use_offload", "--gpus", "0,0", "--gpu_split", "3GiB,3GiB").gpus == (0, 0)  # one card, two shares
    assert config("--use_offload").gpus is None


def test_one_gpu_listed_is_a_plain_run_on_it() -> None:
    cfg = config("--use_offload", "--gpus", "1", "--gpu_split", "6GiB")
    assert cfg.device == DeviceSpec("cuda", 1) and cfg.gpu_mem == 6 * GiB and cfg.gpu_split is None


def test_unknown_gpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="--gpus: there is no GPU 1 here"):
        pick_gpus((0, 1))
    assert pick_gpus((0, 0)) == (torch.device("cuda", 0),) * 2


def test_flags_give_a_split_that_decodes_the_unsplit_tokens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The streaming settings the flags make, with the two GPUs swapped for the CPU twice."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = tiny_args(n_layers=4)
    state = make_meta_checkpoint(args, tmp_path, seed=7)
    budgets = config("--use_offload", "--gpus", "0,1", "--gpu_split", "1GiB,2GiB")
    assert _offload_config(budgets, torch.float16, torch.device("cuda"), 64, 1, None).device_budgets == (GiB, 2 * GiB)
    # Exclusions without budgets are taken literally: every block streams.
    cfg = config(str(tmp_path), "--use_offload", "--gpus", "0,1", "--offload_exclusion", "[]", "--prefetch", "1")
    offload = _offload_config(cfg, torch.float32, torch.device("cuda"), 64, 1, None)
    assert offload.devices == (torch.device("cuda", 0), torch.device("cuda", 1))
    assert offload.device_budgets is None and offload.exclusions == frozenset() and offload.n_slots == 1
    cpu = torch.device("cpu")
    model, off = build_offloaded_model(tmp_path, replace(offload, device=cpu, devices=(cpu, cpu), split=(2, 2),
                                                         verbose=False))
    ref = greedy(resident(args, state, "cpu", torch.float32), PROMPT, 10)
    tokens, logits = greedy(model, PROMPT, 10, cache_devices=off.block_devices)
    assert off.streamed_bytes > 0 and tokens == ref[0] and torch.equal(logits, ref[1])
