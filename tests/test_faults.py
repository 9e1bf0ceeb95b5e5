"""Crash safety: ``lmobj train`` processes killed with SIGKILL at chosen and at random
moments (mid-step, between the micro-batches of one gradient accumulation, at an epoch
boundary, inside every phase of a checkpoint write, during the final export, half-way
through a metrics line) or stopped with SIGTERM, then continued with ``--resume``: every
resumed run must find a complete checkpoint and reproduce the uninterrupted run's per-step
records and final weights bit for bit.

The runs are forked from this process (imports already paid), so a trial costs two short
runs; the kills are real SIGKILLs of those processes. One real ``python -m lmobjectives.cli``
subprocess checks the SIGTERM contract end to end (exit 0 within 20 s, second signal
harmless). Disk full: ``test_disk_full.py``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import runs_util as ru
from lmobjectives.checkpoint import list_checkpoints, verify_checkpoint, verify_run

STEPS, EVERY, ACCUM = 12, 3, 2  # 12 steps of 2 micro-batches of 2 rows of 32 tokens
N_RANDOM_KILLS = 8
N_SIGTERMS = 3
CHILD_TIMEOUT = 180  # only reached if something hangs


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    # ~17 rows of 32 tokens per epoch: the 48 rows of a run cross two epoch boundaries.
    return ru.make_store(tmp_path_factory.mktemp("faults"), n_docs=12, words=40)


@pytest.fixture(scope="module")
def reference(store, one_thread, tmp_path_factory) -> tuple[Path, float]:
    """The uninterrupted run (in this process, which also loads every lazy import before the
    children are forked), and how long a forked copy of it lives after logging its first step
    (the window the random signals are spread over). The copy must match it bit for bit."""
    root = tmp_path_factory.mktemp("ref")
    out = root / "run"
    code, _, err = ru.run_cli(ru.tiny_args(store, out, STEPS, every=EVERY, accum=ACCUM))
    assert code == 0, err
    assert [r["step"] for r in ru.metrics(out)] == list(range(1, STEPS + 1))
    p = ru.start_child(ru.tiny_args(store, root / "copy", STEPS, every=EVERY, accum=ACCUM), root / "log")
    _wait_for_first_step(root / "copy", p)
    t0 = time.monotonic()
    p.join(CHILD_TIMEOUT)
    alive = time.monotonic() - t0
    assert p.exitcode == 0, (root / "log").read_text()
    assert ru.metrics(root / "copy") == ru.metrics(out)
    assert ru.same_weights(ru.final_weights(root / "copy"), ru.final_weights(out))
    return out, alive


# ------------------------------------------------------------------ kill hooks (run in the child)
def _count_calls(owner, name: str, when: Callable[[int], bool], after: bool = False) -> None:  # noqa: ANN001
    """Wrap ``owner.name`` so that the child SIGKILLs itself on the call where ``when(n)``
    holds (n = 1-based call count), before the call (or right after it with ``after``)."""
    real = getattr(owner, name)
    count = [0]

    def wrapped(*a, **kw):
        count[0] += 1
        if when(count[0]) and not after:
            ru.kill_self()
        out = real(*a, **kw)
        if when(count[0]) and after:
            ru.kill_self()
        return out

    setattr(owner, name, wrapped)


def hook_forward(n: int):
    def install() -> None:
        from lmobjectives.step import StandardModule

        real = StandardModule.forward_backward
        count = [0]

        def fb(self, batch, totals, backward=True):  # noqa: ANN001
            if backward:
                count[0] += 1
                if count[0] == n:
                    ru.kill_self()
            return real(self, batch, totals, backward)

        StandardModule.forward_backward = fb
    return install


def hook_epoch_boundary() -> None:
    from lmobjectives.data.loader import Loader

    real = Loader.batch  # how the train loop reads global micro-batch g

    def batch(self, g):  # noqa: ANN001,ANN202
        first_row = g * self.batch_size
        rpe = self.sources[0].rows_per_epoch
        if first_row // rpe != (first_row + self.batch_size - 1) // rpe or (first_row and first_row % rpe == 0):
            ru.kill_self()  # this micro-batch starts or straddles a new epoch
        return real(self, g)

    Loader.batch = batch


def hook_torch_save(n: int):
    def install() -> None:
        import lmobjectives.checkpoint.full as ck

        _count_calls(ck.torch, "save", lambda c: c == n, after=True)
    return install


def hook_half_written_model(n: int):
    """The n-th model.safetensors is cut in half on disk, then the process dies."""
    def install() -> None:
        import lmobjectives.checkpoint.full as ck

        real, count = ck.save_model, [0]

        def save_model(model, path):  # noqa: ANN001
            real(model, path)
            count[0] += 1
            if count[0] == n:
                size = os.path.getsize(path)
                os.truncate(path, size // 2)
                ru.kill_self()

        ck.save_model = save_model
    return install


def hook_publish(n: int, after: bool):
    def install() -> None:
        import lmobjectives.checkpoint.full as ck

        _count_calls(ck, "publish_dir", lambda c: c == n, after=after)
    return install


def hook_prune(n: int):
    """Killed half-way through deleting the n-th pruned checkpoint: one of its files is gone."""
    def install() -> None:
        import shutil

        real, count = shutil.rmtree, [0]

        def rmtree(path, *a, **kw):  # noqa: ANN001,ANN002,ANN003
            # a pruned checkpoint, under its own name or renamed first (not a failed write)
            if "step-" in Path(path).name and ".tmp-" not in Path(path).name:
                count[0] += 1
                if count[0] == n:
                    (Path(path) / "model.safetensors").unlink()
                    ru.kill_self()
            return real(path, *a, **kw)

        shutil.rmtree = rmtree  # (in the child only)
    return install


def hook_export() -> None:
    import lmobjectives.export as ex

    _count_calls(ex, "publish_dir", lambda c: True)  # the final/ export, before its rename


def hook_half_metrics_line(step: int):
    def install() -> None:
        from lmobjectives.train.loop import Trainer
        import json

        real = Trainer.log

        def log(self, record):  # noqa: ANN001
            if record.get("step") == step and not record.get("eval"):
                line = json.dumps(record) + "\n"
                with open(self.metrics_path, "a") as fh:
                    fh.write(line[: len(line) // 2])
                ru.kill_self()
            return real(self, record)

        Trainer.log = log
    return install


# (name, hook) — with ACCUM = 2, forward_backward call 2s-1 starts step s, call 2s is its
# second micro-batch; checkpoints at steps 3, 6, 9, 12 save optimizer/scheduler/rng in turn.
TARGETED = [
    ("mid-step: before step 3's first micro-batch", hook_forward(5)),
    ("mid-accumulation: between step 4's micro-batches", hook_forward(8)),
    ("mid-accumulation: step 7, after a checkpoint", hook_forward(14)),
    ("first step (no checkpoint yet)", hook_forward(2)),
    ("epoch boundary", hook_epoch_boundary),
    ("checkpoint write: after optimizer.pt of step 6", hook_torch_save(4)),
    ("checkpoint write: after rng.pt of step 9", hook_torch_save(9)),
    ("checkpoint write: model.safetensors of step 6 half written", hook_half_written_model(2)),
    ("checkpoint write: complete, before the rename of step 6", hook_publish(2, after=False)),
    ("checkpoint write: renamed, before pruning old ones (step 9)", hook_publish(3, after=True)),
    ("pruning step 3's checkpoint, half deleted (step 9)", hook_prune(1)),
    ("final export, before its rename", hook_export),
    ("half a metrics line at step 8", hook_half_metrics_line(8)),
]


def _resume_and_compare(out: Path, reference: Path, log: Path) -> tuple[bool, str]:
    p = ru.start_child(["train", "--resume", str(out), "--json"], log)
    p.join(CHILD_TIMEOUT)
    if p.exitcode != 0:
        return False, f"resume exit {p.exitcode}: {log.read_text()[-2000:]}"
    report = verify_run(out)
    if not all(r.get("ok") for r in report if "checkpoint" in r) or any("leftover" in r for r in report):
        return False, f"verify: {report}"
    hidden = [p.name for p in out.rglob(".*")]
    if hidden:
        return False, f"leftovers after resume: {hidden}"
    got, want = ru.metrics(out), ru.metrics(reference)
    if got != want:
        diff = next((a, b) for a, b in zip(got + [None] * len(want), want + [None] * len(got)) if a != b)
        return False, f"records differ: {diff}"
    if not ru.same_weights(ru.final_weights(out), ru.final_weights(reference)):
        return False, "final weights differ"
    return True, ""


def _wait_for_first_step(out: Path, p, timeout: float = 120.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.is_alive():
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size:
            return
        time.sleep(0.01)


def test_kill_anywhere_then_resume_is_bit_exact(store, reference, tmp_path):
    args = lambda out: ru.tiny_args(store, out, STEPS, every=EVERY, accum=ACCUM)  # noqa: E731
    reference, alive = reference  # random signals land uniformly in the reference's lifetime
    results = []
    rng = random.Random(20240601)
    trials = [(name, hook, None, None) for name, hook in TARGETED]
    trials += [(f"random SIGKILL #{i + 1}", None, "kill", rng.random()) for i in range(N_RANDOM_KILLS)]
    # SIGTERMs early enough to land in training, not in the final export
    trials += [(f"SIGTERM twice #{i + 1}", None, "term", 0.5 * rng.random()) for i in range(N_SIGTERMS)]
    for i, (name, hook, signal_kind, frac) in enumerate(trials):
        out = tmp_path / f"t{i}"
        log = tmp_path / f"t{i}.log"
        if signal_kind is None:
            p = ru.start_child(args(out), log, hook)
            p.join(CHILD_TIMEOUT)
            assert p.exitcode == -signal.SIGKILL, f"{name}: the hook did not fire (exit {p.exitcode})"
        else:
            p = _signalled_run(lambda: args(out), out, log, signal_kind, frac * alive)
            _assert_interrupted(p, out, log, signal_kind, name)
        ckpts = [c.name for c in list_checkpoints(out)]
        # Whatever the moment of death, every step-N/ left visible is complete (a later prune
        # could otherwise delete a damaged one before the checks after the resume see it).
        steps_dirs = [p for p in (out / "checkpoints").glob("step-*")] if (out / "checkpoints").is_dir() else []
        damaged = [r for r in verify_run(out) if "checkpoint" in r and not r.get("ok")] if steps_dirs else []
        ok, why = _resume_and_compare(out, reference, tmp_path / f"t{i}.resume.log")
        if damaged:
            ok, why = False, f"damaged checkpoint left by the interruption: {damaged}"
        results.append((name, p.exitcode, ckpts[-1] if ckpts else "-", ok, why))
    print("\nkill trials (name | exit | newest complete checkpoint | exact):")
    for name, code, ck, ok, why in results:
        print(f"  {name:62} | {code:>4} | {ck:13} | {'yes' if ok else 'NO ' + why}")
    exact = sum(r[3] for r in results)
    print(f"{len(results)} interrupted runs, {exact} resumed bit-exactly")
    assert exact == len(results), [r for r in results if not r[3]]


def _signalled_run(args: Callable[[], list[str]], out: Path, log: Path, kind: str, delay: float,
                   attempts: int = 4):  # noqa: ANN202
    """A child that receives SIGKILL (``kind="kill"``) or two SIGTERMs ``delay`` seconds after
    its first logged step. A child that finished before the signal proves nothing: the trial
    is rerun from scratch with half the delay, up to ``attempts`` times."""
    import shutil

    for _ in range(attempts):
        shutil.rmtree(out, ignore_errors=True)
        p = ru.start_child(args(), log)
        _wait_for_first_step(out, p)
        time.sleep(delay)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL if kind == "kill" else signal.SIGTERM)
            if kind == "term":
                time.sleep(0.05)
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)  # a second SIGTERM must change nothing
        p.join(CHILD_TIMEOUT)
        if kind == "kill" and p.exitcode != 0:
            return p
        if kind == "term" and _stopped_at(log.read_text()) not in (None, STEPS):
            return p  # (a stop in the last step cannot show a checkpoint before the last)
        delay /= 2
    return p


def _stopped_at(text: str) -> int | None:
    if "stopped by signal at step" not in text:
        return None
    return int(text.split("stopped by signal at step")[1].split()[0].strip(".,;:"))


def _assert_interrupted(p, out: Path, log: Path, kind: str, name: str) -> None:  # noqa: ANN001
    """The signal, not a normal finish, ended the run: death by SIGKILL, or for SIGTERM exit 0
    with the line saying so and a checkpoint at the stop step, before the last step."""
    if kind == "kill":
        assert p.exitcode == -signal.SIGKILL, f"{name}: not killed (exit {p.exitcode}): {log.read_text()[-1500:]}"
        return
    text = log.read_text()
    assert p.exitcode == 0, f"{name}: SIGTERM must end the run with exit 0, got {p.exitcode}"
    assert "stopped by signal at step" in text, f"{name}: the run was not stopped by the signal"
    stopped = _stopped_at(text)
    ckpts = [int(c.name.split("-")[1]) for c in list_checkpoints(out)]
    assert ckpts and ckpts[-1] == stopped < STEPS, f"{name}: stopped at {stopped}, checkpoints {ckpts}"
    assert not (out / "final").exists(), f"{name}: a stopped run must not export"


def test_sigterm_saves_and_exits_zero_within_20s(store, tmp_path):
    """A real ``python -m lmobjectives.cli train`` process: SIGTERM, then a second one."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH")]))}
    args = ru.tiny_args(store, out, 5000, every=1000)
    proc = subprocess.Popen([sys.executable, "-m", "lmobjectives.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(out / "metrics.jsonl", 3, proc)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the second SIGTERM"
        proc.send_signal(signal.SIGTERM)  # must change nothing: still one save, exit 0
        stdout, stderr = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert took < 20
    assert "Traceback" not in stderr and "stopped by signal at step" in stderr
    ckpts = list_checkpoints(out)
    last_logged = ru.metrics(out)[-1]["step"]
    assert [int(c.name.split("-")[1]) for c in ckpts][-1] == last_logged  # saved at the current step
    verify_checkpoint(ckpts[-1])
    assert '"stopped": true' in stdout


def _wait_for_lines(f: Path, n: int, proc, timeout: float = 60.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if f.is_file() and f.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not start in time")
