"""The rows and columns of the ``lmobj compare`` report, read from files, and the ranks and
sentences made from them.

Everything comes from files: ``DIR/compare.json`` (the plan: budget, runs, metric
descriptions, probe task) and, per run, ``config.yaml``, ``run.json``, ``metrics.jsonl``,
``eval.json`` and ``measure.json``. This module never imports the trainer.

Which numbers compare. Columns that score the same thing for every run (signal fraction,
throughput, bits-per-byte of the same held-out text, the probe) are ranked. An objective's
own loss averages over the tokens *that objective* scores — every next token for CLM, 15%
masked positions for MLM, sentinels and spans for span corruption — so those losses are
never ranked (``OWN_COLUMNS``).

The paragraph per objective is generated from the ranks: for each ranked column with at
least two values, the run is "best at" (rank 1), "worst at" (last) or in between; a
column only it has is "only it measures". Worked example, bits/byte lower is better::

    clm 1.91, prefix 2.05, fim 1.98  ->  clm: best at held-out bits/byte (1.910; 1st of 3)
                                         prefix: worst at held-out bits/byte (2.050; 3rd of 3)
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmobjectives.report.plots import read_metrics

FINAL_FRACTION = 0.1  # final train loss: mean over the last 10% of logged steps
CURVE_POINTS = 40  # loss curves: a rolling mean over len/40 steps smooths batch noise


@dataclass(frozen=True)
class Column:
    name: str
    label: str
    compares: str
    higher_is_better: bool | None  # None: not ranked across rows
    digits: int


RUN_COLUMNS = (
    Column("signal_fraction", "signal fraction",
           "every run: scored target tokens / corpus tokens read (the share of the data that "
           "carries a training signal)", True, 3),
)
OWN_COLUMNS = (
    Column("final_train_loss", "final train loss",
           "within a row only: the objective's own loss, mean of the last 10% of steps", None, 3),
    Column("heldout_loss", "held-out loss",
           "within a row only: the objective's own loss on held-out rows", None, 3),
)


@dataclass
class Row:
    label: str
    objective: str
    architecture: str
    parameters: int | None
    steps: int
    tokens: int
    row_length: int
    status: str
    values: dict[str, float | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    curve: tuple[list[int], list[float]] = ((), ())  # type: ignore[assignment]


# ------------------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_row(out: Path, entry: dict[str, Any], metric_names: list[str]) -> Row:
    run_dir = out / entry["run_dir"]
    info = _read_json(run_dir / "run.json")
    ev = _read_json(run_dir / "eval.json")
    meas = _read_json(run_dir / "measure.json")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    train = [r for r in read_metrics(run_dir) if not r.get("eval") and "loss" in r]
    last = train[-1] if train else {}
    row = Row(label=entry["label"], objective=entry["objective"],
              architecture=info.get("architecture") or cfg.get("architecture") or "?",
              parameters=meas.get("parameters"), steps=int(last.get("step", 0)),
              tokens=int(last.get("tokens", 0)), row_length=int(entry["row_length"]),
              status=entry.get("status", ""))
    if train:
        per_step = row.tokens / max(row.steps, 1)  # tokens read per step: a constant per run
        row.values["signal_fraction"] = statistics.fmean(r["targets"] for r in train) / per_step
        tail = train[-max(1, round(len(train) * FINAL_FRACTION)):]
        row.values["final_train_loss"] = statistics.fmean(r["loss"] for r in tail)
        row.curve = ([r["tokens"] for r in train], [r["loss"] for r in train])
    row.values["heldout_loss"] = ev.get("loss")
    for name in metric_names:
        m = meas.get("metrics", {}).get(name)
        if m is None:
            row.values[name] = None
            row.reasons[name] = "not measured (no measure.json entry)"
            continue
        row.values[name] = m.get("value")
        if m.get("value") is None:
            row.reasons[name] = m.get("reason", "not measured")
        row.extras[name] = {k: v for k, v in m.items() if k not in ("value", "reason")}
    return row


def load_comparison(out: str | Path) -> tuple[dict[str, Any], list[Row], list[Column]]:
    """The plan, one row per run, and the ranked columns (run-file columns, then metrics)."""
    out = Path(out)
    plan = _read_json(out / "compare.json")
    if not plan:
        raise FileNotFoundError(f"{out}/compare.json is missing: run `lmobj compare` first")
    metrics = [Column(m["name"], m["label"], m["compares"], m["higher_is_better"], m["digits"])
               for m in plan["metrics"]]
    rows = [run_row(out, e, [m.name for m in metrics]) for e in plan["runs"]]
    return plan, rows, [*RUN_COLUMNS, *metrics]


# ------------------------------------------------------------------------------ numbers
def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def ranks(rows: list[Row], col: Column) -> dict[str, tuple[int, int, bool]]:
    """label -> (rank, runs with a value, tied) for one ranked column; rank 1 is best."""
    vals = {r.label: r.values.get(col.name) for r in rows if r.values.get(col.name) is not None}
    sign = 1 if col.higher_is_better else -1
    out = {}
    for label, v in vals.items():
        better = sum(1 for w in vals.values() if sign * w > sign * v)
        tied = sum(1 for w in vals.values() if w == v) > 1
        out[label] = (better + 1, len(vals), tied)
    return out


def paragraph(row: Row, rows: list[Row], columns: list[Column]) -> str:
    """One objective's standing, from the ranks of every ranked column."""
    best, worst, middle, only = [], [], [], []
    for col in columns:
        if col.higher_is_better is None:
            continue
        rk = ranks(rows, col).get(row.label)
        if rk is None:
            continue
        rank, n, tied = rk
        v = fmt(row.values[col.name], col.digits)
        extra = ""
        if col.name == "probe_accuracy":
            ex = row.extras.get(col.name, {})
            if ex.get("at_init") is not None:
                extra += f", untrained {fmt(ex['at_init'], col.digits)}"
            if ex.get("baseline") is not None:
                extra += f", majority baseline {fmt(ex['baseline'], col.digits)}"
        where = f"{col.label} ({v}{extra}; {'tied ' if tied else ''}{ordinal(rank)} of {n})"
        if n == 1:
            only.append(f"{col.label} ({v}{extra})")
        elif rank == 1:
            best.append(where)
        elif rank == n:
            worst.append(where)
        else:
            middle.append(where)
    params = f"{row.parameters / 1e6:.1f} M parameters, " if row.parameters else ""
    parts = [f"**{row.label}** ({row.architecture.replace('_', '-')}, {params}{row.steps} steps):"]
    clauses = []
    if best:
        clauses.append("best at " + ", ".join(best))
    if worst:
        clauses.append("worst at " + ", ".join(worst))
    if middle:
        clauses.append("in between at " + ", ".join(middle))
    if only:
        clauses.append("the only run with " + ", ".join(only))
    parts.append("; ".join(clauses) + "." if clauses else "no comparable measurement.")
    return " ".join(parts)


def winners(rows: list[Row], columns: list[Column]) -> list[str]:
    out = []
    for col in columns:
        if col.higher_is_better is None:
            continue
        rk = ranks(rows, col)
        if len(rk) < 2:
            continue
        top = [r for r in rows if rk.get(r.label, (0,))[0] == 1]
        way = "higher" if col.higher_is_better else "lower"
        names = ", ".join(f"{r.label} ({fmt(r.values[col.name], col.digits)})" for r in top)
        out.append(f"{col.label} ({way} is better, {len(rk)} runs): {names}")
    return out
