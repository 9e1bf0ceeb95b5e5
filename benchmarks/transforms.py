"""Throughput of the objective transforms against reference implementations, one core.

Run from the repository root::

    PYTHONPATH=src python benchmarks/transforms.py [--calls 40] [--json]

Every transform but FIM (see below) gets the same kind of batch: 64 packed rows of random
word ids from a vocabulary of 8192, a document (ended by EOS) every ~300 tokens, each row as
long as the objective asks for 512-token features (``row_length(512)``: 568 for span
corruption).
Tokens/s counts the row tokens a transform consumes. Ours and the reference are called in
turn, so both see the same load on a shared machine; the table gives the best call and the
median call. The ratio uses the best calls: on a busy machine the median mostly measures
the neighbours, while the best call stays close to the cost on an idle core.

References:

* ``mlm``: transformers' ``DataCollatorForLanguageModeling`` (mlm_probability 0.15) on a
  ``PreTrainedTokenizerFast`` built here from a WordLevel model with our special tokens,
  fed the rows as a list of 1-D LongTensors (what a DataLoader over token rows yields).
* ``span``, ``prefix``, ``ul2``: written below in the style of T5's preprocessors - one
  example at a time, numpy noise mask by shuffling segment marks, sentinel fill, EOS - the
  shape of T5's ``random_spans_noise_mask`` / ``noise_span_to_unique_sentinel`` and of HF's
  Flax T5 collator loop, with UL2 built from the same pieces as the UL2 paper's code.
* ``fim`` (fim_rate 0.5, spm_rate 0.5): the StarCoder training code's algorithm, one row at a
  time - split on EOS, a FIM coin per document, decode, cut at two sorted uniform character
  positions, re-encode the three parts, PSM or SPM, cut/pad to the row. FIM cuts characters,
  so its rows are real text, not random ids: the running interpreter's standard library
  ``.py`` files (the last ones, sorted by path) encoded with the shipped tokenizer, EOS
  between files; both sides get the same rows.

Adding a transform: write a reference factory and add a ``Bench`` to ``BENCHES``; the table
picks up every registered objective that has one.
"""

from __future__ import annotations

import os

# One core: set before numpy / torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmobjectives.objectives import OBJECTIVES, build_objective  # noqa: E402
from lmobjectives.objectives.base import Objective, Rows  # noqa: E402
from lmobjectives.objectives.span import corrupted_lengths  # noqa: E402
from lmobjectives.objectives.ul2 import DENOISERS  # noqa: E402
from lmobjectives.tokenizer import load_tokenizer  # noqa: E402
from lmobjectives.tokenizer.special import EOS, MASK, PAD, SPECIAL_TOKENS, SpecialIds  # noqa: E402

BATCH, SEQ_LEN, VOCAB, DOC_LEN = 64, 512, 8192, 300
SP = SpecialIds.default(VOCAB)
Transform = Callable[[Rows, np.random.Generator], object]


def make_rows(length: int, seed: int = 0) -> Rows:
    """BATCH rows of ``length`` word ids, EOS after each ~DOC_LEN-token document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(len(SPECIAL_TOKENS), VOCAB, (BATCH, length)).astype(np.int32)
    tokens[rng.random((BATCH, length)) < 1.0 / DOC_LEN] = SP.eos
    return Rows.from_tokens(tokens, SP.eos)


# --------------------------------------------------------------------------- (a) HF MLM collator


def hf_tokenizer():
    """A PreTrainedTokenizerFast over VOCAB ids whose first ids are our special tokens."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB)})
    others = [t for t in SPECIAL_TOKENS if t not in (EOS, PAD, MASK)]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token=PAD)),
        eos_token=EOS, pad_token=PAD, mask_token=MASK, unk_token=PAD,
        additional_special_tokens=others)


def reference_mlm() -> Transform:
    from transformers import DataCollatorForLanguageModeling

    tokenizer = hf_tokenizer()
    assert len(tokenizer) == VOCAB and tokenizer.mask_token_id == SP.mask
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)

    def run(rows: Rows, rng: np.random.Generator) -> dict:
        # One 1-D tensor per row, as a DataLoader hands them over (the split is ~1 % of a call).
        return collator(list(torch.from_numpy(rows.tokens.astype(np.int64))))
    return run


# --------------------------------------------------------------------------- (b) T5-style loops


def t5_noise_mask(length: int, density: float, mean_span: float,
                  rng: np.random.Generator) -> np.ndarray:
    """One example's T5 ``random_spans_noise_mask``, segment marks shuffled with numpy."""
    length_ = max(length, 2)
    n_noise = min(max(round(length_ * density), 1), length_ - 1)
    n_spans = min(max(round(n_noise / mean_span), 1), length_ - n_noise)

    def segmentation(n_items: int, n_segments: int) -> np.ndarray:
        marks = np.arange(n_items - 1) < n_segments - 1
        rng.shuffle(marks)
        segment = np.cumsum(np.concatenate([[0], marks]))
        return np.bincount(segment)

    noise = segmentation(n_noise, n_spans)
    clean = segmentation(length_ - n_noise, n_spans)
    interleaved = np.stack([clean, noise], axis=1).reshape(-1)
    starts = np.zeros(length_, dtype=np.int64)
    starts[np.cumsum(interleaved)[:-1]] = 1
    return (np.cumsum(starts) % 2 == 1)[:length]


def t5_span_to_sentinel(tokens: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """T5 ``noise_span_to_unique_sentinel`` with our sentinel ids."""
    prev = np.concatenate([[False], noise[:-1]])
    first = noise & ~prev
    sentinel = np.asarray(SP.sentinels)[np.maximum(np.cumsum(first) - 1, 0)]
    return np.where(first, sentinel, tokens)[~(noise & prev)]


def t5_example(tokens: np.ndarray, density: float, mean_span: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    noise = t5_noise_mask(tokens.size, density, mean_span, rng)
    inputs = np.append(t5_span_to_sentinel(tokens, noise), SP.eos)
    # T5's nonnoise_span_to_unique_sentinel, with the sentinel before each noise span.
    targets = np.append(t5_span_to_sentinel(tokens, ~noise), SP.eos)
    return inputs, targets


def pad_batch(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((len(seqs), max(s.size for s in seqs)), SP.pad, dtype=np.int32)
    for b, s in enumerate(seqs):
        out[b, :s.size] = s
    return out, np.array([s.size for s in seqs])


def reference_span() -> Transform:
    def run(rows: Rows, rng: np.random.Generator):
        pairs = [t5_example(row, 0.15, 3.0, rng) for row in rows.tokens]
        return pad_batch([p[0] for p in pairs]), pad_batch([p[1] for p in pairs])
    return run


def reference_prefix() -> Transform:
    def run(rows: Rows, rng: np.random.Generator):
        inputs, targets = [], []
        for row in rows.tokens:
            split = int(rng.integers(1, row.size))  # T5 random_prefix_noise_mask, density 0.5
            inputs.append(row[:split])
            targets.append(row[split:])
        return pad_batch(inputs), pad_batch(targets)
    return run


def reference_ul2() -> Transform:
    modes = {"R": SP.nlu, "X": SP.nlg, "S": SP.s2s}

    def run(rows: Rows, rng: np.random.Generator):
        inputs, targets = [], []
        for row in rows.tokens:
            d = DENOISERS[int(rng.integers(len(DENOISERS)))]
            if d.is_prefix_lm:
                split = int(rng.integers(1, row.size))
                x, y = row[:split], row[split:]
            else:
                x, y = t5_example(row, d.noise_density, d.mean_span, rng)
            inputs.append(np.concatenate([[modes[d.mode]], x]))
            targets.append(y)
        return pad_batch(inputs), pad_batch(targets)
    return run


# --------------------------------------------------------------------------- (c) FIM, real text

FIM_RATE = SPM_RATE = 0.5  # the FIM paper's common default; 50/50 PSM/SPM


@functools.cache
def code_tokenizer():  # -> tokenizers.Tokenizer
    return load_tokenizer(None)


def code_specials() -> SpecialIds:
    tok = code_tokenizer()
    return SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size())


def code_rows(length: int) -> Rows:
    """BATCH rows of ``length`` tokens of standard-library source, EOS after each file."""
    tok, sp = code_tokenizer(), code_specials()
    need = BATCH * length
    stream: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"), reverse=True):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        stream += tok.encode(text, add_special_tokens=False).ids + [sp.eos]
        if len(stream) >= need:
            break
    tokens = np.array(stream[:need], dtype=np.int32).reshape(BATCH, length)
    return Rows.from_tokens(tokens, sp.eos)


def fim_objective() -> Objective:
    return build_objective("fim", {"fim_rate": FIM_RATE, "spm_rate": SPM_RATE}, code_specials(),
                           tokenizer=code_tokenizer())


def reference_fim_row(row: np.ndarray, tok, sp: SpecialIds,  # noqa: ANN001
                      rng: np.random.Generator) -> np.ndarray:
    """One row the reference way: split on EOS, per segment a FIM coin; a FIM segment is
    decoded, cut at two sorted uniform character positions, and each part re-encoded."""
    out: list[int] = []
    ends = np.flatnonzero(row == sp.eos)
    start = 0
    for end in [*ends.tolist(), len(row)]:
        seg = row[start:end]
        if len(seg) and rng.random() < FIM_RATE:
            text = tok.decode(seg.tolist())
            lo, hi = sorted(rng.integers(0, len(text) + 1, size=2))
            prefix, middle, suffix = (tok.encode(part, add_special_tokens=False).ids
                                      for part in (text[:lo], text[lo:hi], text[hi:]))
            if rng.random() < SPM_RATE:
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


def reference_fim() -> Transform:
    tok, sp = code_tokenizer(), code_specials()

    def run(rows: Rows, rng: np.random.Generator) -> np.ndarray:
        return np.stack([reference_fim_row(r, tok, sp, rng) for r in rows.tokens])
    return run


# ===== Transforms under test =====


@dataclass(frozen=True)
class Bench:
    """One table row: the reference to beat, and how to build ours and its input rows."""

    label: str
    reference: Callable[[], Transform]
    objective: Callable[[str], Objective] = lambda name: build_objective(name, {}, SP)
    rows: Callable[[int], Rows] = make_rows


# Objective name -> its benchmark; the objective itself comes from the registry.
BENCHES: dict[str, Bench] = {
    "mlm": Bench("HF DataCollatorForLanguageModeling", reference_mlm),
    "span": Bench("T5-style per-example loop", reference_span),
    "prefix": Bench("T5-style per-example loop", reference_prefix),
    "ul2": Bench("T5-style per-example loop", reference_ul2),
    "fim": Bench("StarCoder-style decode/cut/re-encode", reference_fim,
                 objective=lambda name: fim_objective(), rows=code_rows),
}


# --------------------------------------------------------------------------- timing


def check_reference_agrees() -> None:
    """The loop reference and ours produce the same lengths for span corruption."""
    obj = build_objective("span", {}, SP)
    rows = make_rows(obj.row_length(SEQ_LEN))
    (inputs, n_in), (targets, n_tg) = reference_span()(rows, np.random.default_rng(0))
    want_in, want_tg = corrupted_lengths(rows.tokens.shape[1], 0.15, 3.0)
    assert (n_in == want_in).all() and (n_tg == want_tg).all() and want_in == SEQ_LEN


def time_pair(ours: Transform, reference: Transform, rows: Rows, calls: int) -> dict:
    """Alternate ours and the reference; per-call seconds of each."""
    rng_ours, rng_ref = np.random.default_rng(1), np.random.default_rng(2)
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for i in range(calls + 2):  # the first two calls warm caches and are dropped
        for key, fn, rng in (("ours", ours, rng_ours), ("reference", reference, rng_ref)):
            start = time.perf_counter()
            fn(rows, rng)
            if i >= 2:
                times[key].append(time.perf_counter() - start)
    return times


def entries() -> list[tuple[str, Transform, Transform, str, Rows]]:
    """(name, ours, reference, reference label, rows) for every objective with a benchmark."""
    out = []
    for name, bench in BENCHES.items():
        if name in OBJECTIVES:
            obj = bench.objective(name)
            rows = bench.rows(obj.row_length(SEQ_LEN))
            out.append((name, obj, bench.reference(), bench.label, rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    check_reference_agrees()
    results = []
    for name, ours, reference, label, rows in entries():
        times = time_pair(ours, reference, rows, args.calls)
        tokens = rows.tokens.size
        row = {"transform": name, "reference": label, "tokens_per_batch": tokens}
        for key, ts in times.items():
            row[f"{key}_median_tok_s"] = tokens / float(np.median(ts))
            row[f"{key}_best_tok_s"] = tokens / float(np.min(ts))
        row["ratio_best"] = row["ours_best_tok_s"] / row["reference_best_tok_s"]
        row["ratio_median"] = row["ours_median_tok_s"] / row["reference_median_tok_s"]
        results.append(row)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"batch {BATCH} x row_length({SEQ_LEN}), vocab {VOCAB}, one thread; {args.calls} "
          f"calls each, alternating; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores; M tokens/s, best call / median call")
    head = f"{'transform':10s} {'ours':>15s} {'reference':>15s} {'ratio':>7s}  reference"
    print(head)
    print("-" * len(head))
    for r in results:
        ours = f"{r['ours_best_tok_s'] / 1e6:6.1f} / {r['ours_median_tok_s'] / 1e6:6.1f}"
        ref = f"{r['reference_best_tok_s'] / 1e6:6.2f} / {r['reference_median_tok_s'] / 1e6:5.2f}"
        print(f"{r['transform']:10s} {ours:>15s} {ref:>15s} {r['ratio_best']:6.1f}x  "
              f"{r['reference']}")


if __name__ == "__main__":
    main()
