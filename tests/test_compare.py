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
FAST = dict(preset="tiny", seq_len=32, batch_size=2, steps=10, sets=["train.checkpoint_every=5"],
            progress=False, say=lambda m: None)


@pytest.fixture(scope="module")
def two_source_store(tmp_path_factory) -> str:
    """A store from two corpus directories (code, prose): the probe's two classes."""
    from lmobjectives.corpus import iter_documents
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("two")
    for part in ("code", "prose"):
        (root / part).mkdir()
        for i, doc in enumerate(iter_documents([f"default:{part}"])):
            if i % 4 == 0 and i < 160:
                (root / part / f"{i:04d}.txt").write_text(doc.text[:3000])
    out = root / "store"
    prepare_store([str(root / "code"), str(root / "prose")], load_tokenizer(None), out,
                  val_fraction=0.4, progress=False)
    return str(out)


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
    assert set(res.runs) == {"clm", "mlm", "span"} and set(res.runs.values()) == {"trained"}
    assert "diffusion" in res.skipped and "not registered" in res.skipped["diffusion"]

    md = (out / "report.md").read_text()
    for h in ("Measured comparison", "Own-objective losses", "Representation probe",
              "What each objective is good for", "Plots"):
        assert f"## {h}" in md
    rows = table_rows(md, "Measured comparison")
    head, body = rows[0], rows[2:]
    assert [r[0] for r in body] == ["clm", "mlm", "span"]  # one row per objective run
    cell = {(r[0], h): v for r in body for h, v in zip(head, r)}
    assert re.fullmatch(r"\d+\.\d{3}", cell[("clm", "held-out bits/byte")])
    assert cell[("mlm", "held-out bits/byte")].startswith("n/a [")
    assert cell[("span", "held-out bits/byte")].startswith("n/a [")
    assert re.fullmatch(r"\d\.\d{3}", cell[("mlm", "masked-token acc.")])
    assert cell[("clm", "masked-token acc.")].startswith("n/a [")
    assert all(cell[(o, "speculative speedup")].startswith("n/a [") for o in ("clm", "mlm", "span"))
    notes = md.split("## Notes", 1)[1]
    assert "cannot score text left to right" in notes and "no draft heads" in notes
    # Raw losses sit in their own, unranked table.
    assert "final train loss" not in head and "final train loss" in table_rows(md, "Own-objective losses")[0]

    plan = json.loads((out / "compare.json").read_text())
    runs = {r["label"]: r for r in plan["runs"]}
    assert runs["span"]["row_length"] > 32 and runs["span"]["steps"] < runs["clm"]["steps"]
    for label in ("clm", "mlm", "span"):  # equal tokens read, within one step's worth
        metrics = [json.loads(l) for l in (out / "runs" / label / "metrics.jsonl").read_text().splitlines()]
        tokens = [m["tokens"] for m in metrics if not m.get("eval")][-1]
        assert abs(tokens - plan["budget_tokens"]) <= 2 * runs[label]["row_length"] / 2  # half a step
        m = json.loads((out / "runs" / label / "measure.json").read_text())["metrics"]
        acc = m["probe_accuracy"]
        assert 0.0 <= acc["value"] <= 1.0 and 0.0 <= acc["baseline"] <= 1.0 and acc["n_test"] > 0
        assert 0.0 <= acc["at_init"] <= 1.0
    assert plan["probe"]["classes"] == ["code", "prose"]
    signal = {r[0]: float(r[1]) for r in table_rows(md, "Own-objective losses")[2:]}
    assert signal["clm"] > 0.8 and 0.08 < signal["mlm"] < 0.25

    for label in ("clm", "mlm", "span"):  # one generated paragraph per objective
        assert re.search(rf"^\*\*{label}\*\* \(.+ steps\): (best|worst|in between|the only)", md, re.M)

    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r"""(src|href)=["']?(https?:|//|[^"'#d])""", page)  # nothing external
    assert "<table>" in page and "<sup>" in page

    # Same command again: every run and every measurement is reused.
    stamp = (out / "runs" / "clm" / "measure.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = compare(OBJECTIVES, store=two_source_store, out=out, **FAST)
    assert set(again.runs.values()) == {"reused"}
    assert time.perf_counter() - t0 < first / 3
    assert (out / "runs" / "clm" / "measure.json").stat().st_mtime_ns == stamp

    # A run cut short is resumed from its newest checkpoint, the others reused.
    shutil.rmtree(out / "runs" / "clm" / "final")
    shutil.rmtree(out / "runs" / "clm" / "checkpoints" / "step-0000010")
    again = compare(OBJECTIVES, store=two_source_store, out=out, **FAST)
    assert again.runs == {"clm": "resumed from step-0000005", "mlm": "reused", "span": "reused"}

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


def test_paragraph_ranks_from_numbers():
    cols = [Column("bits_per_byte", "bpb", "", False, 3), Column("probe_accuracy", "probe", "", True, 3),
            Column("final_train_loss", "loss", "", None, 3)]
    rows = [Row("clm", "clm", "decoder", None, 10, 100, 32, "", values={"bits_per_byte": 1.9,
                "probe_accuracy": 0.6, "final_train_loss": 3.0}),
            Row("fim", "fim", "decoder", None, 10, 100, 32, "", values={"bits_per_byte": 2.1,
                "probe_accuracy": 0.8, "final_train_loss": 1.0}),
            Row("mlm", "mlm", "encoder", None, 10, 100, 32, "", values={"bits_per_byte": None,
                "probe_accuracy": 0.7, "final_train_loss": 2.0})]
    p = paragraph(rows[0], rows, cols)
    assert "best at bpb (1.900; 1st of 2)" in p and "worst at probe (0.600; 3rd of 3)" in p
    assert "loss" not in p.replace("clm", "")  # unranked losses never enter the comparison
    assert "in between at probe (0.700; 2nd of 3)" in paragraph(rows[2], rows, cols)


def test_cli_user_error_is_one_line(tmp_path, monkeypatch, capsys):
    from lmobjectives import cli

    monkeypatch.setattr("sys.argv", ["lmobj", "compare", "--corpus", "default", "--data", str(tmp_path),
                                     "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: pass --corpus or --data, not both"]


def test_probe_labels_from_subdirectories_or_says_why_not(tmp_path):
    from lmobjectives.compare.probe import build_probe_data
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    root = tmp_path / "c"
    for sub, word in (("law", "contract clause party"), ("med", "patient dose symptom")):
        (root / sub).mkdir(parents=True)
        for i in range(12):
            (root / sub / f"{i}.txt").write_text(f"{word} {i} " * (5 + i))
    store = prepare_store([str(root)], tok, tmp_path / "s", val_fraction=0.5, progress=False)
    data = build_probe_data(store, tok, 16, pad=1)
    assert not isinstance(data, str), data
    assert data.classes == ("law", "med")
    assert data.documents["law"] == data.documents["med"] >= 2  # as many documents per class
    assert data.is_test.any() and (~data.is_test).any()

    flat = prepare_store([str(root / "law")], tok, tmp_path / "f", val_fraction=0.5, progress=False)
    reason = build_probe_data(flat, tok, 16, pad=1)
    assert isinstance(reason, str) and "at least two sources" in reason
