"""Data pipeline throughput: `prepare` against a plain HF `tokenizers` encode loop over the
same documents, and the packed loader's tokens/s.

    python benchmarks/data_pipeline.py [--corpus default] [--repeat 3]

Targets (issue: data pipeline): prepare within 1.5x of the raw tokenizer; loader >= 20 M tokens/s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


from lmobjectives.corpus import iter_documents
from lmobjectives.data.loader import Loader, PackedSource
from lmobjectives.store.prepare import prepare_store
from lmobjectives.store.store import TokenStore
from lmobjectives.tokenizer import load_tokenizer


def raw_tokenizer_loop(corpus: list[str], tok) -> tuple[float, int]:  # noqa: ANN001
    """Reference: read the same documents, encode in batches, keep the ids in memory."""
    start = time.perf_counter()
    texts, n_bytes, n_tokens = [], 0, 0
    for doc in iter_documents(corpus, warn=lambda m: None):
        texts.append(doc.text)
        n_bytes += len(doc.text.encode())
        if len(texts) == 256:
            n_tokens += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
            texts = []
    if texts:
        n_tokens += sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return time.perf_counter() - start, n_bytes


def ours(corpus: list[str], tok, out: Path) -> float:  # noqa: ANN001
    start = time.perf_counter()
    prepare_store(corpus, tok, out, val_fraction=0.01, progress=False, warn=lambda m: None)
    return time.perf_counter() - start


def loader_throughput(store: TokenStore, batch: int, seq_len: int, n: int) -> float:
    src = PackedSource(store.split("train"), seq_len, seed=0, pad=1)
    loader = Loader([src], batch_size=batch)
    next(loader)  # the epoch's permutation is computed once, outside the timing
    start = time.perf_counter()
    for _ in range(n):
        next(loader)
    return n * batch * seq_len / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", action="append", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    corpus = args.corpus or ["default"]
    tok = load_tokenizer(None)
    tmp = Path(tempfile.mkdtemp(prefix="lmobj-bench-"))
    try:
        raw = min(raw_tokenizer_loop(corpus, tok)[0] for _ in range(args.repeat))
        _, n_bytes = raw_tokenizer_loop(corpus, tok)
        times = []
        for i in range(args.repeat):
            times.append(ours(corpus, tok, tmp / f"s{i}"))
        prep = min(times)
        store = TokenStore(tmp / "s0")
        rows = []
        for batch, seq in ((64, 512), (16, 2048), (8, 256)):
            rows.append((batch, seq, loader_throughput(store, batch, seq, 200)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mb = n_bytes / 1e6
    print(f"corpus: {', '.join(corpus)} ({mb:.2f} MB of text, {store.manifest['tokens']:,} tokens)")
    print()
    print("| stage                         | seconds | MB/s  | ratio to raw tokenizer |")
    print("|-------------------------------|--------:|------:|-----------------------:|")
    print(f"| raw tokenizers encode_batch   | {raw:7.2f} | {mb / raw:5.2f} | 1.00x |")
    print(f"| lmobj prepare (store written) | {prep:7.2f} | {mb / prep:5.2f} | {prep / raw:.2f}x time (target <= 1.5x) |")
    print()
    print("| loader batch x seq_len | tokens/s (M) | target |")
    print("|------------------------|-------------:|-------:|")
    for batch, seq, tps in rows:
        print(f"| {batch:>4} x {seq:<15} | {tps / 1e6:12.1f} | >= 20 M |")


if __name__ == "__main__":
    main()
