"""The sections of the ``lmobj compare`` report as a small block document (``Doc``), which
``comparison_render`` turns into Markdown and HTML. One function per section, in the order
they appear: header and budget, the ranked comparison, own-objective losses, the token
probes, the claims, what each objective is good for, plots, notes. Every number is a mean
over the seeds with its 95% interval (``report.stats``) where there are two seeds or more."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmobjectives.report.comparison_claim_checks import check_claims
from lmobjectives.report.stats import interval
from lmobjectives.report.comparison_rows import (CURVE_POINTS, OWN_COLUMNS, Column, Row, fmt,
                                                 paragraph, show, winners)


@dataclass
class Doc:
    """A small block document rendered both as Markdown and as HTML."""

    blocks: list[tuple] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # footnote texts, numbered from 1

    def note(self, reason: str) -> int:
        if reason not in self.notes:
            self.notes.append(reason)
        return self.notes.index(reason) + 1

    def cell(self, value: float | None, digits: int, reason: str | None,
             half: float | None = None, bound: bool = False) -> str:
        if value is None:
            return f"n/a [{self.note(reason or 'not measured')}]"
        text = ("≤ " if bound else "") + fmt(value, digits)  # a bound: a masked diffusion ELBO
        return text if half is None else f"{text} ± {fmt(half, digits)}"

    def add(self, *block: Any) -> None:
        self.blocks.append(tuple(block))


def build_doc(plan: dict[str, Any], rows: list[Row], columns: list[Column]) -> Doc:
    doc = Doc()
    _header(doc, plan, rows)
    _measured(doc, rows, columns)
    _own_losses(doc, rows)
    _probe(doc, plan.get("probe"), rows)
    _claims(doc, rows)
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
    seeds = plan.get("seeds") or [plan["seed"]]
    timed = plan.get("budget_rule") == "time"
    rule = (_time_rule(plan["time"]) + " Every run reads the same store" if timed else
            f"Budget rule: equal corpus tokens read. Every run reads {plan['budget_tokens']:,} corpus tokens from the same store")
    budget = (f"{rule} ({_data_source(plan)}), preset `{plan['preset']}` for each model family, seq_len "
              f"{plan['seq_len']}, {plan['batch_size'] * plan['grad_accum']} rows per step, peak "
              f"lr {plan['lr']:g}. Every objective runs once per seed ({len(seeds)} seeds: "
              f"{', '.join(map(str, seeds))}); a seed sets model initialisation, data order and "
              "objective randomness. Every number below is the mean over the seeds ± the half-width "
              "of its 95% Student-t interval; two runs differ *measurably* when Welch's 95% interval "
              "for the difference of their means excludes 0, and otherwise the report says \"no "
              "measurable difference\". Tokens are counted as the packed rows the loader serves "
              "(`tokens` in each run's metrics.jsonl, padding at epoch ends included).")
    if longer and not timed:
        one = len(longer) == 1
        budget += (f" {', '.join(longer)} {'reads' if one else 'read'} longer rows "
                   f"({', '.join(map(str, row_lengths))} tokens) because {'its' if one else 'their'} "
                   "inputs shrink when spans collapse into sentinels, so "
                   f"{'it takes' if one else 'they take'} fewer steps for the same tokens.")
    doc.add("p", budget)
    if timed:
        _time_table(doc, plan, rows)
    if plan.get("skipped"):
        doc.add("p", "Not run: " + "; ".join(f"`{k}` — {v}" for k, v in plan["skipped"].items()) + ".")


def _time_rule(t: dict[str, Any]) -> str:
    """The equal-wall-time rule in words, with the split of the budget (``compare.timing``)."""
    n = len(t["runs"])
    text = (f"Budget rule: equal wall time: {t['per_run_s']} s per run. `--time {t['time']}` is "
            f"the budget of the whole command: {t['setup_s']:.0f} s of setup (store, tokenizer, "
            f"measuring bench, and one measurement of an untrained model timed at "
            f"{t['measure_one_s']:.0f} s) had been spent when it was split, "
            f"{t['measure_reserve_s']:.0f} s ({t['measure_margin']:g} × that measurement per run) "
            f"were kept for measuring the runs, and the rest was split equally across the {n} "
            "runs (objectives × seeds). Each run is a timed "
            "run (`lmobj train --time`): its share counts from its own start, model setup and a "
            "step-time calibration of its own included, and it plans its steps to end inside it; "
            "the model size is the same for every objective (one preset, below), so an objective "
            "whose step costs more reads fewer tokens, listed per run below.")
    if t.get("measure_s") is not None:
        text += (f" Measuring took {t['measure_s']:.0f} s (reserved {t['measure_reserve_s']:.0f} s); "
                 f"the command had used {t['wall_s']:.0f} s of its {t['budget_s']:.0f} s when the "
                 "report was written.")
    return text


def _time_table(doc: Doc, plan: dict[str, Any], rows: list[Row]) -> None:
    """Per run: the training wall time it used and the steps and tokens it actually read."""
    trained = plan["time"].get("trained_s", {})
    body = []
    for r in rows:
        for s in r.seeds or [r]:
            key = f"{r.label} seed {s.seed}"
            took = trained.get(key)
            body.append([r.label, str(s.seed), "reused" if took is None else f"{took:.0f} s",
                         str(s.steps), f"{s.tokens:,}"])
    doc.add("table", ["objective", "seed", "training wall time", "steps", "tokens read"], body)


def _measured(doc: Doc, rows: list[Row], columns: list[Column]) -> None:
    ranked = [c for c in columns if c.higher_is_better is not None]
    doc.add("h2", "Measured comparison")
    head = ["objective", "architecture", "parameters", "steps", "tokens read", *[c.label for c in ranked]]
    body = []
    for r in rows:
        body.append([r.label, r.architecture.replace("_", "-"),
                     f"{r.parameters / 1e6:.2f} M" if r.parameters else "?", str(r.steps),
                     f"{r.tokens:,}", *[doc.cell(r.values.get(c.name), c.digits, r.reasons.get(c.name),
                                                 r.half(c.name),
                                                 bool(r.extras.get(c.name, {}).get("bound")))
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
    own_body = [[r.label, show(r, "signal_fraction", 3),
                 *[doc.cell(r.values.get(c.name), c.digits, "no evaluation in eval.json", r.half(c.name))
                   for c in OWN_COLUMNS]] for r in rows]
    doc.add("table", own_head, own_body)
    doc.add("ul", [f"**{c.label}** — {c.compares}" for c in OWN_COLUMNS])


def _probe(doc: Doc, probe: Any, rows: list[Row]) -> None:
    doc.add("h2", "Token probes: left and right context")
    if not isinstance(probe, dict) or probe.get("kind") != "token":
        doc.add("p", f"No token probes: {probe}.")
        return
    docs = ", ".join(f"{v} {k}" for k, v in probe["documents"].items())
    doc.add("p", "A linear classifier (class-weighted logistic regression) reads each model's frozen "
                 "last hidden state at one token (an encoder-decoder's encoder; a prefix LM with the "
                 "whole window as its prefix) and predicts a fact about the raw text computed offline "
                 "(Python's `tokenize` for code). *Left-context* facts are decided by the text before "
                 "the token, *right-context* facts by the text after it: a causal model at a token "
                 "has seen only the first. Score: balanced accuracy (mean recall over the two "
                 "classes; a majority-class guess scores 0.500) on test documents that no probe saw "
                 f"in training. Held-out documents: {docs}; windows of up to "
                 f"{probe['window_tokens']} tokens.")
    tasks = probe["tasks"]
    doc.add("table", ["task", "family", "documents", "is label 1 when", "train / test tokens", "label-1 share"],
            [[name, t["family"], t["kind"], t["says"],
              "skipped: " + t["skipped"] if "skipped" in t else f"{t['train_tokens']} / {t['test_tokens']}",
              fmt(t.get("positive_share"), 3)] for name, t in tasks.items()])
    body = []
    for r in rows:
        cells = [r.label]
        for fam in ("probe_left", "probe_right"):
            at_init = [s.extras.get(fam, {}).get("at_init") for s in (r.seeds or [r])]
            at_init = [a for a in at_init if a is not None]
            iv = interval(at_init) if at_init else None
            cells += [doc.cell(r.values.get(fam), 3, r.reasons.get(fam), r.half(fam)),
                      "n/a" if iv is None else fmt(iv.mean, 3) + ("" if iv.half is None else f" ± {fmt(iv.half, 3)}")]
        body.append(cells)
    doc.add("table", ["objective", "left-context", "left, untrained", "right-context", "right, untrained"], body)
    doc.add("p", "The untrained column is the same architecture at its initial weights (the run's "
                 "seed): what a probe reads from random features. Per-task scores are in each run's "
                 "`measure.json`.")


def _claims(doc: Doc, rows: list[Row]) -> None:
    doc.add("h2", "Claims")
    doc.add("p", "Each checkable claim of the objectives chapter's comparison table, the measurement "
                 "that tests it, the numbers (mean ± 95% interval over seeds; differences as mean "
                 "[95% Welch interval]) and a verdict: supported, not supported, or inconclusive at "
                 "this budget with what would decide it.")
    for i, c in enumerate(check_claims(rows), 1):
        doc.add("p", f"**{i}. {c.title}.** Verdict: **{c.verdict}**.")
        items = [f"Measurement: {c.measurement}.", *c.numbers]
        if c.decide:
            items.append(f"What would decide it: {c.decide}.")
        doc.add("ul", items)


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
