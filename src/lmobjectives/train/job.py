"""The training job behind ``lmobj train``: open or resume a run, fit, evaluate, export."""

from __future__ import annotations

import shutil
import sys
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
from lmobjectives.train.distributed import (World, barrier, broadcast_object, export_final,
                                            failures_end_every_rank, init_world, open_in_turn,
                                            parallelize)
from lmobjectives.train.budget import parse_duration
from lmobjectives.train.calibrate import start_plan, timed_setup
from lmobjectives.train.loop import Stop, Trainer
from lmobjectives.runtime import seed_everything
from lmobjectives.train.setup import Run, default_run_dir, open_run, write_config_first, write_run_files
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
    out = objective_eval(run, rows, run.model_with_loss, run.device)
    out.update(left_to_right_bpb(run, run.model, rows, run.device, run.bf16) or {})
    return out


def _prepare_out(run_dir: Path, overwrite: bool) -> None:
    if (run_dir / "run.json").exists() or (run_dir / "config.yaml").exists():
        if not overwrite:
            raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it, "
                            "--overwrite to replace it, or another --out")
        shutil.rmtree(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"{run_dir} exists and is not empty; choose another --out or pass --overwrite")


def train(cfg: RunConfig, *, resume: str | Path | None = None, overwrite: bool = False,
          force: bool = False, allow_reshard: bool = False, progress: bool = True,
          say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
          started_at: float | None = None) -> TrainResult:
    """Train ``cfg`` (or continue the run in ``resume``). Under ``torchrun`` (or
    ``lmobj train --nproc N``) every process calls this: each trains its share of every global
    batch, rank 0 writes the run's files and speaks, and a failure on one rank ends them all
    with its message (``train/distributed.py``). A timed run (``train.time``) counts its
    budget from ``started_at`` (a ``time.time()``; default: now)."""
    started_at = time.time() if started_at is None else started_at
    world = init_world()
    threads = torch.get_num_threads()  # calibration may choose fewer; restored at the end
    with failures_end_every_rank(world), _restored_threads(threads):
        result = _train(cfg, world, resume=resume, overwrite=overwrite, force=force,
                        allow_reshard=allow_reshard, progress=progress,
                        say=say if world.rank == 0 else (lambda m: None), started_at=started_at)
    world.close()
    return result


def _train(cfg: RunConfig, world: World, *, resume: str | Path | None, overwrite: bool, force: bool,
           allow_reshard: bool, progress: bool, say: Callable[[str], None],
           started_at: float) -> TrainResult:
    lead = world.rank == 0
    if resume is not None:
        run_dir = Path(resume)
    else:
        run_dir = broadcast_object(Path(cfg.out) if cfg.out else default_run_dir(cfg))
    if cfg.out is None or Path(cfg.out) != run_dir:
        cfg = cfg.model_copy(update={"out": str(run_dir)})
    if resume is None and lead:
        _prepare_out(run_dir, overwrite)
        write_config_first(cfg, run_dir)
    barrier()  # no rank cleans leftovers below while rank 0 still writes config.yaml
    for p in clean_leftovers(run_dir):  # temporary files of a write that was killed
        say(f"removed the leftover {p} of an interrupted write")
    calibration = None
    if cfg.train.time is not None and resume is None:
        cfg, calibration = timed_setup(cfg, run_dir, world, started_at, say, progress and lead)
    seed_everything(cfg.train.seed)
    run = open_in_turn(lambda: open_run(cfg, run_dir, progress=progress and lead, rank=world.rank,
                                        world_size=world.world_size), world)
    if calibration is not None:
        torch.set_num_threads(calibration["threads"])
        run.info["budget"] = {"time": cfg.train.time, "seconds": parse_duration(cfg.train.time),
                              "calibration": calibration}
    n_params = sum(p.numel() for p in run.model.parameters())
    parallelize(run, world)
    trainer = Trainer(run, progress=progress)
    trainer.started_at = started_at
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
    stopped = False

    def on_eval() -> None:
        if lead:
            plot_loss(run_dir)

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
        result = _finish(run, trainer, run_dir, started, last, stopped)
    if cfg.train.time is not None:
        say(f"time: {time.time() - started_at:.1f} s of the {cfg.train.time} budget "
            f"({trainer.step} steps, {trainer.tokens / 1e6:.2f} M tokens)")
    return result


@contextmanager
def _restored_threads(threads: int) -> Iterator[None]:
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _finish(run: Run, trainer: Trainer, run_dir: Path, started: str, last: dict[str, Any],
            stopped: bool) -> TrainResult:
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
    barrier()
    return TrainResult(run_dir=run_dir, started=started, final=last, eval=ev, stopped=stopped)
