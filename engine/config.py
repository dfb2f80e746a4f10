"""RunConfig: everything the command line decides, typed, as one frozen dataclass the library reads.

Values arrive here already parsed (engine/flag_values.py): sets, byte counts, a QuantMode, a DeviceSpec.
This module imports no torch, so that `app.py --help` and flag errors answer at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llama.generation_config import GenerationConfig
from llama.sampling_params import SamplingParams
from offload.quant_mode import QuantMode

BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "models" / "pytiny"
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
RESIDENT_PREFILL_CHUNK = 512  # prompt tokens per forward when the budget does not choose
SAVED_MODES = (QuantMode.INT8, QuantMode.INT4)  # what --save_quantized writes


@dataclass(frozen=True)
class DeviceSpec:
    """The --device flag, parsed: `auto` (cuda when available), `cpu`, `cuda` or `cuda:N`."""

    kind: str = "auto"  # auto | cpu | cuda
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


@dataclass(frozen=True)
class RunConfig:
    model_dir: Path = BUNDLED_MODEL
    tokenizer: Path | None = None  # None: look inside model_dir
    device: DeviceSpec = DeviceSpec()
    dtype: str = "auto"  # one of DTYPE_NAMES
    ctx: int | None = None  # context length; None: the model's, capped at 4096
    prefill_chunk: int | None = None  # None: RESIDENT_PREFILL_CHUNK, or with use_offload what the budget holds
    threads: int | None = None  # CPU threads for torch; None: leave torch's setting
    graphs: bool = True  # capture resident decode steps as CUDA graphs (--no_graphs: False)
    chat_format: str | None = None  # None: detected from the tokenizer
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # model_dir's generation_config.json as the edge read it (its sampling defaults are in `sampling` already;
    # its eos ids stop replies); None: read when the engine is built
    generation: GenerationConfig | None = None
    # offload and quantization
    use_offload: bool = False
    # None: the planner chooses. A set without gpu_mem: exactly these units stay resident; with gpu_mem a floor.
    offload_exclusion: frozenset[str] | None = None
    prefetch: int = 2
    gpu_mem: int | None = None  # bytes; None: free VRAM less a margin
    gpus: tuple[int, ...] | None = None  # --gpus: CUDA indices the blocks split across (one: that GPU alone)
    gpu_split: tuple[int, ...] | None = None  # bytes per GPU of gpus; None: each one's free VRAM less a margin
    quant: QuantMode | None = None  # --quant, or --use_8bit resolved (BNB resident, INT8 streamed)
    save_quantized: Path | None = None
    # modes
    prompt: str | None = None
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    ppl: Path | None = None
    serve: str | None = None  # [HOST:]PORT, checked by server.serve_spec
    shared_secret: str | None = None
    max_batch: int | None = None  # sequences the server decodes at once; None: what the memory holds (1 unserved)
    # speculative decoding (issue 10)
    draft: Path | None = None  # a draft model directory
    draft_quant: QuantMode | None = None  # INT8 or INT4: the draft's blocks in that format
    lookup: bool = False  # prompt-lookup drafting
    draft_tokens: int | None = None  # most tree tokens verified per pass; None: the planner's cap
    allowed_hosts: tuple[str, ...] = ()  # Host names the server answers to besides localhost and its address
    max_body: int = 2 * 2**20  # bytes: larger request bodies get a 413 (a full 128k-token context fits)
