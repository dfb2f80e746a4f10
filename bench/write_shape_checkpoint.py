"""A Hugging Face checkpoint of a real shape with random weights and a tokenizer of its vocabulary size, so
that app.py can be timed as a user runs it on that shape.

    python bench/write_shape_checkpoint.py OUT_DIR [--shape smollm2-135m]
    python app.py OUT_DIR --prompt "..." --max_new_tokens 128 --threads 2 --temperature 0

Weights: transformers' own random initialisation (speed does not depend on values), saved as safetensors.
Tokenizer: a byte-level BPE tokenizer.json whose vocabulary is the 256 byte symbols, <|endoftext|>, and
placeholder words up to the shape's vocab_size, with no merges: text encodes byte by byte and every id the
random model emits decodes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shapes import SHAPES  # noqa: E402

EOS = "<|endoftext|>"


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = [EOS, *alphabet]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tokenizer = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": EOS}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    a = p.parse_args()
    import torch
    import transformers

    args = SHAPES[a.shape]
    cfg = transformers.LlamaConfig(**{k: v for k, v in args.to_hf_config().items() if k != "architectures"})
    torch.manual_seed(0)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(a.out_dir, safe_serialization=True)
    write_tokenizer(a.out_dir, args.vocab_size)
    print(f"wrote {a.shape} to {a.out_dir}")


if __name__ == "__main__":
    main()
