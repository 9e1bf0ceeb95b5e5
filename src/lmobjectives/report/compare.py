"""The comparison report of ``lmobj compare``: ``DIR/report.md`` (with its PNG plots beside
it) and ``DIR/report.html`` (one file, plots embedded as base64, no external assets).

Everything comes from files: ``DIR/compare.json`` (the plan: budget, runs, metric
descriptions, probe task) and, per run, ``config.yaml``, ``run.json``, ``metrics.jsonl``,
``eval.json`` and ``measure.json``. This module never imports the trainer.

Which numbers compare. Columns that score the same thing for every run (signal fraction,
throughput, bits-per-byte of the same held-out text, the probe) go in the comparison table
and are ranked. An objective's own loss averages over the tokens *that objective* scores —
every next token for CLM, 15% masked positions for MLM, sentinels and spans for span
corruption — so those losses go in a separate table that is never ranked.

The paragraph per objective is generated from the ranks: for each ranked column with at
least two values, the run is "best at" (rank 1), "worst at" (last) or in between; a
column only it has is "only it measures". Worked example, bits/byte lower is better::

    clm 1.91, prefix 2.05, fim 1.98  ->  clm: best at held-out bits/byte (1.910; 1st of 3)
                                         prefix: worst at held-out bits/byte (2.050; 3rd of 3)
"""

from __future__ import annotations

import base64
import html
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmobjectives.report.plots import read_metrics, save_figure

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


def value_text(row: "Row", name: str, digits: int) -> str:
    """A row's value as printed: a bound (a masked diffusion model's ELBO) reads "≤ x"."""
    bound = row.extras.get(name, {}).get("bound")
    return ("≤ " if bound and row.values.get(name) is not None else "") + fmt(row.values.get(name), digits)


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
        v = value_text(row, col.name, col.digits)
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
        names = ", ".join(f"{r.label} ({value_text(r, col.name, col.digits)})" for r in top)
        out.append(f"{col.label} ({way} is better, {len(rk)} runs): {names}")
    return out


# ------------------------------------------------------------------------------ document
@dataclass
class Doc:
    """A small block document rendered both as Markdown and as HTML."""

    blocks: list[tuple] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # footnote texts, numbered from 1

    def note(self, reason: str) -> int:
        if reason not in self.notes:
            self.notes.append(reason)
        return self.notes.index(reason) + 1

    def cell(self, value: float | None, digits: int, reason: str | None, bound: bool = False) -> str:
        if value is None:
            return f"n/a [{self.note(reason or 'not measured')}]"
        return ("≤ " if bound else "") + fmt(value, digits)


def build_doc(plan: dict[str, Any], rows: list[Row], columns: list[Column]) -> Doc:
    doc = Doc()
    add = doc.blocks.append
    add(("h1", "Pre-training objectives under an equal budget"))
    if plan.get("command"):
        add(("p", "Made by:"))
        add(("code", plan["command"]))
    row_lengths = sorted({r.row_length for r in rows} - {plan["seq_len"]})
    longer = [r.label for r in rows if r.row_length != plan["seq_len"]]
    data = plan.get("data") or {}
    where = f"`{plan['store']}`"
    if data:
        where += (f", prepared from {', '.join(f'`{c}`' for c in data['corpus']) or 'an unnamed corpus'}: "
                  f"{data['documents']:,} documents, {data['tokens']:,} tokens, "
                  f"{data['val_documents']:,} documents held out; fingerprint {data['fingerprint'][:12]}")
    budget = (f"Every run reads {plan['budget_tokens']:,} corpus tokens from the same store "
              f"({where}), preset `{plan['preset']}` for each model family, seq_len "
              f"{plan['seq_len']}, {plan['batch_size'] * plan['grad_accum']} rows per step, peak "
              f"lr {plan['lr']:g}, seed {plan['seed']}. Tokens are counted as the packed rows the "
              "loader serves (`tokens` in each run's metrics.jsonl, padding at epoch ends included).")
    if longer:
        one = len(longer) == 1
        budget += (f" {', '.join(longer)} {'reads' if one else 'read'} longer rows "
                   f"({', '.join(map(str, row_lengths))} tokens) because {'its' if one else 'their'} "
                   "inputs shrink when spans collapse into sentinels, so "
                   f"{'it takes' if one else 'they take'} fewer steps for the same tokens.")
    add(("p", budget))
    if plan.get("skipped"):
        add(("p", "Not run: " + "; ".join(f"`{k}` — {v}" for k, v in plan["skipped"].items()) + "."))

    ranked = [c for c in columns if c.higher_is_better is not None]
    add(("h2", "Measured comparison"))
    head = ["objective", "architecture", "parameters", "steps", "tokens read", *[c.label for c in ranked]]
    body = []
    for r in rows:
        body.append([r.label, r.architecture.replace("_", "-"),
                     f"{r.parameters / 1e6:.2f} M" if r.parameters else "?", str(r.steps),
                     f"{r.tokens:,}", *[doc.cell(r.values.get(c.name), c.digits, r.reasons.get(c.name),
                                                   bool(r.extras.get(c.name, {}).get("bound")))
                                         for c in ranked]])
    add(("table", head, body))
    add(("p", "What each column compares:"))
    add(("ul", [f"**{c.label}** ({'higher' if c.higher_is_better else 'lower'} is better) — {c.compares}"
                for c in ranked]))

    add(("h2", "Own-objective losses (not comparable across rows)"))
    add(("p", "Each loss is the mean over the tokens its own objective scores — every next token "
              "(CLM, FIM), the suffix (prefix LM), masked positions only (MLM), sentinels and spans "
              "(span corruption, UL2) — so a lower number in one row does not mean a better model "
              "than another row. Read each row against its own curve."))
    own_head = ["objective", "signal fraction", *[c.label for c in OWN_COLUMNS]]
    own_body = [[r.label, fmt(r.values.get("signal_fraction"), 3),
                 *[doc.cell(r.values.get(c.name), c.digits, "no evaluation in eval.json")
                   for c in OWN_COLUMNS]] for r in rows]
    add(("table", own_head, own_body))
    add(("ul", [f"**{c.label}** — {c.compares}" for c in OWN_COLUMNS]))

    add(("h2", "Representation probe"))
    probe = plan.get("probe")
    if isinstance(probe, dict):
        docs = ", ".join(f"{k}: {v}" for k, v in probe["documents"].items())
        baselines = {round(r.extras.get("probe_accuracy", {}).get("baseline", -1), 6) for r in rows} - {-1}
        base = f" The majority-class baseline is {fmt(next(iter(baselines)), 3)}." if len(baselines) == 1 else ""
        add(("p", f"Task: {probe['task']}. Held-out documents used per class (the same number for each) — {docs}; "
                  f"{probe['train_windows']} training and {probe['test_windows']} test windows of up "
                  f"to {probe['window_tokens']} tokens, train and test from different documents. A "
                  "logistic regression reads each model's frozen, mean-pooled last hidden states "
                  "(an encoder-decoder's encoder)." + base))
        probe_rows = []
        for r in rows:
            got = r.values.get("probe_accuracy")
            init = r.extras.get("probe_accuracy", {}).get("at_init")
            gain = None if got is None or init is None else got - init
            probe_rows.append([r.label, fmt(got, 3), fmt(init, 3),
                               "n/a" if gain is None else f"{gain:+.3f}"])
        add(("table", ["objective", "probe accuracy", "same architecture, untrained", "gain from training"],
             probe_rows))
        n_test = probe["test_windows"]
        se = 0.5 / n_test ** 0.5  # the largest binomial standard error, at accuracy 0.5
        add(("p", "Mean pooling of even random features separates sources by their token "
                  "statistics, so the untrained column is the reference: the gain is what "
                  f"pre-training added. With {n_test} test windows one standard error of an "
                  f"accuracy is up to {se:.3f}; smaller differences are noise."))
    else:
        add(("p", f"No probe: {probe}."))

    add(("h2", "What each objective is good for"))
    for r in rows:
        add(("p", paragraph(r, rows, columns)))
    best = winners(rows, columns)
    if best:
        add(("p", "Best per column:"))
        add(("ul", best))

    add(("h2", "Plots"))
    add(("img", "loss_curves.png", "Training loss of every run against corpus tokens read"))
    add(("p", f"Each curve is the run's own loss (rolling mean over 1/{CURVE_POINTS} of its steps); "
              "compare shapes and convergence, not levels."))
    add(("img", "metrics.png", "Headline metrics per objective"))
    if doc.notes:
        add(("h2", "Notes"))
        add(("ol", doc.notes))
    return doc


_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<b>\1</b>"), (re.compile(r"`(.+?)`"), r"<code>\1</code>")]


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    for pat, rep in _INLINE:
        out = pat.sub(rep, out)
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(doc: Doc) -> str:
    lines: list[str] = []
    for block in doc.blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "code":
            lines += ["```bash", block[1], "```", ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "ol":
            lines += [f"{i}. {item}" for i, item in enumerate(block[1], 1)] + [""]
        elif kind == "table":
            head, body = block[1], block[2]
            lines.append("| " + " | ".join(map(_md_cell, head)) + " |")
            lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in body]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;line-height:1.45;color:#222}table{border-collapse:collapse;margin:1em 0;
font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em}td{text-align:right}td:first-child,
th:first-child{text-align:left}th{background:#f3f3f3}code,pre{background:#f6f6f6;border-radius:3px}
pre{padding:.6em;overflow-x:auto}img{max-width:100%}sup{color:#a33}"""


def _html_cell(text: str) -> str:
    m = re.fullmatch(r"n/a \[(\d+)\]", text)
    if m:
        return f'n/a<sup><a href="#note-{m.group(1)}">{m.group(1)}</a></sup>'
    return _inline_html(text)


def render_html(doc: Doc, images: dict[str, bytes]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>Pre-training objectives under an equal budget</title>",
             f"<style>{_CSS}</style></head><body>"]
    for block in doc.blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "code":
            parts.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "ol":
            parts.append("<ol>" + "".join(f'<li id="note-{n}">{_inline_html(i)}</li>'
                                          for n, i in enumerate(block[1], 1)) + "</ol>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in r) + "</tr>"
                           for r in block[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = images.get(block[1])
            if data is not None:
                b64 = base64.b64encode(data).decode()
                parts.append(f'<p><img alt="{html.escape(block[2])}" src="data:image/png;base64,{b64}"></p>')
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------ plots
def _smooth(ys: list[float]) -> list[float]:
    w = max(1, len(ys) // CURVE_POINTS)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot_loss_curves(rows: list[Row], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        xs, ys = r.curve
        if xs:
            ax.plot(xs, _smooth(list(ys)), lw=1.4, label=f"{r.label} ({r.architecture.replace('_', '-')})")
    ax.set_xlabel("corpus tokens read")
    ax.set_ylabel("own-objective training loss (nats / scored token)")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.yaxis,):  # plain numbers on the log axis, major and minor ticks
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.set_title("Training loss per objective (levels do not compare across objectives)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_metric_bars(rows: list[Row], columns: list[Column], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A column with a single value ranks nothing: it stays in the table, out of the charts.
    shown = [c for c in columns if c.higher_is_better is not None
             and sum(r.values.get(c.name) is not None for r in rows) >= 2]
    ncols = 2
    nrows = max(1, -(-len(shown) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(10, 3.2 * nrows), squeeze=False)
    labels = [r.label for r in rows]
    for ax, col in zip(axes.flat, shown):
        vals = [r.values.get(col.name) for r in rows]
        xs = range(len(rows))
        bars = ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None],
                      color="#4c72b0")
        ax.bar_label(bars, labels=[value_text(r, col.name, col.digits) for r in rows
                                   if r.values.get(col.name) is not None], fontsize=7,
                     padding=2)
        ax.margins(y=0.15)
        for x, v in zip(xs, vals):
            if v is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8, color="#888")
        if col.name == "probe_accuracy":
            base = [r.extras.get(col.name, {}).get("baseline") for r in rows]
            base = [b for b in base if b is not None]
            if base:
                ax.axhline(base[0], ls="--", color="#c44", lw=1, label="majority baseline")
            init = [(x, r.extras.get(col.name, {}).get("at_init")) for x, r in zip(xs, rows)]
            init = [(x, v) for x, v in init if v is not None]
            if init:
                ax.scatter([x for x, _ in init], [v for _, v in init], marker="_", s=400,
                           color="black", zorder=3, label="untrained")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{col.label} ({'higher' if col.higher_is_better else 'lower'} is better)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ entry
def write_report(out: str | Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``loss_curves.png``, ``metrics.png`` and ``report.html`` in ``out``."""
    out = Path(out)
    plan, rows, columns = load_comparison(out)
    doc = build_doc(plan, rows, columns)
    images = {}
    for name, draw in (("loss_curves.png", lambda p: plot_loss_curves(rows, p)),
                       ("metrics.png", lambda p: plot_metric_bars(rows, columns, p))):
        images[name] = draw(out / name).read_bytes()
    from lmobjectives.util import atomic_write_bytes

    md, page = out / "report.md", out / "report.html"
    atomic_write_bytes(md, render_markdown(doc).encode())
    atomic_write_bytes(page, render_html(doc, images).encode())
    return md, page
