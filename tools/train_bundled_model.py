"""Train the bundled tiny Llama (models/pytiny) on the standard-library corpus, on one GPU in minutes.

Inputs: the corpus from tools/build_corpus.py, the vocabulary from tools/train_tokenizer.py and the
held-out file. Every 50th training module is kept aside as a validation set; the weights with the best
validation loss are the ones written. Each training sequence is BOS followed by a random window of the
token stream (modules joined with EOS), so the model learns to start from BOS anywhere in a file, which
is how perplexity chunks and prompts begin. bf16 autocast on CUDA, AdamW, linear warmup, then a cosine
schedule that ends at the wall-clock budget (--minutes) or the epoch budget (--max-epochs), whichever
comes first.

Writes to --out: config.json (HF), the weights under Meta names in bfloat16 as safetensors shards of at
most 15 MiB each (the device tool brings back files of at most 16 MiB), train_log.txt, and summary.json
with the held-out perplexity of the written (bf16-rounded) weights, computed in float32.
tools/export_bundled_model.py turns that directory into the HF model directory.

With --teacher DIR the model is distilled instead: its loss is the KL divergence from the teacher's
next-token distribution at every position (validation too), which is what a speculative draft is for:
it should predict what the target model would, not what the text says. The summary then also records
how often the two models' argmax agree on the held-out file.

    PYTHONUNBUFFERED=1 python -m tools.train_bundled_model --out $OUT/run
    python -m tools.train_bundled_model --out $OUT/draft --teacher models/pytiny --dim 192 --layers 3 \
        --heads 3 --kv-heads 1 --ffn 512 --max-epochs 30          # the bundled draft (models/pytiny-draft)
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from llama.config import ModelArgs
from llama.loader import load_model
from llama.model import Transformer
from llama.perplexity import perplexity
from llama.tokenizer import Tokenizer, load_tokenizer

SHARD_BYTES = 15 * 2**20
INIT_STD = 0.02


class Log:
    """Prints a line and appends it to train_log.txt."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w")

    def __call__(self, line: str) -> None:
        print(line)
        self.file.write(line + "\n")
        self.file.flush()


def tokenize_corpus(path: Path, tokenizer: Tokenizer, val_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) token streams: each module's ids then EOS; module i goes to val when i % val_every == 0."""
    train: list[int] = []
    val: list[int] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            ids = tokenizer.encode(json.loads(line)["text"], eos=True)
            (val if i % val_every == 0 else train).extend(ids)
    return torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long)


def init_weights(model: Transformer) -> None:
    # GPT-2 style: small normal init; the projections that add into the residual stream scaled by depth.
    residual_std = INIT_STD / math.sqrt(2 * model.args.n_layers)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=residual_std if name.endswith(("wo.weight", "w2.weight")) else INIT_STD)


def with_bos(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Inputs for windows (batch, ctx): BOS, then each window shifted right by one."""
    bos = torch.full_like(windows[:, :1], bos_id)
    return torch.cat([bos, windows[:, :-1]], dim=1)  # (batch, ctx)


def random_windows(stream: torch.Tensor, batch: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - ctx, (batch, 1), generator=gen, device=stream.device)
    return stream[starts + torch.arange(ctx, device=stream.device)]  # (batch, ctx)


def lm_loss(model: Transformer, windows: torch.Tensor, bos_id: int, autocast: bool) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(with_bos(windows, bos_id))  # (batch, ctx, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), windows.flatten())


def distill_loss(
    model: Transformer, windows: torch.Tensor, bos_id: int, autocast: bool, teacher: Transformer
) -> torch.Tensor:
    """KL(teacher || model) per position, averaged: the draft learns the target's distribution."""
    inputs = with_bos(windows, bos_id)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(inputs)  # (batch, ctx, vocab)
        with torch.no_grad():
            target = teacher(inputs)
    log_p = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)
    log_q = F.log_softmax(target.float(), dim=-1).flatten(0, 1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


LossFn = Callable[[Transformer, torch.Tensor, int, bool], torch.Tensor]


@torch.no_grad()
def val_loss(
    model: Transformer, stream: torch.Tensor, ctx: int, batch: int, bos_id: int, autocast: bool, loss_fn: LossFn
) -> float:
    windows = stream[: len(stream) // ctx * ctx].view(-1, ctx)  # (n_windows, ctx)
    losses = [loss_fn(model, w, bos_id, autocast).item() * len(w) for w in windows.split(batch)]
    return sum(losses) / len(windows)


@torch.no_grad()
def argmax_agreement(model: Transformer, teacher: Transformer, ids: list[int], ctx: int, device: torch.device) -> float:
    """Fraction of held-out positions (chunks of ctx) where the two models' most probable next tokens agree."""
    chunks = torch.tensor(ids[: len(ids) // ctx * ctx], device=device).view(-1, ctx)  # (n_chunks, ctx)
    agree = sum(int((model(c).argmax(-1) == teacher(c).argmax(-1)).sum()) for c in chunks.split(8))
    return agree / chunks.numel()


def learning_rate(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over --warmup steps, then cosine from --lr down to --lr * --min-lr-frac at progress 1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    floor = args.lr * args.min_lr_frac
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def save_shards(state: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """Write `state` as model-state-NNNNN.safetensors files of at most SHARD_BYTES each, in name order."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = state[name].contiguous()
        size += nbytes
    paths = [out / f"model-state-{i:05d}.safetensors" for i in range(len(shards))]
    for path, shard in zip(paths, shards):
        save_file(shard, str(path))
    return paths


@dataclass
class Best:
    """The weights with the lowest validation loss so far."""

    loss: float
    step: int
    state: dict[str, torch.Tensor]


def fit(
    model: Transformer,
    train: torch.Tensor,
    val: torch.Tensor,
    bos_id: int,
    args: argparse.Namespace,
    log: Log,
    loss_fn: LossFn,
) -> tuple[Best, int, float, float]:
    """Train until the time or epoch budget is spent; return (best, steps, epochs, seconds)."""
    cuda = train.is_cuda
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=cuda,
    )
    gen = torch.Generator(device=train.device).manual_seed(args.seed)
    best = Best(math.inf, -1, {})
    step, start = 0, time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        epochs = step * args.batch * args.ctx / len(train)
        # Training ends at progress 1: the time budget or the epoch budget, whichever comes first.
        progress = max(elapsed / (args.minutes * 60), epochs / args.max_epochs)
        done = progress >= 1
        if step % args.eval_every == 0 or done:
            vloss = val_loss(model, val, args.ctx, args.batch, bos_id, cuda, loss_fn)
            if vloss < best.loss:
                best = Best(vloss, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            log(f"step {step:6d}  {elapsed:6.1f} s  epoch {epochs:5.2f}  val loss {vloss:.4f}  "
                f"lr {learning_rate(step, progress, args):.2e}")
        if done:
            return best, step, epochs, time.perf_counter() - start
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, progress, args)
        loss = loss_fn(model, random_windows(train, args.batch, args.ctx, gen), bos_id, cuda)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log(f"step {step:6d}  train loss {loss.item():.4f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=Path(".corpus/train.jsonl.gz"))
    p.add_argument("--tokenizer", type=Path, default=Path("models/pytiny/tokenizer.model"))
    p.add_argument("--heldout", type=Path, default=Path("data/heldout_stdlib.txt"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", type=Path, help="distill from this model (a draft for speculative decoding)")
    p.add_argument("--minutes", type=float, default=5.5, help="wall-clock training budget")
    p.add_argument("--max-epochs", type=float, default=12.0, help="or stop after this many passes over the data")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--ctx", type=int, default=1024, help="training sequence length (= max_seq_len)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.5)
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation losses")
    p.add_argument("--val-every", type=int, default=50, help="every Nth module is validation")
    p.add_argument("--ppl-ctx", type=int, default=512, help="context of the final held-out perplexity")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "train_log.txt")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")  # TF32 while training; the final evaluation uses full fp32
    log(f"args: {vars(args)}")
    log(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")

    tokenizer = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    train, val = tokenize_corpus(args.corpus, tokenizer, args.val_every)
    train, val = train.to(device), val.to(device)
    log(f"tokens: train {len(train):,}, val {len(val):,} ({time.perf_counter() - t0:.1f} s to tokenize)")

    margs = ModelArgs(
        dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
        vocab_size=tokenizer.vocab_size, ffn_dim=args.ffn, max_seq_len=args.ctx,
    )
    model = Transformer(margs).to(device)
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {margs.to_hf_config()}; {n_params:,} parameters")

    teacher = load_model(args.teacher, torch.float32, device) if args.teacher else None
    loss_fn = partial(distill_loss, teacher=teacher) if teacher else lm_loss
    best, step, epochs, train_s = fit(model, train, val, tokenizer.bos_id, args, log, loss_fn)
    tok_s = step * args.batch * args.ctx / train_s
    log(f"trained {step} steps in {train_s:.1f} s ({tok_s:,.0f} tokens/s); "
        f"best val loss {best.loss:.4f} at step {best.step}")

    # Write the best weights in bf16, and evaluate exactly those (rounded) weights in float32.
    state = {k: v.to(torch.bfloat16).cpu() for k, v in best.state.items()}
    shards = save_shards(state, args.out)
    (args.out / "config.json").write_text(json.dumps(margs.to_hf_config(), indent=2) + "\n")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    torch.set_float32_matmul_precision("highest")
    heldout = tokenizer.encode(args.heldout.read_text(encoding="utf-8"), bos=True)
    ppl = perplexity(model, heldout, args.ppl_ctx, bos_id=tokenizer.bos_id, batch_size=16, progress=False)
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "parameters": n_params,
        "steps": step,
        "train_seconds": round(train_s, 1),
        "tokens_per_second": round(tok_s),
        "train_tokens": len(train),
        "epochs": round(epochs, 2),
        "best_step": best.step,
        "best_val_loss": round(best.loss, 4),
        "heldout_ppl_float32": round(ppl, 4),
        "heldout_ppl_ctx": args.ppl_ctx,
        "heldout_chunks": len(heldout) // args.ppl_ctx,
        "shards": [p.name for p in shards],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    if teacher is not None:
        summary["heldout_argmax_agreement"] = round(argmax_agreement(model, teacher, heldout, args.ppl_ctx, device), 4)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"held-out perplexity (float32, ctx {args.ppl_ctx}, {summary['heldout_chunks']} chunks): {ppl:.4f}")


if __name__ == "__main__":
    main()
