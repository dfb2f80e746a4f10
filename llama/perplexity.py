"""Perplexity of a text, with llama.cpp's convention (so numbers compare with its `perplexity` tool).

The text's tokens are cut into chunks of `ctx` tokens (a shorter tail is dropped). Each chunk is run
on its own, its first token replaced by BOS when the model's tokenizer adds one (`add_bos`), and only the second half of its positions is scored:
position j predicts token j + 1 for j in [ctx // 2, ctx - 1), so every scored token has at least
ctx // 2 tokens of context. Perplexity is exp of the mean negative log-likelihood over all scored tokens.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llama.errors import UserError
from llama.model import Transformer
from llama.tokenizer import Tokenizer

MIN_CTX = 4  # the scored half must hold at least one prediction


def perplexity(
    model: Transformer,
    token_ids: Sequence[int],
    ctx: int,
    bos_id: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Perplexity of `token_ids` in chunks of `ctx` (see the module docstring).

    bos_id: put in place of each chunk's first token (None: keep the text's own token).
    batch_size: chunks per forward pass. progress: a tqdm bar with the running perplexity on stderr.
    """
    if ctx < MIN_CTX:
        raise ValueError(f"ctx must be at least {MIN_CTX}, got {ctx}")
    n_chunks = len(token_ids) // ctx
    if n_chunks == 0:
        raise ValueError(f"{len(token_ids)} tokens are fewer than one chunk of {ctx}")
    device = model.tok_embeddings.weight.device  # where the forward pass takes its tokens
    chunks = torch.tensor(token_ids[: n_chunks * ctx], dtype=torch.long).view(n_chunks, ctx)  # (n_chunks, ctx)
    first = ctx // 2
    nll_sum, n_scored = 0.0, 0
    bar = tqdm(total=n_chunks, unit="chunk", desc="perplexity", file=sys.stderr, disable=not progress)
    with torch.inference_mode():
        for start in range(0, n_chunks, batch_size):
            targets = chunks[start : start + batch_size].to(device)  # (batch, ctx)
            inputs = targets.clone()
            if bos_id is not None:
                inputs[:, 0] = bos_id
            logits = model(inputs)[:, first : ctx - 1].float()  # (batch, ctx - 1 - first, vocab)
            nll = F.cross_entropy(logits.flatten(0, 1), targets[:, first + 1 :].flatten(), reduction="sum")
            nll_sum += nll.item()
            n_scored += targets.shape[0] * (ctx - 1 - first)
            bar.update(targets.shape[0])
            bar.set_postfix(ppl=f"{math.exp(nll_sum / n_scored):.4f}")
    bar.close()
    return math.exp(nll_sum / n_scored)


def run_perplexity(model: Transformer, tokenizer: Tokenizer, path: Path, ctx: int) -> float:
    """Perplexity of the text file at `path` (what `app.py --ppl FILE --ctx N` runs); prints the result line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ppl {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--ppl {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UserError(f"--ppl {path}: file is empty")
    if ctx < MIN_CTX:
        raise UserError(f"--ctx {ctx}: must be at least {MIN_CTX}")
    if ctx > model.args.max_seq_len:
        raise UserError(f"--ctx {ctx}: longer than the model's context of {model.args.max_seq_len} tokens")
    # Tokenized with a leading BOS where the model adds one, as llama.cpp does; each chunk's first token
    # becomes BOS then anyway.
    ids = tokenizer.encode(text, bos=True)
    if len(ids) < ctx:
        raise UserError(f"--ppl {path}: {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
    ppl = perplexity(model, ids, ctx, bos_id=tokenizer.bos_id if tokenizer.add_bos else None)
    print(f"perplexity: {ppl:.4f} over {len(ids) // ctx} chunks of {ctx} tokens")
    return ppl
