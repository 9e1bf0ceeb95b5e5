"""FIM transform throughput: ours (split tables, vectorised numpy) against a per-document
reimplementation of the reference algorithm (decode -> cut characters -> re-encode each part,
as in the StarCoder training code), at fim_rate 0.5 and spm_rate 0.5, single thread.

Data: the running interpreter's standard library ``.py`` files, a byte-level BPE tokenizer with
8192 ids trained on them in-process, packed into rows of 64 x 512 tokens with EOS between
files. Tokens/s counts input tokens (64 x 512 per batch); both sides get the same batches.

For the merged benchmark suite: ``ours()`` and ``reference()`` each return a zero-argument
step that transforms the next batch and returns the number of input tokens it took;
``main()`` times both and prints a table.

    PYTHONPATH=src python benchmarks/fim_transform.py
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one core for the tokenizer too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools
import statistics
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmobjectives.objectives.base import Rows
from lmobjectives.objectives.fim import FIM
from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds

BATCH, ROW = 64, 512
N_BATCHES = 16
VOCAB = 8192
TRAIN_BYTES = 4_000_000  # enough stdlib text for a stable 8192-id vocabulary
FIM_RATE = SPM_RATE = 0.5

Step = Callable[[], int]


@dataclass(frozen=True)
class Setup:
    tokenizer: Tokenizer
    specials: SpecialIds
    batches: list[Rows]  # N_BATCHES of (BATCH, ROW)
    fim: FIM
    table_seconds: float


def stdlib_sources() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        try:
            out.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


@functools.cache
def setup() -> Setup:
    texts = stdlib_sources()
    sizes = np.cumsum([len(t) for t in texts])
    tok = train_tokenizer(texts[: int(np.searchsorted(sizes, TRAIN_BYTES)) + 1])
    specials = SpecialIds.from_vocab(tok.get_vocab(), tok.get_vocab_size())
    # Rows come from files the tokenizer was not trained on, taken from the end of the list.
    need = N_BATCHES * BATCH * ROW
    stream: list[int] = []
    for text in reversed(texts):
        stream += tok.encode(text, add_special_tokens=False).ids + [specials.eos]
        if len(stream) >= need:
            break
    tokens = np.array(stream[:need], dtype=np.int32).reshape(N_BATCHES, BATCH, ROW)
    batches = [Rows.from_tokens(b, specials.eos) for b in tokens]
    t0 = time.perf_counter()
    fim = FIM.from_tokenizer(tok, fim_rate=FIM_RATE, spm_rate=SPM_RATE)
    return Setup(tok, specials, batches, fim, time.perf_counter() - t0)


def ours() -> Step:
    s = setup()
    rng = np.random.default_rng(0)
    state = {"i": 0}

    def step() -> int:
        rows = s.batches[state["i"] % len(s.batches)]
        state["i"] += 1
        s.fim(rows, rng)
        return rows.tokens.size

    return step


def reference_row(row: np.ndarray, tok: Tokenizer, sp: SpecialIds,
                  rng: np.random.RandomState) -> np.ndarray:
    """One row, the reference way: split on EOS, per segment a FIM coin; a FIM segment is
    decoded, cut at two sorted uniform character positions, and each part re-encoded."""
    out: list[int] = []
    ends = np.flatnonzero(row == sp.eos)
    start = 0
    for end in [*ends.tolist(), len(row)]:
        seg = row[start:end]
        if len(seg) and rng.binomial(1, FIM_RATE):
            text = tok.decode(seg.tolist())
            lo, hi = sorted(rng.randint(0, len(text) + 1, size=2))
            prefix, middle, suffix = (tok.encode(part, add_special_tokens=False).ids
                                      for part in (text[:lo], text[lo:hi], text[hi:]))
            if rng.binomial(1, SPM_RATE):
                out += [sp.fim_prefix, sp.fim_suffix, *suffix, sp.fim_middle, *prefix, *middle]
            else:
                out += [sp.fim_prefix, *prefix, sp.fim_suffix, *suffix, sp.fim_middle, *middle]
        else:
            out += seg.tolist()
        if end < len(row):
            out.append(sp.eos)
        start = end + 1
    out = out[: len(row)] + [sp.fim_pad] * max(0, len(row) - len(out))
    return np.array(out, dtype=np.int32)


def reference() -> Step:
    s = setup()
    rng = np.random.RandomState(0)
    state = {"i": 0}

    def step() -> int:
        rows = s.batches[state["i"] % len(s.batches)]
        state["i"] += 1
        np.stack([reference_row(r, s.tokenizer, s.specials, rng) for r in rows.tokens])
        return rows.tokens.size

    return step


@dataclass(frozen=True)
class Timing:
    tokens_per_s: float  # median over calls, wall clock
    cpu_tokens_per_s: float  # median over calls, this process's CPU time (robust to a busy machine)
    ms_per_batch: float  # median wall clock
    calls: int


def measure(step: Step, seconds: float, warmup: int = 2) -> Timing:
    """Time calls of ``step`` for about ``seconds`` (at least 5 calls) after a warm-up."""
    for _ in range(warmup):
        step()
    wall, cpu, tokens = [], [], []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(wall) < 5:
        t0, c0 = time.perf_counter(), time.process_time()
        tokens.append(step())
        wall.append(time.perf_counter() - t0)
        cpu.append(max(time.process_time() - c0, 1e-9))
    return Timing(statistics.median(n / t for n, t in zip(tokens, wall)),
                  statistics.median(n / t for n, t in zip(tokens, cpu)),
                  1e3 * statistics.median(wall), len(wall))


def main() -> None:
    s = setup()
    t = s.fim.tables
    assert t is not None
    print(f"data: {len(s.batches)} batches of {BATCH}x{ROW} stdlib tokens, vocab {VOCAB}; "
          f"tables: {len(t.split_offset)} splits, {len(t.pieces)} piece ids, "
          f"built in {s.table_seconds:.2f} s")
    results = [(name, measure(make(), secs)) for name, make, secs in
               (("reference (decode/cut/re-encode)", reference, 8.0),
                ("ours (split tables, numpy)", ours, 4.0))]
    ref = results[0][1]
    print(f"{'variant':34} {'wall tok/s':>11} {'cpu tok/s':>11} {'ms/batch':>9} {'calls':>6} "
          f"{'speed-up wall/cpu':>18}")
    for name, t in results:
        print(f"{name:34} {t.tokens_per_s / 1e6:>9.2f} M {t.cpu_tokens_per_s / 1e6:>9.2f} M "
              f"{t.ms_per_batch:>9.2f} {t.calls:>6} {t.tokens_per_s / ref.tokens_per_s:>8.1f}x /"
              f"{t.cpu_tokens_per_s / ref.cpu_tokens_per_s:>6.1f}x")


if __name__ == "__main__":
    main()
