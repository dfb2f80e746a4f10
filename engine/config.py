"""RunConfig: everything the command line decides, as one frozen dataclass the library reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llama.sampling import SamplingParams

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "pytiny"


@dataclass(frozen=True)
class RunConfig:
    model_dir: Path = BUNDLED_MODEL
    tokenizer: Path | None = None  # None: look inside model_dir
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    ctx: int | None = None  # context length; None: the model's, capped at 4096
    prefill_chunk: int = 512
    threads: int | None = None  # CPU threads for torch; None: leave torch's setting
    chat_format: str | None = None  # None: detected from the tokenizer
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # offload and quantization (issues 3 and 4)
    use_offload: bool = False
    offload_exclusion: str = ""  # as typed: "[w1,w2,w3]" or "w1,w2,w3"
    prefetch: int = 2
    gpu_mem: str | None = None
    use_8bit: bool = False
    quant: str | None = None  # None | int8 | int4
    save_quantized: Path | None = None
    # modes
    prompt: str | None = None
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    ppl: Path | None = None
    serve: str | None = None  # [HOST:]PORT
    shared_secret: str | None = None
