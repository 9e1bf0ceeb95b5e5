"""The training job behind ``lmobj train``: open or resume a run, fit, evaluate, export."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lmobjectives.checkpoint import clean_leftovers
from lmobjectives.config import RunConfig
from lmobjectives.errors import UserError
from lmobjectives.evaluate.metrics import left_to_right_bpb, objective_eval, val_batches
from lmobjectives.report.plots import plot_loss
from lmobjectives.train.batches import compute_threads
from lmobjectives.train.budget import parse_duration
from lmobjectives.train.calibrate import start_plan, timed_setup
from lmobjectives.train.distributed import (World, barrier, broadcast_object, eval_share,
                                            export_final, failures_end_every_rank, init_world,
                                            open_in_turn, parallelize)
from lmobjectives.train.loop import Stop, Trainer
from lmobjectives.rundir import config_hash, load_run_config
from lmobjectives.runlock import LOCK_NAME, RunLock
from lmobjectives.runtime import seed_everything
from lmobjectives.train.setup import Run, default_run_dir, open_run, write_config_first, write_run_files
from lmobjectives.train.trackers import Trackers, check_installed, open_trackers
from lmobjectives.util import atomic_write_json


@dataclass
class TrainResult:
    run_dir: Path
    started: str  # "new", "resumed from step N" or "initialised from DIR"
    final: dict[str, Any]  # last train record
    eval: dict[str, Any]
    stopped: bool = False


def evaluate_run(run: Run, n_batches: int | None = None) -> dict[str, Any]:
    """Objective loss/accuracy and (left-to-right models) bits-per-byte on validation rows."""
    src = run.val_source()
    if src is None:
        return {}
    rows = val_batches(src, run.cfg.train.batch_size, n_batches or run.cfg.train.eval_batches)
    share, reduce = eval_share(run)
    out = objective_eval(run, rows, run.model_with_loss, run.device, share=share, reduce=reduce)
    out.update(left_to_right_bpb(run, run.model, rows, run.device, run.bf16, share=share,
                                 reduce=reduce) or {})
    return out


def _existing_run(cfg: RunConfig, world: World, resume: str | Path | None,
                  overwrite: bool) -> tuple[Path | None, RunConfig]:
    """(``cfg.out`` when it holds a run of the same config, else None; the config to run).
    A timed run that sized its model was started by a config without the size: it matches
    by the hash of the config it was given (``run.json``), and continues with its own. Rank 0
    decides for every rank: the others could otherwise see the run files it is writing."""
    if resume is not None or overwrite:
        raise UserError("--resume-if-exists decides between starting and resuming by itself; "
                        "leave out --resume and --overwrite")
    if cfg.out is None:
        raise UserError("--resume-if-exists needs --out: the run directory to start or resume")
    out = Path(cfg.out)
    decision: tuple[str | None, str | None, bool] = (None, None, False)  # (run, error, its config)
    if world.rank == 0 and (out / "config.yaml").is_file():
        info = out / "run.json"
        given = json.loads(info.read_text()).get("given_config_hash") if info.is_file() else None
        if config_hash(load_run_config(out)) == config_hash(cfg):
            decision = (str(out), None, False)
        elif given == config_hash(cfg):
            decision = (str(out), None, True)
        else:
            decision = (None, f"{out} holds a run with another config; give its own config (or "
                              "--resume it), or choose another --out", False)
    found, error, own = broadcast_object(decision)
    if error is not None:
        raise UserError(error)
    return (None, cfg) if found is None else (Path(found), load_run_config(out) if own else cfg)


def _prepare_out(run_dir: Path, overwrite: bool) -> None:
    """Refuse or empty ``--out`` (its writer lock, held by this process, stays)."""
    if (run_dir / "run.json").exists() or (run_dir / "config.yaml").exists():
        if not overwrite:
            raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                            "--overwrite to replace it, or another --out")
        for p in run_dir.iterdir():
            if p.name != LOCK_NAME:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    elif run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not overwrite:
        raise UserError(f"{run_dir} exists and is not empty; choose another --out or pass --overwrite")


@contextlib.contextmanager
def _writer_lock(run_dir: Path, lead: bool, say: Callable[[str], None]) -> Iterator[None]:
    """Rank 0 holds ``RUN/writer.lock`` (``runlock.py``) for the whole job."""
    if not lead:
        yield
        return
    try:
        lock = RunLock(run_dir, warn=say)
        lock.acquire()
    except OSError as exc:  # forbidden, read-only, under a file: the user's to fix
        raise UserError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}") from None
    try:
        yield
    finally:
        lock.release()


class SetupStopped(BaseException):
    """A SIGTERM arrived while the run was being set up. A BaseException, so that no
    ``except Exception`` on the way (a reader's bad-input policy) mistakes it for bad data."""


@contextlib.contextmanager
def _stop_setup_on_sigterm(trainer: list[Trainer]) -> Iterator[None]:
    """During setup a SIGTERM raises ``SetupStopped`` where the process is: every setup
    product (config, tokenizer, store) is written under a temporary name and renamed, so
    unwinding from anywhere leaves complete files or leftovers the next start removes. Once
    ``trainer`` holds the trainer, a SIGTERM only sets its stop flag (``fit`` installs the
    same behaviour; this covers the moments between)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame) -> None:  # noqa: ANN001
        if trainer:
            trainer[0].stop_requested = True
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the unwinding
        raise SetupStopped()

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def train(cfg: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False,
          force: bool = False, allow_reshard: bool = False, progress: bool = True,
          resume_if_exists: bool = False,
          say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
          started_at: float | None = None) -> TrainResult:
    """Train ``cfg`` (or continue the run in ``resume``). Under ``torchrun`` (or
    ``lmobj train --nproc N``) every process calls this: each trains its share of every global
    batch, rank 0 writes the run's files and speaks, and a failure on one rank ends them all
    with its message (``train/distributed.py``). With ``resume_if_exists`` a run already in
    ``cfg.out`` with the same config is continued and an empty ``cfg.out`` starts one — what
    workers restarted by ``torchrun --max-restarts`` need. A timed run (``train.time``) counts
    its budget from ``started_at`` (a ``time.time()``; default: now)."""
    started_at = time.time() if started_at is None else started_at
    world = init_world()
    threads = torch.get_num_threads()  # calibration may choose fewer; restored at the end
    with failures_end_every_rank(world), _restored_threads(threads):
        if resume_if_exists:
            resume, cfg = _existing_run(cfg, world, resume, overwrite)
        result = _train(cfg, world, resume=resume, overwrite=overwrite, force=force,
                        allow_reshard=allow_reshard, progress=progress,
                        say=say if world.rank == 0 else (lambda m: None), started_at=started_at)
    if cfg.train.time is not None and world.rank == 0:
        say(f"time: {time.time() - started_at:.1f} s of the {cfg.train.time} budget "
            f"({result.final.get('step', 0)} steps, {result.final.get('tokens', 0) / 1e6:.2f} M tokens)")
    world.close()
    return result


def _train(cfg: RunConfig, world: World, *, resume: str | Path | None, overwrite: bool, force: bool,
           allow_reshard: bool, progress: bool, say: Callable[[str], None],
           started_at: float) -> TrainResult:
    if world.rank == 0:
        check_installed(cfg.log.backends)  # before any data is prepared
    if resume is not None:
        run_dir = Path(resume)
    else:
        run_dir = broadcast_object(Path(cfg.out) if cfg.out else default_run_dir(cfg))
    if cfg.out is None or Path(cfg.out) != run_dir:
        cfg = cfg.model_copy(update={"out": str(run_dir)})
    with _writer_lock(run_dir, world.rank == 0, say):
        started_trainer: list[Trainer] = []
        try:
            with _stop_setup_on_sigterm(started_trainer):
                trainer, started = _set_up(cfg, world, run_dir, resume=resume, overwrite=overwrite,
                                           force=force, allow_reshard=allow_reshard,
                                           progress=progress, say=say, started_at=started_at)
                started_trainer.append(trainer)  # from here a SIGTERM only sets its stop flag
                trackers = _open_trackers(trainer, run_dir, resumed=resume is not None, say=say)
                try:
                    return _fit(trainer, run_dir, started, trackers, say)
                finally:
                    trackers.close()
        except SetupStopped:
            if (run_dir / "config.yaml").is_file():
                say(f"stopped by signal during setup; nothing half-written. "
                    f"Continue with: lmobj train --resume {run_dir}")
            else:
                say("stopped by signal before the run directory was written")
            return TrainResult(run_dir=run_dir, started="stopped during setup", final={}, eval={},
                               stopped=True)


def _set_up(cfg: RunConfig, world: World, run_dir: Path, *, resume: str | Path | None,
            overwrite: bool, force: bool, allow_reshard: bool, progress: bool,
            say: Callable[[str], None], started_at: float) -> tuple[Trainer, str]:
    """Open (or reopen) the run and its trainer; returns (trainer, how it started)."""
    lead = world.rank == 0
    if resume is None and lead:
        _prepare_out(run_dir, overwrite)
        write_config_first(cfg, run_dir)
    barrier()  # no rank cleans leftovers below while rank 0 still writes config.yaml
    for p in clean_leftovers(run_dir):  # temporary files of a write that was killed
        say(f"removed the leftover {p} of an interrupted write")
    calibration, given_hash = None, config_hash(cfg)
    if cfg.train.time is not None and (resume is None or _setup_unfinished(run_dir, say)):
        cfg, calibration = timed_setup(cfg, run_dir, world, started_at, say, progress and lead)
    seed_everything(cfg.train.seed)
    run = open_in_turn(lambda: open_run(cfg, run_dir, progress=progress and lead, rank=world.rank,
                                        world_size=world.world_size), world)
    if calibration is not None:
        torch.set_num_threads(calibration["threads"])
        run.info["budget"] = {"time": cfg.train.time, "seconds": parse_duration(cfg.train.time),
                              "calibration": calibration}
        run.info["given_config_hash"] = given_hash  # --resume-if-exists finds the run by it
    n_params = sum(p.numel() for p in run.model.parameters())
    parallelize(run, world)
    trainer = Trainer(run, progress=progress)
    trainer.started_at = started_at
    torch.set_num_threads(compute_threads(torch.get_num_threads(), trainer.batches.background, run.device))
    if resume is not None:
        ckpt = trainer.resume(force=force, allow_reshard=allow_reshard)
        if lead and not (run_dir / "run.json").is_file():  # stopped before its setup ended
            write_run_files(run)
        started = f"resumed from {ckpt.name}" if ckpt else "resumed (no checkpoint yet: from step 0)"
        if trainer.reshard_note:
            started += f", {trainer.reshard_note}"
    else:
        if lead:
            write_run_files(run)
        started = f"initialised from {cfg.model.init_from}" if cfg.model.init_from else "new"
    procs = (f", {world.world_size} processes ({cfg.distributed.strategy})" if world.distributed else "")
    length = f"{cfg.train.steps} steps"
    if cfg.train.time is not None:
        start_plan(trainer, run_dir, calibration, started_at)
        length = (f"time {cfg.train.time}: {trainer.plan.total} steps planned "
                  f"({trainer.plan.seconds_left():.0f} s left)")
    say(f"run {run_dir}: {started}; objective {cfg.objective} on {run.architecture} "
        f"({n_params / 1e6:.2f} M parameters), {length}{procs}")
    return trainer, started


def _setup_unfinished(run_dir: Path, say: Callable[[str], None]) -> bool:
    """A resumed timed run stopped before its setup wrote ``run.json`` (e.g. killed while it
    calibrated) has trained nothing: it calibrates again, its budget counted from now. Rank 0
    decides for every rank."""
    unfinished = broadcast_object(not (run_dir / "run.json").is_file())
    if unfinished:
        say("the run stopped before its setup ended: calibrating again, the budget counts from now")
    return unfinished


def _open_trackers(trainer: Trainer, run_dir: Path, *, resumed: bool,
                   say: Callable[[str], None]) -> Trackers:
    """The experiment trackers of ``log.backends`` (rank 0 only), fed every logged record."""
    run = trainer.run
    trackers = Trackers()
    if run.rank == 0 and run.cfg.log.backends:
        trackers = open_trackers(run.cfg.log.backends, run_dir, run.cfg.model_dump(mode="json"),
                                 resume_at=(trainer.step, trainer.tokens) if resumed else None,
                                 wandb_project=run.cfg.log.wandb_project,
                                 warn=lambda m: say(f"warning: {m}"))
    trainer.on_log = trackers.log
    return trackers


def _fit(trainer: Trainer, run_dir: Path, started: str, trackers: Trackers,
         say: Callable[[str], None]) -> TrainResult:
    run, lead, stopped = trainer.run, trainer.run.rank == 0, False

    def on_eval() -> None:
        if lead:
            plot_loss(run_dir)
            trackers.image(run_dir / "loss.png", trainer.step)

    # From here to the end a SIGTERM only sets the stop flag: after ``fit`` a late or repeated
    # SIGTERM must not kill the process half-way through the final export, nor turn a clean
    # stop into a non-zero exit.
    with trainer.stop_on_sigterm():
        try:
            last = trainer.fit(evaluate=lambda: evaluate_run(run), on_eval=on_eval)
        except Stop:
            stopped, last = True, {}
        if trainer.stop_requested:
            stopped = True
            say(f"stopped by signal at step {trainer.step}; checkpoint saved. "
                f"Continue with: lmobj train --resume {run_dir}")
        return _finish(run, trainer, run_dir, started, last, stopped, trackers)


@contextmanager
def _restored_threads(threads: int) -> Iterator[None]:
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _finish(run: Run, trainer: Trainer, run_dir: Path, started: str, last: dict[str, Any],
            stopped: bool, trackers: Trackers) -> TrainResult:
    """Final evaluation and export (skipped when stopped: a resume redoes them)."""
    lead = run.rank == 0
    ev: dict[str, Any] = {}
    if not stopped:
        ev = evaluate_run(run)  # on every rank: an FSDP forward is a collective
        if ev:
            trainer.log({"step": trainer.step, "tokens": trainer.tokens, "eval": True, **ev})
        if lead:
            atomic_write_json(run_dir / "eval.json", {"step": trainer.step, **ev})
        export_final(run, run_dir / "final")
    if lead:
        plot_loss(run_dir)
        trackers.image(run_dir / "loss.png", trainer.step)
    barrier()
    return TrainResult(run_dir=run_dir, started=started, final=last, eval=ev, stopped=stopped)
