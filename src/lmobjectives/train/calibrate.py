"""Calibration of a timed run: measure optimizer steps on this machine, then size the model.

Without ``model.preset`` (and without ``model.init_from``) a timed run picks its model from
the shape family of ``models/sizing.py``: each candidate, smallest first, is built and
trained for a few real steps (the run's objective, data and batch shape; the steps are thrown
away), and the one with the lowest loss predicted for the tokens the rest of the budget buys
is kept (Hoffmann et al. 2022's fit, see ``models/sizing.py``). Calibration is time-boxed to
``CALIBRATION_SHARE`` of the budget and at most ``CALIBRATION_MAX_S``: once a candidate took
more than what is left of the box, larger ones are not tried. With a preset, the same
measurement of that one model seeds the step plan.

The record (candidates with their measured tokens/s and predicted loss, the chosen shape,
the planned tokens) goes into ``run.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from lmobjectives.config import RunConfig
from lmobjectives.errors import UserError
from lmobjectives.models.sizing import SHAPES, TOKENS_PER_PARAMETER, choose_shape
from lmobjectives.train.budget import StepPlan, format_seconds, parse_duration

CALIBRATION_SHARE = 0.05  # of the budget
CALIBRATION_MAX_S = 20.0
WARM_STEPS = 1  # the first step of a new model pays for allocation: not timed
TIMED_STEPS = 2
# torch.compile is tried only when the budget could repay its compile time (about a minute
# for a small model on 2 CPU cores; measured gains +12-34% on 0.7-6 M models): 10 minutes.
COMPILE_MIN_BUDGET_S = 600.0
# Share of the training time assumed lost to evaluation and checkpoints when the candidates
# are compared (the plan then measures them).
OVERHEAD_SHARE = 0.05


def needs_sizing(cfg: RunConfig) -> bool:
    """A timed run that names no model: no preset given and no weights to start from."""
    return (cfg.train.time is not None and cfg.model.init_from is None
            and "preset" not in cfg.model.model_fields_set)


def candidate_config(cfg: RunConfig, name: str) -> RunConfig:
    """``cfg`` with the shape ``name``, and its row length, batch and learning rate where
    the user did not set them."""
    shape = SHAPES[name]
    train_set, data_set = cfg.train.model_fields_set, cfg.data.model_fields_set
    train = {k: v for k, v in (("lr", shape.lr), ("batch_size", shape.batch_size))
             if k not in train_set}
    data = {"seq_len": shape.seq_len} if "seq_len" not in data_set else {}
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"preset": name}),
        "train": cfg.train.model_copy(update=train),
        "data": cfg.data.model_copy(update=data)})


def _timed_steps(trainer: Any, n: int, box_end: float, clock: Callable[[], float]) -> list[float]:
    times = []
    for _ in range(n):
        start = clock()
        trainer.train_step()
        times.append(clock() - start)
        if clock() > box_end:
            break
    return times


def measure(cfg: RunConfig, run_dir: Path, box_end: float, world_size: int,
            clock: Callable[[], float], one_thread: bool = True) -> dict[str, Any] | None:
    """Seconds per optimizer step and tokens/s of ``cfg`` (None: it could not be built).
    With several threads, one thread is timed too: small models gain little from a second
    core, and on a busy machine several threads waiting on each other can run several times
    slower than one; the faster count is kept (``threads``)."""
    import torch

    from lmobjectives.models.presets import count_parameters
    from lmobjectives.train.batches import compute_threads
    from lmobjectives.train.loop import Trainer
    from lmobjectives.train.setup import open_run

    try:
        run = open_run(cfg, run_dir, progress=False)
        trainer = Trainer(run, progress=False)
    except UserError:  # e.g. MTP's compute matching needs more layers than this shape has
        return None
    # With a preparation thread on CPU, compute gets a core less (train/batches.py).
    threads = compute_threads(torch.get_num_threads(), trainer.batches.background, run.device)
    counts = [1, threads] if threads > 1 and one_thread else [threads]
    try:
        times = _time_thread_counts(trainer, counts, box_end, clock)
    finally:
        trainer.close()  # the step it prepared for a next step that will not run
    by_threads = {n: sum(ts) / len(ts) for n, ts in times.items() if ts}
    best = min(by_threads, key=by_threads.get)
    step_s = by_threads[best]
    tokens_per_step = trainer.tokens / trainer.step  # this process's share
    return {"shape": cfg.model.preset, "parameters": count_parameters(run.model),
            "step_seconds": round(step_s, 4), "threads": best,
            "step_seconds_by_threads": {str(k): round(v, 4) for k, v in by_threads.items()},
            "tokens_per_step": int(tokens_per_step * world_size),
            "tokens_per_second": round(tokens_per_step * world_size / step_s, 1),
            "steps_measured": trainer.step}


def _time_thread_counts(trainer: Any, counts: list[int], box_end: float,
                        clock: Callable[[], float]) -> dict[int, list[float]]:
    """Step times with each of ``counts`` compute threads. With ``data.prefetch`` each timed
    step runs beside the preparation of the next one, as in the run, so the count chosen
    is the best one with the preparation thread competing for the cores."""
    import torch

    threads = torch.get_num_threads()
    times: dict[int, list[float]] = {n: [] for n in counts}
    torch.set_num_threads(counts[0])
    try:
        _timed_steps(trainer, WARM_STEPS, box_end, clock)
    finally:
        torch.set_num_threads(threads)
    # Alternate the thread counts, so that both see the same load; one thread first: when the
    # box ends early it is the safe measurement (never several times slower on a busy machine).
    for i in range(TIMED_STEPS * len(counts)):
        if i and clock() > box_end:
            break
        torch.set_num_threads(counts[i % len(counts)])
        try:
            times[counts[i % len(counts)]] += _timed_steps(trainer, 1, float("inf"), clock)
        finally:
            torch.set_num_threads(threads)
    return times


def calibrate(cfg: RunConfig, run_dir: Path, plan_seconds: Callable[[], float], *,
              world_size: int = 1, clock: Callable[[], float] = time.time,
              say: Callable[[str], None] = lambda m: None) -> tuple[RunConfig, dict[str, Any]]:
    """Measure the candidates, choose one; returns the run's config and the record.
    ``plan_seconds()`` is the budget time left (it shrinks as calibration runs)."""
    sizing = needs_sizing(cfg)
    names = list(SHAPES) if sizing else [cfg.model.preset]
    box = min(CALIBRATION_MAX_S, CALIBRATION_SHARE * plan_seconds())
    begin = clock()
    box_end = begin + box
    measured = []
    for name in names:
        started = clock()
        c = candidate_config(cfg, name) if sizing else cfg
        m = measure(c, run_dir, box_end, world_size, clock)
        if m is None:
            continue
        measured.append(m)
        took = clock() - started
        if clock() + took > box_end:  # the next, larger shape would not finish in the box
            break
    if not measured:
        raise UserError(f"no model of the shape family could be built for objective {cfg.objective}; "
                        "give --preset")
    seconds = plan_seconds() * (1 - OVERHEAD_SHARE)
    chosen = choose_shape(measured, seconds)
    record = {"candidates": measured, "chosen": chosen["shape"], "threads": chosen["threads"],
              "parameters": chosen["parameters"], "tokens_per_second": chosen["tokens_per_second"],
              "planned_tokens": chosen["planned_tokens"], "seconds": round(clock() - begin, 2),
              "rule": "min over candidates of Hoffmann et al. 2022 eq. 10 L(N, D), "
                      "D = measured tokens/s x training time" if sizing else "preset given"}
    if sizing:
        cfg = candidate_config(cfg, chosen["shape"])
    if "compile" not in cfg.model.model_fields_set and plan_seconds() >= COMPILE_MIN_BUDGET_S:
        record["compile"] = try_compile(cfg, run_dir, chosen, plan_seconds(), world_size, clock)
        if record["compile"]["used"]:
            cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": True})})
    if sizing:
        ratio = chosen["planned_tokens"] / chosen["parameters"]
        say(f"calibration ({record['seconds']:.1f} s): "
            + ", ".join(f"{m['shape']} {m['parameters'] / 1e6:.1f} M {m['tokens_per_second'] / 1e3:.1f} K tok/s"
                        for m in measured))
        say(f"chose {chosen['shape']} ({chosen['parameters'] / 1e6:.2f} M parameters): lowest predicted "
            f"loss for {chosen['planned_tokens'] / 1e6:.2f} M tokens in {format_seconds(seconds)} "
            f"({ratio:.{2 if ratio < 10 else 0}f} tokens per parameter; compute-optimal is ~{TOKENS_PER_PARAMETER}, "
            f"Hoffmann et al. 2022); {chosen['threads']} thread(s)")
    return cfg, record


def compile_pays(eager_s: float, compiled_s: float, compile_s: float, seconds: float) -> bool:
    """Whether ``seconds`` of training make more steps compiled, after paying ``compile_s``
    (counted twice: calibration compiled once, the run compiles again from its cache)."""
    if compiled_s <= 0 or compiled_s >= eager_s:
        return False
    return (seconds - 2 * compile_s) / compiled_s > seconds / eager_s


def try_compile(cfg: RunConfig, run_dir: Path, eager: dict[str, Any], seconds: float,
                world_size: int, clock: Callable[[], float]) -> dict[str, Any]:
    """Time the chosen model under ``torch.compile``; any failure keeps it eager."""
    import torch

    compiled_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": True})})
    threads = torch.get_num_threads()
    torch.set_num_threads(eager["threads"])
    began = clock()
    try:
        m = measure(compiled_cfg, run_dir, float("inf"), world_size, clock, one_thread=False)
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: train eager
        return {"used": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    finally:
        torch.set_num_threads(threads)
    if m is None:
        return {"used": False, "reason": "could not be built"}
    compile_s = clock() - began
    used = compile_pays(eager["step_seconds"], m["step_seconds"], compile_s, seconds)
    return {"used": used, "step_seconds": m["step_seconds"], "eager_step_seconds": eager["step_seconds"],
            "compile_seconds": round(compile_s, 1)}


def first_plan(cfg: RunConfig, record: dict[str, Any] | None, deadline: float, budget_s: float,
               clock: Callable[[], float] = time.time) -> StepPlan:
    """The step plan of a new timed run, seeded by the calibrated step time."""
    step_s = record["candidates"][[c["shape"] for c in record["candidates"]].index(record["chosen"])][
        "step_seconds"] if record else 1.0
    t = cfg.train
    n_params = record["parameters"] if record else 0
    # First guesses until measured: an evaluation ~ eval_batches forward passes of two kinds
    # (objective loss, bits per byte) and a first plot (importing matplotlib: ~1 s), a
    # checkpoint ~ 12 bytes a parameter at ~100 MB/s.
    eval_s = t.eval_batches * step_s * 0.7 + 1.0
    save_s = 0.2 + 12 * n_params / 100e6
    return StepPlan(budget_s=budget_s, deadline=deadline, step_s=step_s, eval_s=eval_s,
                    save_s=save_s, schedule=t.schedule, warmup_fraction=t.warmup_fraction,
                    decay_fraction=t.decay_fraction, clock=clock)


def prepare_data(cfg: RunConfig, run_dir: Path, progress: bool) -> None:
    """Tokenizer and token stores of the run, made before calibration so that it times only
    optimizer steps."""
    from lmobjectives.spec import resolve_sources, resolve_tokenizer
    from lmobjectives.train.continual import resolve_init

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, _ = resolve_init(cfg)
    tokenizer, tok_from = resolve_tokenizer(cfg, run_dir)
    resolve_sources(cfg, run_dir, tokenizer, progress, tokenizer_from=tok_from)


def timed_setup(cfg: RunConfig, run_dir: Path, world: Any, started_at: float,
                say: Callable[[str], None], progress: bool) -> tuple[RunConfig, dict[str, Any]]:
    """Prepare the data and calibrate (rank 0; the others take its choice)."""
    from lmobjectives.train.distributed import broadcast_object

    deadline = started_at + parse_duration(cfg.train.time)
    record = None
    if world.rank == 0:
        prepare_data(cfg, run_dir, progress)
        _, record = calibrate(cfg, run_dir, lambda: deadline - time.time(),
                              world_size=world.world_size, say=say)
    record = broadcast_object(record)
    if needs_sizing(cfg):
        cfg = candidate_config(cfg, record["chosen"])
    if (record.get("compile") or {}).get("used"):
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"compile": True})})
    return cfg, record


def start_plan(trainer: Any, run_dir: Path, record: dict[str, Any] | None, started_at: float) -> None:
    """Give ``trainer`` (a ``train.loop.Trainer``) its step plan: the one its checkpoint
    holds, else a new one seeded by calibration; several processes take rank 0's."""
    from lmobjectives.rundir import read_run_info
    from lmobjectives.train.distributed import broadcast_object

    cfg = trainer.cfg
    budget_s = parse_duration(cfg.train.time)
    if trainer.plan is None:
        if record is None:  # resumed before its first checkpoint: calibrated when it started
            record = (read_run_info(run_dir).get("budget") or {}).get("calibration")
        trainer.plan = first_plan(cfg, record, started_at + budget_s, budget_s)
        trainer.plan.processes = trainer.run.world_size
    t = cfg.train
    trainer.plan.start(trainer.step, t.eval_every, t.checkpoint_every)
    if trainer.run.world_size > 1:
        plan = trainer.plan
        plan.total, plan.warmup, plan.decay_start = broadcast_object(
            (plan.total, plan.warmup, plan.decay_start))
