"""The training job behind ``lmobj train``: open or resume a run, fit, evaluate, export."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmobjectives.checkpoint import clean_leftovers
from lmobjectives.config import RunConfig
from lmobjectives.errors import UserError
from lmobjectives.evaluate.metrics import left_to_right_bpb, objective_eval, val_batches
from lmobjectives.report.plots import plot_loss
from lmobjectives.train.distributed import (World, barrier, broadcast_object, eval_share,
                                            export_final, failures_end_every_rank, init_world,
                                            open_in_turn, parallelize)
from lmobjectives.train.loop import Stop, Trainer
from lmobjectives.rundir import config_hash, load_run_config
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


def _existing_run(cfg: RunConfig, world: World, resume: str | Path | None, overwrite: bool) -> Path | None:
    """``cfg.out`` when it holds a run of the same config, None when it holds none. Rank 0
    decides for every rank: the others could otherwise see the run files it is writing."""
    if resume is not None or overwrite:
        raise UserError("--resume-if-exists decides between starting and resuming by itself; "
                        "leave out --resume and --overwrite")
    if cfg.out is None:
        raise UserError("--resume-if-exists needs --out: the run directory to start or resume")
    out = Path(cfg.out)
    decision: tuple[str | None, str | None] = (None, None)  # (run to resume, error)
    if world.rank == 0 and (out / "config.yaml").is_file():
        if config_hash(load_run_config(out)) == config_hash(cfg):
            decision = (str(out), None)
        else:
            decision = (None, f"{out} holds a run with another config; give its own config (or "
                              "--resume it), or choose another --out")
    found, error = broadcast_object(decision)
    if error is not None:
        raise UserError(error)
    return None if found is None else Path(found)


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
          resume_if_exists: bool = False,
          say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> TrainResult:
    """Train ``cfg`` (or continue the run in ``resume``). Under ``torchrun`` (or
    ``lmobj train --nproc N``) every process calls this: each trains its share of every global
    batch, rank 0 writes the run's files and speaks, and a failure on one rank ends them all
    with its message (``train/distributed.py``). With ``resume_if_exists`` a run already in
    ``cfg.out`` with the same config is continued and an empty ``cfg.out`` starts one — what
    workers restarted by ``torchrun --max-restarts`` need."""
    world = init_world()
    with failures_end_every_rank(world):
        if resume_if_exists:
            resume = _existing_run(cfg, world, resume, overwrite)
        result = _train(cfg, world, resume=resume, overwrite=overwrite, force=force,
                        allow_reshard=allow_reshard, progress=progress,
                        say=say if world.rank == 0 else (lambda m: None))
    world.close()
    return result


def _train(cfg: RunConfig, world: World, *, resume: str | Path | None, overwrite: bool, force: bool,
           allow_reshard: bool, progress: bool, say: Callable[[str], None]) -> TrainResult:
    lead = world.rank == 0
    if lead:
        check_installed(cfg.log.backends)  # before any data is prepared
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
    seed_everything(cfg.train.seed)
    run = open_in_turn(lambda: open_run(cfg, run_dir, progress=progress and lead, rank=world.rank,
                                        world_size=world.world_size), world)
    n_params = sum(p.numel() for p in run.model.parameters())
    parallelize(run, world)
    trainer = Trainer(run, progress=progress)
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
    say(f"run {run_dir}: {started}; objective {cfg.objective} on {run.architecture} "
        f"({n_params / 1e6:.1f} M parameters), {cfg.train.steps} steps{procs}")
    trackers = Trackers()
    if lead and run.cfg.log.backends:
        trackers = open_trackers(run.cfg.log.backends, run_dir, run.cfg.model_dump(mode="json"),
                                 resume_at=(trainer.step, trainer.tokens) if resume is not None else None,
                                 wandb_project=run.cfg.log.wandb_project,
                                 warn=lambda m: say(f"warning: {m}"))
    trainer.on_log = trackers.log
    try:
        return _fit(run, trainer, run_dir, started, trackers, say)
    finally:
        trackers.close()


def _fit(run: Run, trainer: Trainer, run_dir: Path, started: str, trackers: Trackers,
         say: Callable[[str], None]) -> TrainResult:
    lead = run.rank == 0
    stopped = False

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
