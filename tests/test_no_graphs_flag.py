"""--no_graphs: parsed into RunConfig.graphs, and the same reply with or without it (tests/test_decode_graphs_cuda.py
checks the captured steps themselves on a GPU)."""
from __future__ import annotations

from cli_runner import CPU_GREEDY, run_app
from tiny_model import make_tiny_model_dir

from app import build_parser, config_from_args


def test_the_flag_turns_graphs_off():
    assert config_from_args(build_parser().parse_args([])).graphs is True
    assert config_from_args(build_parser().parse_args(["--no_graphs"])).graphs is False


def test_no_graphs_gives_the_same_reply(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path)
    args = [str(model_dir), "--prompt", "The quick brown fox", "--max_new_tokens", "12", "--chat_format", "raw", *CPU_GREEDY]
    on, off = run_app(*args), run_app(*args, "--no_graphs")
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    assert on.stdout == off.stdout and on.stdout.strip()
