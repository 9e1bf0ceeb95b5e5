"""``lmobj compare``: equal-budget runs, measurements, the report's structure, reuse."""

from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import pytest

from lmobjectives.compare import compare
from lmobjectives.compare.probe import fit_logistic
from lmobjectives.errors import UserError
from lmobjectives.report.comparison_rows import Column, Row, paragraph

OBJECTIVES = ["clm", "mlm", "span", "diffusion"]  # the last is registered nowhere
FAST = dict(preset="tiny", seq_len=32, batch_size=2, steps=10, seeds=2,
            sets=["train.checkpoint_every=5"], progress=False, say=lambda m: None)
SEEDS = (0, 1)


def table_rows(md: str, heading: str) -> list[list[str]]:
    part = md.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    table = next(b for b in part.split("\n\n") if b.startswith("|"))
    lines = table.splitlines()
    return [[c.strip() for c in l.strip("|").split(" | ")] for l in lines]


def test_compare_end_to_end_and_reuse(two_source_store, tmp_path):
    out = tmp_path / "cmp"
    t0 = time.perf_counter()
    res = compare(OBJECTIVES, store=two_source_store, out=out, **FAST)
    first = time.perf_counter() - t0
    assert set(res.runs) == {f"{o} seed {s}" for o in ("clm", "mlm", "span") for s in SEEDS}
    assert set(res.runs.values()) == {"trained"}
    assert "diffusion" in res.skipped and "not registered" in res.skipped["diffusion"]

    md = (out / "report.md").read_text()
    for h in ("Measured comparison", "Own-objective losses", "Token probes: left and right context",
              "Claims", "What each objective is good for", "Plots"):
        assert f"## {h}" in md
    rows = table_rows(md, "Measured comparison")
    head, body = rows[0], rows[2:]
    assert [r[0] for r in body] == ["clm", "mlm", "span"]  # one row per objective run
    cell = {(r[0], h): v for r in body for h, v in zip(head, r)}
    num = r"\d+\.\d{3} ± \d+\.\d{3}"  # mean ± 95% interval over the two seeds
    assert re.fullmatch(num, cell[("clm", "held-out bits/byte")])
    assert re.fullmatch(num, cell[("span", "right-context probes")])
    assert cell[("mlm", "held-out bits/byte")].startswith("n/a [")
    assert cell[("span", "held-out bits/byte")].startswith("n/a [")
    assert re.fullmatch(num, cell[("mlm", "masked-token acc.")])
    assert cell[("clm", "masked-token acc.")].startswith("n/a [")
    assert all(cell[(o, "speculative speedup")].startswith("n/a [") for o in ("clm", "mlm", "span"))
    notes = md.split("## Notes", 1)[1]
    assert "cannot score text left to right" in notes and "no draft heads" in notes
    # Raw losses sit in their own, unranked table.
    assert "final train loss" not in head and "final train loss" in table_rows(md, "Own-objective losses")[0]

    plan = json.loads((out / "compare.json").read_text())
    assert plan["seeds"] == list(SEEDS) and plan["budget_rule"] == "tokens"
    runs = {r["label"]: r for r in plan["runs"]}
    assert runs["span"]["row_length"] > 32 and runs["span"]["steps"] < runs["clm"]["steps"]
    for label in ("clm", "mlm", "span"):  # equal tokens read, within one step's worth
        run = out / "runs" / label / "seed-1"
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        tokens = [m["tokens"] for m in metrics if not m.get("eval")][-1]
        assert abs(tokens - plan["budget_tokens"]) <= 2 * runs[label]["row_length"] / 2  # half a step
        m = json.loads((run / "measure.json").read_text())["metrics"]
        for fam in ("probe_left", "probe_right"):
            got = m[fam]
            assert 0.0 <= got["value"] <= 1.0 and 0.0 <= got["at_init"] <= 1.0 and got["baseline"] == 0.5
            assert got["tasks"]  # per-task balanced accuracies
    assert plan["probe"]["kind"] == "token" and set(plan["probe"]["documents"]) == {"code", "prose"}
    claims = md.split("## Claims", 1)[1].split("\n## ", 1)[0]
    assert len(re.findall(r"^\*\*\d\. .+\*\* Verdict: \*\*(supported|not supported|inconclusive at this budget)\*\*",
                          claims, re.M)) == 5
    assert "needs a FIM run" not in claims and "a CLM and a FIM run" in claims  # no FIM run here
    signal = {r[0]: float(r[1].split(" ± ")[0]) for r in table_rows(md, "Own-objective losses")[2:]}
    assert signal["clm"] > 0.8 and 0.08 < signal["mlm"] < 0.25

    for label in ("clm", "mlm", "span"):  # one generated paragraph per objective
        assert re.search(rf"^\*\*{label}\*\* \(.+ steps, 2 seeds\): (best|measurably|no measurable|the only)",
                         md, re.M)

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)=["']?(https?:|//|[^"'#d])""", page)  # nothing external
    assert "<table>" in page and "<sup>" in page

    # Same command again: every run and every measurement is reused.
    stamp = (out / "runs" / "clm" / "seed-0" / "measure.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = compare(OBJECTIVES, store=two_source_store, out=out, **FAST)
    assert set(again.runs.values()) == {"reused"}
    assert time.perf_counter() - t0 < first / 3
    assert (out / "runs" / "clm" / "seed-0" / "measure.json").stat().st_mtime_ns == stamp

    # A run cut short is resumed from its newest checkpoint, the others reused.
    shutil.rmtree(out / "runs" / "clm" / "seed-1" / "final")
    shutil.rmtree(out / "runs" / "clm" / "seed-1" / "checkpoints" / "step-0000010")
    again = compare(OBJECTIVES, store=two_source_store, out=out, **FAST)
    assert again.runs.pop("clm seed 1") == "resumed from step-0000005"
    assert set(again.runs.values()) == {"reused"}

    # A different shared config does not silently reuse or destroy the runs.
    with pytest.raises(UserError, match="--overwrite"):
        compare(["clm"], store=two_source_store, out=out, **{**FAST, "sets": ["train.lr=1e-3"]})


def test_logistic_probe_separates_separable_classes():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, (40, 3)), rng.normal(2, 1, (40, 3))])
    y = np.repeat([0, 1], 40)
    model = fit_logistic(x, y, 2)
    assert (model.predict(x) == y).mean() > 0.95
    assert model.predict(np.array([[-5.0, -5, -5], [5.0, 5, 5]])).tolist() == [0, 1]


def test_paragraph_calls_only_measurable_differences():
    from lmobjectives.report.comparison_rows import aggregate

    cols = [Column("bits_per_byte", "bpb", "", False, 3), Column("probe_right", "probe", "", True, 3),
            Column("final_train_loss", "loss", "", None, 3)]
    vals = {"clm": [(1.90, 0.60, 3.0), (1.91, 0.61, 3.1), (1.92, 0.62, 3.2)],
            "fim": [(2.10, 0.50, 1.0), (2.11, 0.80, 1.1), (2.12, 0.65, 1.2)],
            "mlm": [(None, 0.70, 2.0), (None, 0.71, 2.1), (None, 0.72, 2.2)]}
    runs = [Row(k, k, "decoder", None, 10, 100, 32, "", seed=i,
                values={"bits_per_byte": b, "probe_right": p, "final_train_loss": l})
            for k, seeds in vals.items() for i, (b, p, l) in enumerate(seeds)]
    rows = aggregate(runs)
    assert [r.label for r in rows] == ["clm", "fim", "mlm"] and rows[0].samples["bits_per_byte"] == [1.9, 1.91, 1.92]
    clm, fim, mlm = (paragraph(r, rows, cols) for r in rows)
    assert "3 seeds" in clm and "best (no run measurably better) at bpb (1.910 ± 0.025; 1st of 2)" in clm
    assert "measurably behind the best at probe (0.610 ± 0.025; behind mlm)" in clm
    assert "measurably behind the best at bpb (2.110 ± 0.025; behind clm)" in fim
    # fim's probe spreads widely: it is not measurably behind mlm, so it stands with the best
    assert "best (no run measurably better) at probe (0.650" in fim
    assert "loss" not in clm.replace("clm", "")  # unranked losses never enter the comparison
    one = aggregate([Row("a", "a", "decoder", None, 1, 1, 1, "", values={"bits_per_byte": 1.0}),
                     Row("b", "b", "decoder", None, 1, 1, 1, "", values={"bits_per_byte": 2.0})])
    assert "no measurable difference between runs at bpb (1.000)" in paragraph(one[0], one, cols)


def test_cli_user_error_is_one_line(tmp_path, monkeypatch, capsys):
    from lmobjectives import cli

    monkeypatch.setattr("sys.argv", ["lmobj", "compare", "--corpus", "default", "--data", str(tmp_path),
                                     "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: pass --corpus or --data, not both"]


def test_token_probe_data_on_a_two_kind_store(two_source_store):
    from lmobjectives.compare.token_probe import build_token_probe
    from lmobjectives.store.store import TokenStore
    from lmobjectives.tokenizer import load_tokenizer

    data = build_token_probe(TokenStore(two_source_store), load_tokenizer(None), 32, pad=1)
    assert not isinstance(data, str), data
    assert data.documents["code"] > 0 and data.documents["prose"] > 0
    for name, d in data.tasks.items():
        assert d["test"].any() and (~d["test"]).any()
        # train and test positions come from different windows, hence different documents
        assert not set(d["window"][d["test"]]) & set(d["window"][~d["test"]])
        assert set(np.unique(d["label"])) == {0, 1}
    assert {"code_called", "prose_sent_end"} <= set(data.tasks)
