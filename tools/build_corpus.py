"""Build the training corpus and the held-out slice from the running interpreter's standard library.

The corpus is the `.py` source of CPython's Lib (PSF License) minus test suites, generated tables and
vendored packages. A fixed list of whole modules is held out: their text goes to the committed
evaluation file (data/heldout_stdlib.txt), the rest to a gzipped JSON-lines file (one {"path", "text"}
per module, sorted by path) that the tokenizer and the model are trained on.

    python tools/build_corpus.py            # writes .corpus/train.jsonl.gz and data/heldout_stdlib.txt
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import sysconfig
from pathlib import Path

# Whole modules (a file, or every file of a package) held out of training, about 330 KB of source.
HELDOUT = (
    "colorsys.py", "csv.py", "difflib.py", "fractions.py", "graphlib.py", "heapq.py", "json/",
    "sched.py", "shlex.py", "statistics.py", "textwrap.py", "tomllib/",
)

# Folders that are tests, fixtures, generated data or not the standard library's own code.
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "lib-dynload", "__pycache__"}


def is_excluded(rel: Path) -> bool:
    parts = rel.parts
    return (
        any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1])
        or rel.name.startswith("_sysconfigdata")
    )


def is_heldout(rel: Path) -> bool:
    posix = rel.as_posix()
    return any(posix == h or (h.endswith("/") and posix.startswith(h)) for h in HELDOUT)


def stdlib_modules(lib: Path) -> list[tuple[str, str]]:
    """(relative path, text) of every corpus module under lib, sorted by path; undecodable files skipped."""
    modules = []
    for path in sorted(lib.rglob("*.py"), key=lambda p: p.relative_to(lib).as_posix()):
        rel = path.relative_to(lib)
        if is_excluded(rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            modules.append((rel.as_posix(), text))
    return modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--train-out", type=Path, default=Path(".corpus/train.jsonl.gz"))
    parser.add_argument("--heldout-out", type=Path, default=Path("data/heldout_stdlib.txt"))
    args = parser.parse_args()

    modules = stdlib_modules(args.lib)
    train = [(p, t) for p, t in modules if not is_heldout(Path(p))]
    heldout = [(p, t) for p, t in modules if is_heldout(Path(p))]
    args.train_out.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same source gives the same bytes.
    with gzip.GzipFile(args.train_out, "wb", mtime=0) as raw:
        for path, text in train:
            raw.write((json.dumps({"path": path, "text": text}) + "\n").encode())
    args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
    args.heldout_out.write_text("\n\n".join(t for _, t in heldout), encoding="utf-8")
    version = ".".join(map(str, sys.version_info[:3]))
    print(f"Python {version} Lib at {args.lib}")
    print(f"train: {len(train)} modules, {sum(len(t) for _, t in train):,} chars -> {args.train_out}")
    print(f"held out: {len(heldout)} modules, {sum(len(t) for _, t in heldout):,} chars -> {args.heldout_out}")
    for path, _ in heldout:
        print(f"  {path}")


if __name__ == "__main__":
    main()
