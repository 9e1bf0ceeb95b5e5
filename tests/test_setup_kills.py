"""Kill trials over a whole run that prepares its own data: tokenizer training, store
writing, model building and training steps.

A run on a corpus goes through "events" (one per document the tokenizer trainer reads, one
per document the store writer takes, one for building the model, one per train step); the
reference run (same code, nothing killed) records them all. Each trial draws one event at
random (stratified: one draw in each tenth of the reference's events, so the kills spread
over setup and training) and the child SIGKILLs itself there, after writing down where it
was. The test asserts that the kill landed (death by SIGKILL, the on-disk state that phase
must leave), then resumes and compares every metrics record and the final weights with the
reference, and checks that the resume redid only what was missing (no tokenizer training
once ``tokenizer/`` exists, no store writing once ``data/`` is complete).

SIGTERM during setup: exit 0, one line saying how to continue, no temporary leftovers,
and the resume matches the reference too.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest

import runs_util as ru
from lmobjectives.checkpoint import list_checkpoints
from lmobjectives.checkpoint.files import LEFTOVER

STEPS, EVERY, N_DOCS = 6, 3, 12
N_KILLS = 10
CHILD_TIMEOUT = 180


def corpus_args(corpus: Path, out: Path) -> list[str]:
    return ["train", "--objective", "clm", "--preset", "tiny", "--corpus", str(corpus), "--seq-len", "32",
            "--batch-size", "2", "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
            "--out", str(out), "--json", "--set", "model.precision=fp32"]


def events_hook(log: Path, stop_at: int | None = None, sig: int = signal.SIGKILL):
    """Installed in a child: append each event's phase to ``log``; at event ``stop_at`` send
    ``sig`` to itself (its phase is the log's last line)."""
    def install() -> None:
        import lmobjectives.spec as spec
        import lmobjectives.store.prepare as prep
        import lmobjectives.train.loop as loop
        import lmobjectives.train.setup as setup

        count = [0]

        def event(phase: str) -> None:
            with open(log, "a") as fh:
                fh.write(phase + "\n")
            if count[0] == stop_at:
                os.kill(os.getpid(), sig)
            count[0] += 1

        def counted(items, phase):  # noqa: ANN001,ANN202
            for item in items:
                event(phase)
                yield item

        real_tok, real_store = spec.train_tokenizer, prep.write_store
        real_model, real_step = setup.build_run_model, loop.Trainer.train_step
        spec.train_tokenizer = lambda texts, *a, **kw: real_tok(counted(texts, "tokenizer"), *a, **kw)
        prep.write_store = lambda out, pairs, **kw: real_store(out, counted(pairs, "store"), **kw)

        def build_run_model(*a, **kw):  # noqa: ANN002,ANN003,ANN202
            event("model")
            return real_model(*a, **kw)

        def train_step(self):  # noqa: ANN001,ANN202
            event(f"step {self.step + 1}")
            return real_step(self)

        setup.build_run_model = build_run_model
        loop.Trainer.train_step = train_step
    return install


def records(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    keep = lambda r: {k: v for k, v in r.items() if k not in ru.TIMING_KEYS}  # noqa: E731
    return [keep(json.loads(line)) for line in f.read_text().splitlines()] if f.is_file() else []


@pytest.fixture(scope="module")
def reference(one_thread, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("setupkills")
    corpus = ru.write_corpus(root / "corpus", n_docs=N_DOCS, words=40)
    log = root / "events"
    p = ru.start_child(corpus_args(corpus, root / "ref"), root / "ref.log", events_hook(log))
    p.join(CHILD_TIMEOUT)
    assert p.exitcode == 0, (root / "ref.log").read_text()[-3000:]
    events = log.read_text().splitlines()
    assert {"tokenizer", "store", "model", f"step {STEPS}"} <= set(events), events
    return corpus, root / "ref", events


def assert_landed(out: Path, phase: str) -> None:
    """What a kill in ``phase`` must leave on disk (and nothing that looks complete beyond)."""
    assert (out / "config.yaml").is_file(), "config.yaml is written before any setup work"
    tokenizer, store = out / "tokenizer" / "tokenizer.json", out / "data" / "manifest.json"
    ckpts = [int(c.name.split("-")[1]) for c in list_checkpoints(out)]
    if phase == "tokenizer":
        assert not tokenizer.exists() and not store.exists()
    elif phase == "store":
        assert tokenizer.is_file() and not store.exists()
    elif phase == "model":
        assert store.is_file() and not ckpts and not (out / "metrics.jsonl").exists()
    else:  # "step N": steps before N are done, with their checkpoints
        done = int(phase.split()[1]) - 1
        assert store.is_file() and ckpts == list(range(EVERY, done + 1, EVERY)), (phase, ckpts)
    assert not (out / "final").exists()


def resume_and_compare(out: Path, reference: Path, tmp: Path, phase: str) -> str:
    log, events = tmp / "resume.log", tmp / "resume-events"
    p = ru.start_child(["train", "--resume", str(out), "--json"], log, events_hook(events))
    p.join(CHILD_TIMEOUT)
    assert p.exitcode == 0, log.read_text()[-3000:]
    assert records(out) == records(reference), phase
    assert ru.same_weights(ru.final_weights(out), ru.final_weights(reference)), phase
    redone = set(events.read_text().splitlines())
    if phase != "tokenizer":  # the tokenizer was complete: not trained again
        assert "tokenizer" not in redone, phase
    if phase not in ("tokenizer", "store"):  # the store was complete: not written again
        assert "store" not in redone, phase
    return log.read_text()


def stratified_draws(n_events: int, n: int, seed: int) -> list[int]:
    """One uniformly drawn event index in each of ``n`` equal slices of ``[0, n_events)``."""
    rng = random.Random(seed)
    edges = [round(i * n_events / n) for i in range(n + 1)]
    return [rng.randrange(lo, hi) for lo, hi in zip(edges, edges[1:])]


def test_sigkill_anywhere_in_setup_or_training_then_resume(reference, tmp_path):
    corpus, ref, events = reference
    draws = stratified_draws(len(events), N_KILLS, seed=19)
    landed = []
    for i, at in enumerate(draws):
        tmp = tmp_path / f"trial{i}"
        tmp.mkdir()
        out, log = tmp / "run", tmp / "events"
        p = ru.start_child(corpus_args(corpus, out), tmp / "killed.log", events_hook(log, stop_at=at))
        p.join(CHILD_TIMEOUT)
        assert p.exitcode == -signal.SIGKILL, (at, (tmp / "killed.log").read_text()[-2000:])
        phase = log.read_text().splitlines()[-1]
        assert phase == events[at], (at, phase)  # the kill landed where it was drawn
        assert_landed(out, phase)
        said = resume_and_compare(out, ref, tmp, phase)
        assert "taking over the lock" in said  # the dead run's writer lock
        landed.append(phase)
    print("kills landed at:", landed)
    phases = {p.split()[0] for p in landed}
    assert {"tokenizer", "store", "step"} <= phases, landed


@pytest.mark.parametrize("phase", ["tokenizer", "store"])
def test_sigterm_during_setup_exits_0_and_resumes(reference, phase, tmp_path):
    corpus, ref, events = reference
    at = events.index(phase) + events.count(phase) // 2  # half-way through that phase
    out, log = tmp_path / "run", tmp_path / "events"
    p = ru.start_child(corpus_args(corpus, out), tmp_path / "t.log",
                       events_hook(log, stop_at=at, sig=signal.SIGTERM))
    p.join(CHILD_TIMEOUT)
    said = (tmp_path / "t.log").read_text()
    assert p.exitcode == 0, said[-3000:]
    assert f"Continue with: lmobj train --resume {out}" in said and "Traceback" not in said
    assert log.read_text().splitlines()[-1] == phase
    left = [q for d in (out, out / "data") if d.is_dir() for q in d.iterdir() if LEFTOVER.match(q.name)]
    assert not left, left  # nothing half-written: the temporary writes were removed
    assert not (out / "writer.lock").exists()
    assert_landed(out, phase)
    resume_and_compare(out, ref, tmp_path, phase)
