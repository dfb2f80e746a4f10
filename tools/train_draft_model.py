"""Train the bundled model's draft (models/pytiny-draft) for speculative decoding, on a CPU in minutes.

The same recipe, corpus, tokenizer and validation split as tools/train_bundled_model.py (whose code
this reuses), at a shape about 7x smaller than pytiny's, so that a draft step costs a fraction of a
target pass. Its defaults are the shipped draft's; on a GPU the same command trains it in seconds.

    python tools/build_corpus.py --train-out .corpus/train.jsonl.gz
    PYTHONUNBUFFERED=1 python -m tools.train_draft_model --out RUN
    cp models/pytiny/tokenizer.model models/pytiny-draft/
    python -m tools.export_bundled_model --run RUN --out models/pytiny-draft
    python -m tools.measure_acceptance --draft models/pytiny-draft     # acceptance on held-out text
"""
from __future__ import annotations

from tools.train_bundled_model import main, parse_args

DRAFT_SHAPE = {
    "dim": 128,
    "layers": 2,
    "heads": 2,
    "kv_heads": 1,
    "ffn": 384,
    "batch": 16,
    "ctx": 512,
    "lr": 3e-3,
    "warmup": 20,
    "weight_decay": 0.1,
    "minutes": 40.0,
    "max_epochs": 6.0,
    "eval_every": 25,
}

if __name__ == "__main__":
    main(parse_args(doc=__doc__, **DRAFT_SHAPE))
