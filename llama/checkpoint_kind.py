"""Which checkpoints arrive already quantized (GGUF files, GPTQ/AWQ directories), decided without torch:
app.py checks its flags against this before anything slow is imported."""
from __future__ import annotations

import json
from pathlib import Path

GGUF_SUFFIX = ".gguf"


def is_gguf(path: Path | str) -> bool:
    """A .gguf file, or a directory holding .gguf files (and no config.json of another format)."""
    path = Path(path)
    if path.is_file():
        return path.suffix == GGUF_SUFFIX
    return path.is_dir() and any(path.glob(f"*{GGUF_SUFFIX}")) and not (path / "config.json").is_file()


def is_prequantized(path: Path | str) -> bool:
    """A GGUF, or a directory whose config.json has a quantization_config (GPTQ, AWQ and the variants refused later)."""
    config = Path(path) / "config.json"
    if is_gguf(path) or not config.is_file():
        return is_gguf(path)
    try:
        return "quantization_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False  # the reader reports a bad config.json, naming it
