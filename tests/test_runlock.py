"""One writer per run directory (``runlock.py``): a second ``lmobj train`` on a directory a
live process writes is refused naming that process's PID and host; a lock left by a dead
process (PID gone on this host, lease expired on another) is taken over with a warning;
the holder renews its lease; ``eval``, ``export`` and ``verify`` do not need the lock."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runs_util as ru
from lmobjectives.errors import UserError
from lmobjectives.runlock import LOCK_NAME, RunLock


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return ru.make_store(tmp_path_factory.mktemp("lockstore"), n_docs=12, words=40)


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lockrun") / "run"
    code, _, err = ru.run_cli(ru.tiny_args(store, out, 2, every=2))
    assert code == 0, err
    assert not (out / LOCK_NAME).exists(), "a finished run releases its lock"
    return out


@pytest.fixture
def sleeper():
    """A live process on this host (another PID than ours)."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p.pid
    p.kill()
    p.wait()


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(run_dir: Path, pid: int, host: str, renewed: float, lease_s: float = 120.0) -> None:
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "started": renewed,
                                                 "renewed": renewed, "lease_s": lease_s}))


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def copy_run(finished: Path, tmp: Path) -> Path:
    import shutil

    dst = tmp / "run"
    shutil.copytree(finished, dst)
    return dst


def test_a_live_holder_on_this_host_refuses_resume_and_overwrite(store, finished, sleeper, tmp_path):
    run = copy_run(finished, tmp_path)
    write_lock(run, sleeper, socket.gethostname(), time.time())
    before = sorted(p.name for p in run.rglob("*"))
    for args in (["train", "--resume", str(run), "--steps", "4"],
                 ru.tiny_args(store, run, 2, "--overwrite", every=2)):
        code, _, err = ru.run_cli(args)
        assert code == 2 and "Traceback" not in err, err
        [line] = error_lines(err)
        assert f"process {sleeper} on host {socket.gethostname()}" in line, line
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing deleted by --overwrite


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    pid = dead_pid()
    write_lock(run, pid, socket.gethostname(), time.time())
    code, _, err = ru.run_cli(["train", "--resume", str(run), "--steps", "3"])
    assert code == 0, err
    assert f"taking over the lock of {run} left by process {pid}" in err
    assert not (run / LOCK_NAME).exists()


@pytest.mark.parametrize("age, refused", [(1.0, True), (1000.0, False)], ids=["live lease", "expired lease"])
def test_another_hosts_lock_holds_until_its_lease_expires(finished, tmp_path, age, refused):
    run = copy_run(finished, tmp_path)
    write_lock(run, 4242, "node-elsewhere", time.time() - age, lease_s=120.0)
    code, _, err = ru.run_cli(["train", "--resume", str(run), "--steps", "3"])
    if refused:
        assert code == 2 and error_lines(err) == [
            f"error: {run} is in use by process 4242 on host node-elsewhere (lock {run / LOCK_NAME}); "
            "wait for it to end, or stop it"], err
    else:
        assert code == 0 and "left by process 4242 on host node-elsewhere" in err, err


def test_the_holder_renews_its_lease_and_releases_it(tmp_path):
    lock = RunLock(tmp_path, lease_s=0.2)
    with lock:
        first = json.loads((tmp_path / LOCK_NAME).read_text())
        time.sleep(0.35)  # > one renewal period (lease / 4)
        later = json.loads((tmp_path / LOCK_NAME).read_text())
        assert later["renewed"] > first["renewed"] and later["pid"] == first["pid"]
        with pytest.raises(UserError, match="is in use by process"):
            RunLock(tmp_path).acquire()  # this very process holds it: still a second writer
    assert not (tmp_path / LOCK_NAME).exists()


def test_readers_do_not_need_the_lock(store, finished, sleeper, tmp_path):
    run = copy_run(finished, tmp_path)
    write_lock(run, sleeper, socket.gethostname(), time.time())
    for args in (["verify", str(run)], ["eval", str(run), "--data", str(store), "--batches", "1", "--infill-samples", "0", "--json"],
                 ["export", str(run / "checkpoints" / "step-0000002"), "--out", str(tmp_path / "hf")]):
        code, _, err = ru.run_cli(args)
        assert code == 0, (args, err)
    assert (run / LOCK_NAME).is_file()


def pause_in_training(marker: Path):
    def install() -> None:
        import lmobjectives.train.loop as loop

        real = loop.Trainer.train_step

        def train_step(self):  # noqa: ANN001,ANN202
            marker.touch()
            time.sleep(120)
            return real(self)

        loop.Trainer.train_step = train_step
    return install


def test_a_second_train_while_one_trains_is_refused(store, finished, tmp_path):
    run, marker = copy_run(finished, tmp_path), tmp_path / "training"
    p = ru.start_child(["train", "--resume", str(run), "--steps", "4"], tmp_path / "first.log",
                       pause_in_training(marker))
    try:
        end = time.monotonic() + 120
        while not marker.exists() and p.is_alive() and time.monotonic() < end:
            time.sleep(0.05)
        assert marker.exists(), (tmp_path / "first.log").read_text()[-2000:]
        code, _, err = ru.run_cli(["train", "--resume", str(run), "--steps", "4"])
        assert code == 2 and f"in use by process {p.pid} on host {socket.gethostname()}" in err, err
    finally:
        p.kill()
        p.join()
