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

Seeds. An objective runs once per seed; ``aggregate`` turns its runs into one row whose
values are means over the seeds, with the per-seed values kept in ``samples`` (the 95%
intervals and Welch tests of ``report.stats`` read them).

The paragraph per objective is generated from the numbers: for each ranked column with at
least two values, the row is "best at" it when no row is measurably better (Welch's test at
5%, ``report.stats.welch``), "measurably behind" the best row otherwise; when no row
differs measurably from any other the column reads "no measurable difference"; a column
only it has is "the only run with". Worked example, bits/byte lower is better, 3 seeds::

    clm 1.91 ± 0.02, prefix 2.05 ± 0.03  ->  clm: best at held-out bits/byte (1.910 ± 0.020)
                                             prefix: measurably behind clm at held-out bits/byte
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmobjectives.report.stats import interval, welch
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
    seed: int | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)  # per-seed values
    seeds: list["Row"] = field(default_factory=list)  # the per-seed rows of an aggregate

    def half(self, name: str) -> float | None:
        """Half-width of the 95% interval of ``name`` over the seeds (None with one seed)."""
        xs = self.samples.get(name) or []
        return interval(xs).half if len(xs) >= 2 else None


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
              status=entry.get("status", ""), seed=entry.get("seed"))
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
    runs = [run_row(out, e, [m.name for m in metrics]) for e in plan["runs"]]
    return plan, aggregate(runs), [*RUN_COLUMNS, *metrics]


def aggregate(runs: list[Row]) -> list[Row]:
    """One row per label (in first-seen order): values are means over the seeds that have
    one, ``samples`` the per-seed values, ``seeds`` the per-seed rows."""
    out: list[Row] = []
    for label in dict.fromkeys(r.label for r in runs):
        group = [r for r in runs if r.label == label]
        first = group[0]
        row = Row(label=label, objective=first.objective, architecture=first.architecture,
                  parameters=first.parameters,
                  # Equal under the token rule; under equal wall time each seed reads its own.
                  steps=round(statistics.fmean(r.steps for r in group)),
                  tokens=round(statistics.fmean(r.tokens for r in group)),
                  row_length=first.row_length, status=", ".join(sorted({r.status for r in group})),
                  reasons=dict(first.reasons), extras=dict(first.extras), curve=first.curve,
                  seeds=group)
        for name in {n for r in group for n in r.values}:
            xs = [r.values[name] for r in group if r.values.get(name) is not None]
            row.values[name] = statistics.fmean(xs) if xs else None
            if xs:
                row.samples[name] = [float(x) for x in xs]
        out.append(row)
    return out


# ------------------------------------------------------------------------------ numbers
def value_text(row: "Row", name: str, digits: int) -> str:
    """A row's value as printed: a bound (a masked diffusion model's ELBO) reads "≤ x"."""
    bound = row.extras.get(name, {}).get("bound")
    return ("≤ " if bound and row.values.get(name) is not None else "") + fmt(row.values.get(name), digits)


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


def show(row: Row, name: str, digits: int) -> str:
    """``mean ± half`` (the 95% interval over seeds), or the mean alone with one seed."""
    h = row.half(name)
    v = value_text(row, name, digits)
    return v if h is None else f"{v} ± {fmt(h, digits)}"


def measurably_better(a: Row, b: Row, col: Column) -> bool:
    """``a`` beats ``b`` at ``col`` by Welch's test at 5% over their seeds."""
    d = welch(a.samples.get(col.name, []), b.samples.get(col.name, [])) \
        if len(a.samples.get(col.name, [])) >= 2 and len(b.samples.get(col.name, [])) >= 2 else None
    if d is None or not d.significant:
        return False
    return d.diff > 0 if col.higher_is_better else d.diff < 0


def _standing(row: Row, rows: list[Row], col: Column) -> tuple[str, str] | None:
    """(kind, text) for one ranked column: kind "only", "none", "best" or "behind"."""
    have = [r for r in rows if r.values.get(col.name) is not None]
    if row not in have:
        return None
    v = show(row, col.name, col.digits)
    if len(have) == 1:
        return "only", f"{col.label} ({v})"
    if not any(measurably_better(a, b, col) for a in have for b in have):
        return "none", f"{col.label} ({v})"
    ahead = [a for a in have if measurably_better(a, row, col)]
    if not ahead:
        return "best", f"{col.label} ({v}; {ordinal(ranks(rows, col)[row.label][0])} of {len(have)})"
    top = max(ahead, key=lambda a: a.values[col.name] * (1 if col.higher_is_better else -1))
    return "behind", f"{col.label} ({v}; behind {top.label})"


def paragraph(row: Row, rows: list[Row], columns: list[Column]) -> str:
    """One objective's standing, column by column, differences called only when measurable."""
    parts: dict[str, list[str]] = {"best": [], "behind": [], "none": [], "only": []}
    for col in columns:
        if col.higher_is_better is None:
            continue
        got = _standing(row, rows, col)
        if got is not None:
            parts[got[0]].append(got[1])
    params = f"{row.parameters / 1e6:.1f} M parameters, " if row.parameters else ""
    n = len(row.seeds) or 1
    head = f"**{row.label}** ({row.architecture.replace('_', '-')}, {params}{row.steps} steps, {n} seed{'s' * (n > 1)}):"
    clauses = []
    if parts["best"]:
        clauses.append("best (no run measurably better) at " + ", ".join(parts["best"]))
    if parts["behind"]:
        clauses.append("measurably behind the best at " + ", ".join(parts["behind"]))
    if parts["none"]:
        clauses.append("no measurable difference between runs at " + ", ".join(parts["none"]))
    if parts["only"]:
        clauses.append("the only run with " + ", ".join(parts["only"]))
    return f"{head} {'; '.join(clauses) + '.' if clauses else 'no comparable measurement.'}"


def winners(rows: list[Row], columns: list[Column]) -> list[str]:
    """Per ranked column: the rows no other row beats measurably (or "no measurable difference")."""
    out = []
    for col in columns:
        if col.higher_is_better is None:
            continue
        have = [r for r in rows if r.values.get(col.name) is not None]
        if len(have) < 2:
            continue
        way = "higher" if col.higher_is_better else "lower"
        top = [r for r in have if not any(measurably_better(a, r, col) for a in have)]
        if len(top) == len(have):
            out.append(f"{col.label} ({way} is better, {len(have)} runs): no measurable difference")
            continue
        names = ", ".join(f"{r.label} ({show(r, col.name, col.digits)})" for r in top)
        out.append(f"{col.label} ({way} is better, {len(have)} runs): {names}")
    return out
