"""``lmobj compare``: one model per objective under an equal budget, then one report.

What is held equal: the model size (one preset name for all three families — decoder,
encoder, encoder-decoder), the data (one token store, prepared once under ``DIR/store``
unless ``--data`` names one), ``seq_len``, batch size, learning-rate schedule, seed, and the
number of corpus tokens each run reads.

Counting tokens. A run's ``tokens`` (``metrics.jsonl``) counts the packed rows the loader
serves, ``batch * grad_accum * row_length`` per step. Most objectives read rows of
``seq_len``; span corruption reads longer rows (``row_length(seq_len)``) because its inputs
shrink when each span collapses into one sentinel. So the budget is in corpus tokens read,
and each run's step count is ``round(budget / tokens per step)``::

    seq_len 64, batch 4, budget 25,600 tokens
    clm:  row 64 -> 256 tokens/step -> 100 steps
    span: row 70 -> 280 tokens/step ->  91 steps

``--steps N`` sets the budget to N steps of ``seq_len`` rows. ``--time 30m`` instead gives
every run the same share of the command's wall time (``compare.timing``: store preparation
and measuring accounted), each run a timed run that plans its own steps; then equal time,
not equal tokens, is what is held equal, and the report gives the tokens each run read.
Runs live in ``DIR/runs/KEY``
(KEY is the objective, or ``span@prefix_lm`` written ``span-prefix_lm`` for another
architecture). A finished run whose config matches is reused, one with checkpoints is
resumed, and a run with another config is an error unless ``overwrite``. Measurements are
cached the same way (``compare.measure``). The report (``lmobjectives.report.comparison``)
reads only the files this writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from lmobjectives.checkpoint import list_checkpoints
from lmobjectives.compare.measure import (METRICS, Bench, Subject, measure, measure_key,
                                          read_measure, write_measure)
from lmobjectives.compare.pilot import pilot_seconds
from lmobjectives.compare.plan_file import write_plan
from lmobjectives.compare.shared import shared_store, shared_tokenizer
from lmobjectives.compare.timing import finish, plan_time, record_run
from lmobjectives.compare.token_probe import build_token_probe
from lmobjectives.config import RunConfig, apply_set, build_config
from lmobjectives.errors import UserError
from lmobjectives.objectives import OBJECTIVES, build_objective, objective_class

# Every registered objective, in registry order: a newly added objective is compared too.
DEFAULT_OBJECTIVES = tuple(OBJECTIVES)
DEFAULT_OUT = "runs/compare"
# Measuring is small batches and one-token decoding, where a second thread only waits on a
# shared machine: measured on a tiny-preset CLM run, 2 cores at load ~5, 9.7 s with one
# thread against 21.8 s with two (token probes 1.2 s against 12.9 s), ~116 s at load ~7.
MEASURE_THREADS = 1
# Three seeds give a first interval (t(0.975, 2) = 4.30); fewer where the budget is tight.
DEFAULT_SEEDS = 3


@dataclass(frozen=True)
class Entry:
    key: str  # directory name under DIR/runs
    objective: str
    architecture: str | None  # None: the objective's default

    @property
    def label(self) -> str:
        return self.objective if self.architecture is None else f"{self.objective}@{self.architecture}"


@dataclass
class CompareResult:
    out: Path
    runs: dict[str, str] = field(default_factory=dict)  # label -> "trained" / "reused" / "resumed ..."
    skipped: dict[str, str] = field(default_factory=dict)  # label -> why
    report_md: Path | None = None
    report_html: Path | None = None


def parse_objectives(names: Sequence[str]) -> list[Entry]:
    """``["clm", "span@prefix_lm"]`` -> entries; a repeated name is an error."""
    entries: list[Entry] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        obj, _, arch = name.partition("@")
        entry = Entry(key=obj if not arch else f"{obj}-{arch}", objective=obj, architecture=arch or None)
        if any(e.key == entry.key for e in entries):
            raise UserError(f"objective '{name}' is listed twice in --objectives")
        entries.append(entry)
    if not entries:
        raise UserError("--objectives is empty; name at least one (e.g. clm,mlm,span)")
    return entries


# ---------------------------------------------------------------------------- config
def base_tree(*, preset: str, seq_len: int | None, batch_size: int | None, seed: int | None,
              lr: float | None, tokenizer: str | None, sets: Sequence[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {"model": {"preset": preset}, "data": {}, "train": {"eval_every": 0}}
    for key, value in (("seq_len", seq_len), ("tokenizer", tokenizer)):
        if value is not None:
            tree["data"][key] = value
    for key, value in (("batch_size", batch_size), ("seed", seed), ("lr", lr)):
        if value is not None:
            tree["train"][key] = value
    for assignment in sets:
        key = assignment.split("=", 1)[0].strip()
        if key.split(".")[0] in ("objective", "objective_params", "architecture", "out"):
            raise UserError(f"--set {key}: compare sets the objective, architecture and run "
                            "directory of each run itself; only shared keys can be set")
        apply_set(tree, assignment)
    return tree


def _differences(have: Any, want: Any, prefix: str = "") -> list[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(have) | set(want)):
            if prefix == "" and k == "out":
                continue
            out += _differences(have.get(k), want.get(k), f"{prefix}{k}.")
        return out
    return [] if have == want else [prefix.rstrip(".")]


def run_seeds(base: int, n: int) -> list[int]:
    """The seeds of ``n`` repeats: ``base``, ``base + 1``, ..."""
    return [base + i for i in range(n)]


def plan_runs(entries: list[Entry], tree: dict[str, Any], budget: int | None, tokenizer: Any,
              specials: Any, out: Path, seeds: Sequence[int],
              per_run_s: int | None = None) -> list[tuple[Entry, RunConfig, int]]:
    """(entry, config, row_length) per run and seed: with ``per_run_s``, a timed run of that
    many seconds (``compare.timing``); else steps set for an equal budget of ``budget``
    tokens. A seed sets model initialisation, data order and objective randomness. Runs
    go seed by seed (every objective once, then again): when the machine's load changes
    during a comparison, it falls on every objective alike, not on the last ones."""
    plans = []
    for seed in seeds:
        for e in entries:
            t = copy.deepcopy(tree)
            t["train"] = {**t["train"], "seed": seed}
            if per_run_s is not None:
                t["train"]["time"] = f"{per_run_s}s"
            t.update({"objective": e.objective, "out": str(out / "runs" / e.key / f"seed-{seed}")})
            if e.architecture is not None:
                t["architecture"] = e.architecture
            cfg = build_config(t)
            objective = build_objective(e.objective, {}, specials, tokenizer=tokenizer)
            row = objective.row_length(cfg.data.seq_len)
            if per_run_s is None:
                per_step = cfg.train.batch_size * cfg.train.grad_accum * row
                steps = max(1, round(budget / per_step))
                cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})
            plans.append((e, cfg, row))
    return plans


# ---------------------------------------------------------------------------- training
def train_or_reuse(cfg: RunConfig, *, overwrite: bool, progress: bool,
                   say: Callable[[str], None]) -> str:
    """Train ``cfg`` into ``cfg.out``, reusing a finished matching run, resuming a started one."""
    from lmobjectives.train.job import train

    run_dir = Path(cfg.out)
    start_over = False
    if (run_dir / "config.yaml").is_file():
        have = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        diff = _differences(have, cfg.model_dump(mode="json"))
        if diff and not overwrite:
            raise UserError(f"{run_dir} holds a run with another config (differs in "
                            f"{', '.join(diff[:5])}); pass --overwrite to retrain it, or use another --out")
        if not diff and (run_dir / "final" / "config.json").is_file() and (run_dir / "eval.json").is_file():
            return "reused"
        if not diff and list_checkpoints(run_dir):
            res = train(cfg, resume=run_dir, progress=progress, say=say)
            if res.stopped:
                raise UserError(f"stopped during {run_dir}; run the same command again to resume")
            return res.started
        start_over = True
    res = train(cfg, overwrite=start_over or overwrite, progress=progress, say=say)
    if res.stopped:
        raise UserError(f"stopped during {run_dir}; run the same command again to resume")
    return "trained"


# ---------------------------------------------------------------------------- measuring
def make_bench(store_path: str, tokenizer: Any, specials: Any, cfg: RunConfig, device: Any) -> Bench:
    from lmobjectives.data.loader import PackedSource
    from lmobjectives.evaluate.metrics import token_byte_lengths, val_batches
    from lmobjectives.store.store import TokenStore

    store = TokenStore(store_path)
    table = store.split("val")
    if len(table.docs) == 0:
        raise UserError(f"store {store_path} holds no held-out documents; prepare it with "
                        "--val-fraction above 0 (compare needs held-out text)")
    src = PackedSource(table, cfg.data.seq_len, seed=0, pad=specials.pad, shuffle=False)
    rows = val_batches(src, cfg.train.batch_size, cfg.train.eval_batches)
    probe = build_token_probe(store, tokenizer, cfg.data.seq_len, specials.pad,
                              encoding=cfg.data.encoding, text_field=cfg.data.text_field)
    return Bench(rows=rows, byte_lengths=token_byte_lengths(tokenizer), probe=probe, device=device,
                 table=table, pad=specials.pad, batch_size=cfg.train.batch_size,
                 seq_len=cfg.data.seq_len)


@contextlib.contextmanager
def measuring_threads() -> Iterator[None]:
    """Measure with ``MEASURE_THREADS`` torch threads, restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(MEASURE_THREADS, threads))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure_run(entry: Entry, cfg: RunConfig, bench: Bench, say: Callable[[str], None]) -> None:
    from transformers.utils import logging as hf_logging

    from lmobjectives.infer.load import load_model

    hf_logging.disable_progress_bar()
    run_dir = Path(cfg.out)

    key = measure_key(run_dir / "final", bench, METRICS)
    done = read_measure(run_dir)
    if done is not None and done.get("key") == key:
        return
    loaded = load_model(run_dir)
    model = loaded.model.to(bench.device)
    ev = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    subject = Subject(key=entry.key, objective=entry.objective, architecture=loaded.architecture,
                      run_dir=run_dir, model=model, specials=loaded.specials,
                      tokenizer=loaded.tokenizer, eval=ev, seed=cfg.train.seed,
                      transform=build_objective(cfg.objective, dict(cfg.objective_params),
                                                loaded.specials, tokenizer=loaded.tokenizer))
    say(f"measuring {entry.label} seed {cfg.train.seed}")
    values = measure(subject, bench)
    write_measure(run_dir, key, sum(p.numel() for p in model.parameters()), values)


# ---------------------------------------------------------------------------- the command
def registered(entries: list[Entry], skipped: dict[str, str], say: Callable[[str], None]) -> list[Entry]:
    """The entries whose objective this build has; the others go to ``skipped`` with why."""
    keep = []
    for e in entries:
        if e.objective not in OBJECTIVES:
            skipped[e.label] = (f"objective '{e.objective}' is not registered in this build "
                                f"(registered: {', '.join(OBJECTIVES)})")
            say(f"skipping {e.label}: {skipped[e.label]}")
            continue
        known = objective_class(e.objective).architectures
        if e.architecture is not None and e.architecture not in known:
            raise UserError(f"objective '{e.objective}' trains {', '.join(known)}, not '{e.architecture}'")
        keep.append(e)
    if not keep:
        raise UserError("none of the objectives asked for is registered in this build")
    return keep


def _check_sources_and_budget(corpus: Sequence[str] | None, store: str | None,
                              steps: int | None, tokens: int | None, seeds: int,
                              time_budget: str | None) -> None:
    if corpus and store:
        raise UserError("pass --corpus or --data, not both")
    if seeds < 1:
        raise UserError("--seeds must be at least 1")
    if time_budget is not None and (steps is not None or tokens is not None):
        raise UserError("pass --time or --steps/--tokens, not both (equal wall time per run "
                        "or equal tokens per run)")
    if time_budget is not None:
        from lmobjectives.train.budget import parse_duration

        parse_duration(time_budget)  # a clear error before any work
    if steps is not None and tokens is not None:
        raise UserError("pass --steps or --tokens, not both")
    if (steps is not None and steps < 1) or (tokens is not None and tokens < 1):
        raise UserError("--steps and --tokens must be at least 1")


def _run_label(e: Entry, cfg: RunConfig) -> str:
    return f"{e.label} seed {cfg.train.seed}"


def compare(
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    *,
    corpus: Sequence[str] | None = None,
    store: str | None = None,
    tokenizer: str | None = None,
    preset: str = "small",
    steps: int | None = None,
    tokens: int | None = None,
    time_budget: str | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    seeds: int = DEFAULT_SEEDS,
    lr: float | None = None,
    sets: Sequence[str] = (),
    out: str | Path = DEFAULT_OUT,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    started_at: float | None = None,
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> CompareResult:
    """Train (or reuse) ``seeds`` runs per objective under an equal budget — equal tokens
    (``steps``/``tokens``), or equal wall time (``time_budget``, e.g. "30m", for the whole
    command, counted from ``started_at``; ``compare.timing``) — and write the report (every
    metric as mean ± 95% interval over the seeds)."""
    from lmobjectives.report.comparison import write_report
    from lmobjectives.runtime import select_device

    started_at = time.time() if started_at is None else started_at
    _check_sources_and_budget(corpus, store, steps, tokens, seeds, time_budget)
    out = Path(out)
    result = CompareResult(out=out)
    entries = registered(parse_objectives(objectives), result.skipped, say)
    tree = base_tree(preset=preset, seq_len=seq_len, batch_size=batch_size, seed=seed, lr=lr,
                     tokenizer=tokenizer, sets=sets)
    out.mkdir(parents=True, exist_ok=True)
    tree["data"]["store"] = shared_store(out, tree, list(corpus) if corpus else None, store,
                                          overwrite, progress, say)
    shared = build_config({**tree, "objective": entries[0].objective})
    tok, specials = shared_tokenizer(shared)
    t = shared.train
    run_seed_list = run_seeds(t.seed, seeds)
    budget, timing = None, None
    if time_budget is None:
        budget = tokens if tokens is not None else \
            (steps or t.steps) * t.batch_size * t.grad_accum * shared.data.seq_len
    plans = plan_runs(entries, tree, budget or 1, tok, specials, out, run_seed_list)
    # Built before training: a timed comparison counts it as setup and times one
    # measurement on it before splitting the budget.
    bench = make_bench(shared.data.store, tok, specials, shared, select_device())
    if time_budget is not None:
        timing = _split_time(out, time_budget, started_at, plans, bench, say)
        plans = plan_runs(entries, tree, None, tok, specials, out, run_seed_list,
                          per_run_s=timing["per_run_s"])
    _train_all(plans, result, timing, out, overwrite, progress, say)
    measure_began = time.time()
    with measuring_threads():
        for e, cfg, _ in plans:
            measure_run(e, cfg, bench, say)
    probe = bench.probe
    if timing is not None:
        timing = finish(timing, time.time() - measure_began, started_at)
    runs = [{"label": e.label, "objective": e.objective, "seed": cfg.train.seed,
             "run_dir": f"runs/{e.key}/seed-{cfg.train.seed}", "steps": cfg.train.steps,
             "row_length": row, "status": result.runs[_run_label(e, cfg)]}
            for e, cfg, row in plans]
    write_plan(out, shared, budget_tokens=budget, timing=timing, runs=runs, seeds=run_seed_list,
               skipped=result.skipped, probe=probe, command=command)
    result.report_md, result.report_html = write_report(out)
    return result


def _split_time(out: Path, time_budget: str, started_at: float,
                plans: list[tuple[Entry, RunConfig, int]], bench: Bench,
                say: Callable[[str], None]) -> dict[str, Any]:
    """The equal split of ``time_budget`` across ``plans`` (``compare.timing``)."""
    with measuring_threads():
        timing = plan_time(out, time_budget, started_at, [_run_label(e, c) for e, c, _ in plans],
                           lambda: pilot_seconds(plans[0][1], bench, out / "pilot"))
    say(f"--time {time_budget}: {timing['per_run_s']} s of wall time per run "
        f"({len(plans)} runs; {timing['measure_reserve_s']:.0f} s kept for measuring them)")
    return timing


def _train_all(plans: list[tuple[Entry, RunConfig, int]], result: CompareResult,
               timing: dict[str, Any] | None, out: Path, overwrite: bool, progress: bool,
               say: Callable[[str], None]) -> None:
    for e, cfg, row in plans:
        label = _run_label(e, cfg)
        rows = cfg.train.batch_size * cfg.train.grad_accum
        say(f"{label}: " + (f"{cfg.train.time} of wall time, {rows} rows x {row} tokens a step"
                            if cfg.train.time else f"{cfg.train.steps} steps of {rows} rows x {row} tokens"))
        began = time.time()
        result.runs[label] = train_or_reuse(cfg, overwrite=overwrite, progress=progress, say=say)
        if timing is not None and result.runs[label] != "reused":
            record_run(out, timing, label, time.time() - began)
