"""``lmobj compare --time``: the split of one wall-time budget across runs, a tiny timed
comparison, and claim 5 (UL2) when only the encoder-decoder UL2 was run."""

from __future__ import annotations

import json
import time

import pytest

from lmobjectives.compare import compare
from lmobjectives.compare.timing import MEASURE_MARGIN, split_budget
from lmobjectives.errors import UserError


def test_split_budget_is_equal_per_run_after_setup_and_reserve():
    plan = split_budget("10m", 600.0, 40.0, 20.0, ["clm seed 0", "clm seed 1", "mlm seed 0", "mlm seed 1"])
    assert plan["measure_reserve_s"] == pytest.approx(4 * MEASURE_MARGIN * 20)
    assert plan["per_run_s"] == int((600 - 40 - 4 * MEASURE_MARGIN * 20) // 4)
    with pytest.raises(UserError, match="too short for 4 runs"):
        split_budget("60s", 60.0, 10.0, 10.0, ["a", "b", "c", "d"])


@pytest.mark.parametrize("flags", [["--steps", "5"], ["--tokens", "1000"]])
def test_time_with_steps_or_tokens_is_one_error_line(tmp_path, monkeypatch, capsys, flags):
    from lmobjectives import cli

    monkeypatch.setattr("sys.argv", ["lmobj", "compare", "--time", "30m", *flags,
                                     "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pass --time or --steps/--tokens, not both")
    assert not (tmp_path / "o").exists()  # refused before any work


def test_tiny_timed_compare_gives_each_run_its_share(two_source_store, tmp_path):
    out = tmp_path / "cmp"
    budget_s = 60.0
    began = time.time()
    compare(["clm", "mlm"], store=two_source_store, out=out, preset="tiny", seq_len=32,
            batch_size=2, seeds=1, time_budget="60s", started_at=began, progress=False,
            say=lambda m: None)
    wall = time.time() - began
    plan = json.loads((out / "compare.json").read_text())
    t = plan["time"]
    assert plan["budget_rule"] == "time" and plan["budget_tokens"] is None
    assert t["runs"] == ["clm seed 0", "mlm seed 0"]
    assert t["measure_reserve_s"] == pytest.approx(2 * MEASURE_MARGIN * t["measure_one_s"], abs=0.2)
    want = (budget_s - t["setup_s"] - t["measure_reserve_s"]) / 2
    assert want - 1 <= t["per_run_s"] <= want + 1  # setup_s and the reserve are rounded
    for label, run in zip(t["runs"], plan["runs"]):
        cfg = (out / run["run_dir"] / "config.yaml").read_text()
        assert f"time: {t['per_run_s']}s" in cfg
        # A timed run ends within its share (the train --time contract: <= 10% past it).
        assert 0 < t["trained_s"][label] <= 1.1 * t["per_run_s"] + 1
    assert 0 < t["measure_s"] and wall < 1.25 * budget_s
    assert not (out / "pilot").exists()
    print(json.dumps(t), f"wall {wall:.1f}")
    md = (out / "report.md").read_text()
    assert f"Budget rule: equal wall time: {t['per_run_s']} s per run." in md
    assert "| objective | seed | training wall time | steps | tokens read |" in md
    for run in plan["runs"]:
        last = [json.loads(l) for l in (out / run["run_dir"] / "metrics.jsonl").read_text().splitlines()]
        tokens = [r for r in last if "loss" in r and not r.get("eval")][-1]["tokens"]
        assert tokens > 0 and f"| {run['label']} | 0 |" in md and f"{tokens:,} |" in md


def _row(label, objective, arch, **metrics):
    from lmobjectives.report.comparison_rows import Row

    return [Row(label, objective, arch, None, 10, 100, 32, "", seed=i,
                values={k: v[i] for k, v in metrics.items()}) for i in range(3)]


def test_ul2_claim_without_a_decoder_ul2_is_inconclusive_and_uses_one_when_there():
    from lmobjectives.report.comparison_claim_checks import claim_ul2
    from lmobjectives.report.comparison_claims import INCONCLUSIVE, SUPPORTED
    from lmobjectives.report.comparison_rows import aggregate

    clm = _row("clm", "clm", "decoder", bits_per_byte=[2.00, 2.01, 2.02], probe_right=[0.60, 0.61, 0.62])
    mlm = _row("mlm", "mlm", "encoder", probe_right=[0.800, 0.801, 0.802])
    encdec = _row("ul2", "ul2", "encoder_decoder", probe_right=[0.60, 0.61, 0.62])  # far behind mlm
    dec = _row("ul2@prefix_lm", "ul2", "prefix_lm", bits_per_byte=[2.00, 2.01, 2.02],
               probe_right=[0.800, 0.801, 0.802])
    got = claim_ul2(aggregate(clm + mlm + encdec))
    assert got.verdict == INCONCLUSIVE and "add ul2@prefix_lm" in got.decide
    assert any("n/a for ul2" in n for n in got.numbers)
    got = claim_ul2(aggregate(clm + mlm + encdec + dec))
    assert got.verdict == SUPPORTED
    assert any("ul2@prefix_lm" in n and "UL2 − CLM" in n for n in got.numbers)
