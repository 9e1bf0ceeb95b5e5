"""Interruptions the kill trials of ``test_faults.py`` do not reach, and refusals that must
change nothing:

* SIGKILL during the in-run preparation (tokenizer training, store writing), during an
  evaluation, and of a whole 2-process run; SIGTERM before the first step (exit 0, nothing
  half-written). Each is then continued with ``--resume`` and must give the
  uninterrupted run's records and final weights bit for bit.
* A refused resume leaves the run directory byte for byte as it was.
* An ``--out`` that cannot be written (forbidden, read-only, under a regular file) ends with
  one ``error:`` line and exit 2.

Children are forked from this process (``runs_util.start_child``) so each costs no start-up.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runs_util as ru
from lmobjectives.checkpoint import list_checkpoints

STEPS, EVERY = 6, 3
CHILD_TIMEOUT = 180
SRC = Path(__file__).parents[1] / "src"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return ru.write_corpus(tmp_path_factory.mktemp("icorpus") / "c", n_docs=12, words=40)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return ru.make_store(tmp_path_factory.mktemp("istore"), n_docs=12, words=40)


def corpus_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    """A run that trains its own tokenizer and prepares its store inside the run directory."""
    return ["train", "--objective", "clm", "--preset", "tiny", "--corpus", str(corpus), "--seq-len", "32",
            "--batch-size", "2", "--steps", str(STEPS), "--checkpoint-every", str(EVERY),
            "--out", str(out), "--json", "--set", "model.precision=fp32", *extra]


def records(run_dir: Path) -> list[dict]:
    """Every record of metrics.jsonl (train and eval) without the wall-clock fields."""
    import json

    f = run_dir / "metrics.jsonl"
    keep = lambda r: {k: v for k, v in r.items() if k not in ru.TIMING_KEYS}  # noqa: E731
    return [keep(json.loads(line)) for line in f.read_text().splitlines()] if f.is_file() else []


def kill_then_resume(args: list[str], out: Path, hook, reference: Path, tmp: Path) -> None:  # noqa: ANN001
    """Run ``args`` with ``hook`` installed (it SIGKILLs the child), check the child died by
    SIGKILL, resume it, and compare with ``reference``."""
    p = ru.start_child(args, tmp / "killed.log", hook)
    p.join(CHILD_TIMEOUT)
    assert p.exitcode == -signal.SIGKILL, f"not killed (exit {p.exitcode}): {(tmp / 'killed.log').read_text()[-2000:]}"
    assert not (out / "final").exists()
    resume_and_compare(out, reference, tmp / "resume.log")


def resume_and_compare(out: Path, reference: Path, log: Path) -> None:
    p = ru.start_child(["train", "--resume", str(out), "--json"], log)
    p.join(CHILD_TIMEOUT)
    assert p.exitcode == 0, log.read_text()[-3000:]
    assert records(out) == records(reference)
    assert ru.same_weights(ru.final_weights(out), ru.final_weights(reference))
    assert (out / "run.json").is_file() and (out / "config.yaml").is_file()


# ------------------------------------------------------------------ kill hooks (run in the child)
def kill_in_tokenizer_training() -> None:
    """Dies once the tokenizer is trained, before it is saved."""
    import lmobjectives.spec as spec

    real = spec.train_tokenizer

    def train_tokenizer(*a, **kw):  # noqa: ANN002,ANN003,ANN202
        real(*a, **kw)
        ru.kill_self()

    spec.train_tokenizer = train_tokenizer


def kill_in_store_writing() -> None:
    """Dies half-way through writing the store: some documents are on disk, in a temporary
    directory."""
    import lmobjectives.store.prepare as prep

    real = prep.write_store

    def write_store(out, pairs, **kw):  # noqa: ANN001,ANN003,ANN202
        def cut():  # noqa: ANN202
            for i, pair in enumerate(pairs):
                if i == 6:
                    ru.kill_self()
                yield pair
        return real(out, cut(), **kw)

    prep.write_store = write_store


def kill_in_second_eval() -> None:
    """Dies inside the evaluation at step 4, after the step-3 checkpoint."""
    import lmobjectives.train.job as api

    real, count = api.evaluate_run, [0]

    def evaluate_run(run):  # noqa: ANN001,ANN202
        count[0] += 1
        if count[0] == 2:
            ru.kill_self()
        return real(run)

    api.evaluate_run = evaluate_run


@pytest.fixture(scope="module")
def corpus_reference(corpus, one_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("iref") / "run"
    code, _, err = ru.run_cli(corpus_args(corpus, out))
    assert code == 0, err
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "data" / "manifest.json").is_file()
    return out


@pytest.mark.parametrize("hook", [kill_in_tokenizer_training, kill_in_store_writing],
                         ids=["tokenizer training", "store writing"])
def test_kill_during_in_run_preparation_then_resume(corpus, corpus_reference, hook, tmp_path):
    out = tmp_path / "run"
    kill_then_resume(corpus_args(corpus, out), out, hook, corpus_reference, tmp_path)


def test_kill_during_evaluation_then_resume(store, one_thread, tmp_path):
    extra = ("--set", "train.eval_every=2", "--set", "train.eval_batches=2")
    reference = tmp_path / "ref"
    code, _, err = ru.run_cli(ru.tiny_args(store, reference, STEPS, *extra, every=EVERY))
    assert code == 0, err
    assert sum(1 for r in records(reference) if r.get("eval")) >= 2
    out = tmp_path / "run"
    kill_then_resume(ru.tiny_args(store, out, STEPS, *extra, every=EVERY), out, kill_in_second_eval,
                     reference, tmp_path)
    assert [c.name for c in list_checkpoints(out)][-1] == f"step-{STEPS:07d}"


def pause_before_first_step(marker: str):
    """The run pauses inside setup (the trainer's preflight, before step 1) after touching
    ``marker``, so that the parent's SIGTERM lands there."""
    def install() -> None:
        import lmobjectives.train.loop as loop

        real = loop.preflight

        def preflight(run):  # noqa: ANN001,ANN202
            Path(marker).touch()
            time.sleep(60)
            return real(run)

        loop.preflight = preflight
    return install


def test_sigterm_before_the_first_step_then_resume(store, one_thread, tmp_path):
    """Documented: a SIGTERM during setup unwinds at once, exit 0 with the line saying how to
    continue. What it leaves must resume to the uninterrupted run."""
    reference = tmp_path / "ref"
    assert ru.run_cli(ru.tiny_args(store, reference, STEPS, every=EVERY))[0] == 0
    out, marker = tmp_path / "run", tmp_path / "in-setup"
    p = ru.start_child(ru.tiny_args(store, out, STEPS, every=EVERY), tmp_path / "t.log",
                       pause_before_first_step(str(marker)))
    end = time.monotonic() + 120
    while not marker.exists() and p.is_alive() and time.monotonic() < end:
        time.sleep(0.02)
    assert marker.exists(), (tmp_path / "t.log").read_text()[-2000:]
    os.kill(p.pid, signal.SIGTERM)
    p.join(CHILD_TIMEOUT)
    assert p.exitcode == 0, (tmp_path / "t.log").read_text()[-2000:]
    assert "stopped by signal during setup" in (tmp_path / "t.log").read_text()
    assert not list_checkpoints(out) and not (out / "metrics.jsonl").exists()
    resume_and_compare(out, reference, tmp_path / "resume.log")


# ------------------------------------------------------------------ refusals change nothing
def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_a_refused_resume_leaves_the_run_directory_byte_identical(store, one_thread, tmp_path):
    out = tmp_path / "run"
    assert ru.run_cli(ru.tiny_args(store, out, 3, every=3))[0] == 0
    before = snapshot(out)
    cases = [
        (["train", "--resume", str(out), "--lr", "0.5"], "only --steps may change"),
        (["train", "--resume", str(out), "--set", "train.stesp=9"], "only --steps may change"),
    ]
    for args, words in cases:
        code, _, err = ru.run_cli(args)
        assert code == 2 and words in err and "Traceback" not in err, err
        assert snapshot(out) == before, f"{args} changed the run directory"
    # The recipe edited since the checkpoint was written: refused without --force.
    cfg = out / "config.yaml"
    cfg.write_text(cfg.read_text().replace("lr: 0.003", "lr: 0.004").replace("lr: 3.0e-3", "lr: 4.0e-3"))
    before = snapshot(out)
    code, _, err = ru.run_cli(["train", "--resume", str(out), "--steps", "6"])
    assert code == 2 and "changed" in err and "--force" in err and "Traceback" not in err, err
    assert snapshot(out) == before
    cfg.write_text(cfg.read_text().replace("lr: 0.004", "lr: 0.003").replace("lr: 4.0e-3", "lr: 3.0e-3"))
    # A damaged newest checkpoint: refused, and the damage itself left as found.
    opt = out / "checkpoints" / "step-0000003" / "optimizer.pt"
    data = bytearray(opt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    opt.write_bytes(bytes(data))
    before = snapshot(out)
    code, _, err = ru.run_cli(["train", "--resume", str(out), "--steps", "6"])
    assert code == 2 and "optimizer.pt" in err and "Traceback" not in err, err
    assert snapshot(out) == before


# ------------------------------------------------------------------ unwritable --out
def unwritable_outs(tmp: Path) -> list[tuple[str, Path]]:
    """Paths a run cannot create, as this process sees them: under a regular file always; a
    read-only directory only when permissions bind (not as root); /sys, which refuses new
    entries even to root, when it is there."""
    (tmp / "a-file").write_text("x")
    outs = [("under a regular file", tmp / "a-file" / "run")]
    if os.geteuid() != 0:
        ro = tmp / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        outs.append(("read-only directory", ro / "run"))
    if Path("/sys").is_dir():
        outs.append(("forbidden (/sys)", Path("/sys/lmobj-test-run")))
    return outs


def test_an_unwritable_out_is_one_error_line(store, tmp_path):
    outs = unwritable_outs(tmp_path)
    assert len(outs) >= 2 or os.geteuid() == 0
    for what, out in outs:
        code, _, err = ru.run_cli(ru.tiny_args(store, out, 2, every=2))
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, (what, code, err[-2000:])
        assert str(out.parent) in lines[0] or str(out) in lines[0], (what, lines[0])


# ------------------------------------------------------------------ a 2-process run
def _lmobj(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmobjectives.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, read from /proc (Linux)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        tree += kids
        frontier = kids
    return tree


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process tree from /proc")
def test_kill_a_two_process_run_then_resume(store, tmp_path):
    """``lmobj train --nproc 2`` (torchrun and both workers) SIGKILLed as a whole once its
    step-3 checkpoint exists, then resumed on 2 processes: it finishes from that checkpoint
    with every checkpoint sound and the records before it kept. (That a 2-process resume
    reproduces the uninterrupted run bit for bit is test_distributed.py's.)"""
    from lmobjectives.checkpoint import verify_run

    steps = 9
    out = tmp_path / "run"
    proc = subprocess.Popen(_lmobj(*ru.tiny_args(store, out, steps, "--nproc", "2", every=EVERY)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        end = time.monotonic() + 240
        while not list_checkpoints(out) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        tree = process_tree(proc.pid)
        assert len(tree) >= 3, tree  # the launcher (the CLI running torchrun) and two workers
        for pid in tree:  # the workers run in sessions of their own: a process group is not enough
            os.kill(pid, signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    time.sleep(0.5)
    assert not [pid for pid in tree if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]
    assert not (out / "final").exists()
    kept = [r for r in records(out) if r["step"] <= EVERY]
    p = subprocess.run(_lmobj("train", "--resume", str(out), "--nproc", "2", "--json"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step-0000003" in p.stderr or "resumed from step-0000006" in p.stderr, p.stderr
    got = [r for r in records(out) if not r.get("eval")]
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r for r in records(out) if r["step"] <= EVERY] == kept
    report = verify_run(out)
    assert all(r.get("ok") for r in report if "checkpoint" in r) and not any("leftover" in r for r in report)
    assert (out / "final" / "model.safetensors").is_file()
