"""Helpers for the reliability tests: a tiny synthetic corpus and store, the CLI run
in-process (captured) or in a forked child (killable), and run-directory readers."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np

WORDS = ("the a of to in is it that for on with as was by be this are from or at an "
         "model data token loss step batch run value table store test check byte").split()
TIMING_KEYS = ("tokens_per_second", "step_seconds")


def write_corpus(root: Path, n_docs: int = 12, words: int = 40, seed: int = 0) -> Path:
    """``n_docs`` plain-text files of ``words`` random words each (deterministic)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), words))
        (root / f"doc{i:03d}.txt").write_text(text + ".\n")
    return root


def make_store(root: Path, **corpus_kw) -> Path:
    """A store of the synthetic corpus, tokenized with the shipped tokenizer, no val split."""
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    corpus = write_corpus(root / "corpus", **corpus_kw)
    prepare_store([str(corpus)], load_tokenizer(None), root / "store", val_fraction=0.0,
                  progress=False)
    return root / "store"


def tiny_args(store: Path, out: Path, steps: int = 12, *extra: str, every: int = 3,
              accum: int = 1) -> list[str]:
    return ["train", "--objective", "clm", "--preset", "tiny", "--data", str(store), "--seq-len", "32",
            "--batch-size", "2", "--grad-accum", str(accum), "--steps", str(steps),
            "--checkpoint-every", str(every), "--out", str(out), "--json",
            "--set", "model.precision=fp32", *extra]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``lmobj ARGS`` in this process: (exit code, stdout, stderr). Any exception other than
    SystemExit propagates, i.e. fails the test the way a traceback would."""
    from lmobjectives.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["lmobj", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def _child(args: list[str], log: str, hook: Callable[[], None] | None) -> None:
    sys.stdout = sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115 - the child exits
    if hook is not None:
        hook()
    from lmobjectives.cli import main

    sys.argv = ["lmobj", *args]
    main()


def start_child(args: list[str], log: Path, hook: Callable[[], None] | None = None
                ) -> multiprocessing.Process:
    """``lmobj ARGS`` in a forked child (imports already paid by this process), after
    ``hook()`` ran in the child: a killable run that costs no interpreter start."""
    p = multiprocessing.get_context("fork").Process(target=_child, args=(args, str(log), hook))
    p.start()
    return p


def metrics(run_dir: Path) -> list[dict]:
    """Train records of ``metrics.jsonl`` without the wall-clock fields."""
    out = []
    f = Path(run_dir) / "metrics.jsonl"
    for line in f.read_text().splitlines() if f.is_file() else []:
        rec = json.loads(line)
        if rec.get("eval"):
            continue
        out.append({k: v for k, v in rec.items() if k not in TIMING_KEYS})
    return out


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def kill_self() -> None:
    os.kill(os.getpid(), 9)
