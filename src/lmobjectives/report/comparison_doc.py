"""The sections of the ``lmobj compare`` report as a small block document (``Doc``), which
``comparison_render`` turns into Markdown and HTML. One function per section, in the order
they appear: header and budget, the ranked comparison, own-objective losses, the
representation probe, what each objective is good for, plots, notes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmobjectives.report.comparison_rows import (CURVE_POINTS, OWN_COLUMNS, Column, Row, fmt,
                                                 paragraph, winners)


@dataclass
class Doc:
    """A small block document rendered both as Markdown and as HTML."""

    blocks: list[tuple] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # footnote texts, numbered from 1

    def note(self, reason: str) -> int:
        if reason not in self.notes:
            self.notes.append(reason)
        return self.notes.index(reason) + 1

    def cell(self, value: float | None, digits: int, reason: str | None) -> str:
        if value is None:
            return f"n/a [{self.note(reason or 'not measured')}]"
        return fmt(value, digits)

    def add(self, *block: Any) -> None:
        self.blocks.append(tuple(block))


def build_doc(plan: dict[str, Any], rows: list[Row], columns: list[Column]) -> Doc:
    doc = Doc()
    _header(doc, plan, rows)
    _measured(doc, rows, columns)
    _own_losses(doc, rows)
    _probe(doc, plan.get("probe"), rows)
    _good_for(doc, rows, columns)
    _plots(doc)
    if doc.notes:
        doc.add("h2", "Notes")
        doc.add("ol", doc.notes)
    return doc


def _data_source(plan: dict[str, Any]) -> str:
    data = plan.get("data") or {}
    where = f"`{plan['store']}`"
    if data:
        where += (f", prepared from {', '.join(f'`{c}`' for c in data['corpus']) or 'an unnamed corpus'}: "
                  f"{data['documents']:,} documents, {data['tokens']:,} tokens, "
                  f"{data['val_documents']:,} documents held out; fingerprint {data['fingerprint'][:12]}")
    return where


def _header(doc: Doc, plan: dict[str, Any], rows: list[Row]) -> None:
    doc.add("h1", "Pre-training objectives under an equal budget")
    if plan.get("command"):
        doc.add("p", "Made by:")
        doc.add("code", plan["command"])
    row_lengths = sorted({r.row_length for r in rows} - {plan["seq_len"]})
    longer = [r.label for r in rows if r.row_length != plan["seq_len"]]
    budget = (f"Every run reads {plan['budget_tokens']:,} corpus tokens from the same store "
              f"({_data_source(plan)}), preset `{plan['preset']}` for each model family, seq_len "
              f"{plan['seq_len']}, {plan['batch_size'] * plan['grad_accum']} rows per step, peak "
              f"lr {plan['lr']:g}, seed {plan['seed']}. Tokens are counted as the packed rows the "
              "loader serves (`tokens` in each run's metrics.jsonl, padding at epoch ends included).")
    if longer:
        one = len(longer) == 1
        budget += (f" {', '.join(longer)} {'reads' if one else 'read'} longer rows "
                   f"({', '.join(map(str, row_lengths))} tokens) because {'its' if one else 'their'} "
                   "inputs shrink when spans collapse into sentinels, so "
                   f"{'it takes' if one else 'they take'} fewer steps for the same tokens.")
    doc.add("p", budget)
    if plan.get("skipped"):
        doc.add("p", "Not run: " + "; ".join(f"`{k}` — {v}" for k, v in plan["skipped"].items()) + ".")


def _measured(doc: Doc, rows: list[Row], columns: list[Column]) -> None:
    ranked = [c for c in columns if c.higher_is_better is not None]
    doc.add("h2", "Measured comparison")
    head = ["objective", "architecture", "parameters", "steps", "tokens read", *[c.label for c in ranked]]
    body = []
    for r in rows:
        body.append([r.label, r.architecture.replace("_", "-"),
                     f"{r.parameters / 1e6:.2f} M" if r.parameters else "?", str(r.steps),
                     f"{r.tokens:,}", *[doc.cell(r.values.get(c.name), c.digits, r.reasons.get(c.name))
                                         for c in ranked]])
    doc.add("table", head, body)
    doc.add("p", "What each column compares:")
    doc.add("ul", [f"**{c.label}** ({'higher' if c.higher_is_better else 'lower'} is better) — {c.compares}"
                   for c in ranked])


def _own_losses(doc: Doc, rows: list[Row]) -> None:
    doc.add("h2", "Own-objective losses (not comparable across rows)")
    doc.add("p", "Each loss is the mean over the tokens its own objective scores — every next token "
                 "(CLM, FIM), the suffix (prefix LM), masked positions only (MLM), sentinels and spans "
                 "(span corruption, UL2) — so a lower number in one row does not mean a better model "
                 "than another row. Read each row against its own curve.")
    own_head = ["objective", "signal fraction", *[c.label for c in OWN_COLUMNS]]
    own_body = [[r.label, fmt(r.values.get("signal_fraction"), 3),
                 *[doc.cell(r.values.get(c.name), c.digits, "no evaluation in eval.json")
                   for c in OWN_COLUMNS]] for r in rows]
    doc.add("table", own_head, own_body)
    doc.add("ul", [f"**{c.label}** — {c.compares}" for c in OWN_COLUMNS])


def _probe(doc: Doc, probe: Any, rows: list[Row]) -> None:
    doc.add("h2", "Representation probe")
    if not isinstance(probe, dict):
        doc.add("p", f"No probe: {probe}.")
        return
    docs = ", ".join(f"{k}: {v}" for k, v in probe["documents"].items())
    baselines = {round(r.extras.get("probe_accuracy", {}).get("baseline", -1), 6) for r in rows} - {-1}
    base = f" The majority-class baseline is {fmt(next(iter(baselines)), 3)}." if len(baselines) == 1 else ""
    doc.add("p", f"Task: {probe['task']}. Held-out documents used per class (the same number for each) — {docs}; "
                 f"{probe['train_windows']} training and {probe['test_windows']} test windows of up "
                 f"to {probe['window_tokens']} tokens, train and test from different documents. A "
                 "logistic regression reads each model's frozen, mean-pooled last hidden states "
                 "(an encoder-decoder's encoder)." + base)
    probe_rows = []
    for r in rows:
        got = r.values.get("probe_accuracy")
        init = r.extras.get("probe_accuracy", {}).get("at_init")
        gain = None if got is None or init is None else got - init
        probe_rows.append([r.label, fmt(got, 3), fmt(init, 3),
                           "n/a" if gain is None else f"{gain:+.3f}"])
    doc.add("table", ["objective", "probe accuracy", "same architecture, untrained", "gain from training"],
            probe_rows)
    n_test = probe["test_windows"]
    se = 0.5 / n_test ** 0.5  # the largest binomial standard error, at accuracy 0.5
    doc.add("p", "Mean pooling of even random features separates sources by their token "
                 "statistics, so the untrained column is the reference: the gain is what "
                 f"pre-training added. With {n_test} test windows one standard error of an "
                 f"accuracy is up to {se:.3f}; smaller differences are noise.")


def _good_for(doc: Doc, rows: list[Row], columns: list[Column]) -> None:
    doc.add("h2", "What each objective is good for")
    for r in rows:
        doc.add("p", paragraph(r, rows, columns))
    best = winners(rows, columns)
    if best:
        doc.add("p", "Best per column:")
        doc.add("ul", best)


def _plots(doc: Doc) -> None:
    doc.add("h2", "Plots")
    doc.add("img", "loss_curves.png", "Training loss of every run against corpus tokens read")
    doc.add("p", f"Each curve is the run's own loss (rolling mean over 1/{CURVE_POINTS} of its steps); "
                 "compare shapes and convergence, not levels.")
    doc.add("img", "metrics.png", "Headline metrics per objective")
