"""Timed runs end to end: the budget is kept, the model is sized, the plan survives a resume,
every objective calibrates, and the command line refuses what it cannot do."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from lmobjectives.config import build_config
from lmobjectives.models.sizing import SHAPES
from lmobjectives.objectives import OBJECTIVES
from lmobjectives.train.job import train
from test_cli import assert_user_error, run as lmobj


def timed_tree(store: str, out: str, time_: str, **model) -> dict:
    return {"objective": "clm", "model": model, "data": {"store": store},
            "train": {"time": time_, "eval_every": 0, "checkpoint_every": 10, "eval_batches": 2},
            "out": out}


def states(run_dir: Path) -> list[dict]:
    return [json.loads((c / "state.json").read_text())
            for c in sorted((run_dir / "checkpoints").iterdir())]


def test_timed_run_keeps_its_budget_and_resumes_its_plan(small_store, tmp_path):
    tree = timed_tree(small_store, str(tmp_path / "r"), "30s", preset="tiny")
    tree["data"]["seq_len"] = 32
    tree["train"]["batch_size"] = 2
    began = time.time()
    res = train(build_config(tree), progress=False, started_at=began)
    wall = time.time() - began
    # Never more than 10% past; the lower bound allows for a loaded machine's jitter.
    assert 0.80 * 30 <= wall <= 1.10 * 30, wall
    info = json.loads((res.run_dir / "run.json").read_text())["budget"]
    assert info["time"] == "30s" and info["calibration"]["candidates"][0]["shape"] == "tiny"
    assert "steps" not in yaml.safe_load((res.run_dir / "config.yaml").read_text())["train"]
    last = states(res.run_dir)[-1]
    plan = last["plan"]
    assert plan["total"] == last["step"] == res.final["step"] and plan["decay_start"] is not None
    lrs = [json.loads(l)["lr"] for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()
           if "lr" in json.loads(l)]
    assert lrs[-1] == pytest.approx(0.1 * 3e-3)  # the WSD decay reached its floor at the end

    # Kill after the first checkpoint: the resumed run continues that plan with what is left.
    ckpts = sorted((res.run_dir / "checkpoints").iterdir())
    for c in ckpts[1:]:
        shutil.rmtree(c)
    shutil.rmtree(res.run_dir / "final")
    first = json.loads((ckpts[0] / "state.json").read_text())["plan"]
    began = time.time()
    again = train(build_config(yaml.safe_load((res.run_dir / "config.yaml").read_text())),
                  resume=res.run_dir, progress=False, started_at=began)
    wall = time.time() - began
    assert again.started == f"resumed from {ckpts[0].name}"
    assert wall <= 1.10 * 30 - first["spent_s"] + 1.0, (wall, first["spent_s"])
    assert states(res.run_dir)[-1]["plan"]["warmup"] == first["warmup"]
    assert (res.run_dir / "final" / "config.json").is_file()


def test_timed_run_without_preset_sizes_the_model(small_store, tmp_path):
    res = train(build_config(timed_tree(small_store, str(tmp_path / "r"), "30s")), progress=False)
    cal = json.loads((res.run_dir / "run.json").read_text())["budget"]["calibration"]
    assert cal["chosen"] in SHAPES and cal["candidates"][0]["shape"] == "d64-l2"
    assert all(c["tokens_per_second"] > 0 and c["planned_tokens"] > 0 for c in cal["candidates"])
    cfg = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    shape = SHAPES[cal["chosen"]]
    assert (cfg["model"]["preset"], cfg["data"]["seq_len"], cfg["train"]["lr"]) == \
        (shape.name, shape.seq_len, shape.lr)
    assert res.eval and res.final["step"] > 0


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_calibrates(objective, small_store, tmp_path):
    from lmobjectives.train.calibrate import calibrate

    cfg = build_config({"objective": objective, "data": {"store": small_store},
                        "train": {"time": "5m"}, "out": str(tmp_path)})
    sized, record = calibrate(cfg, tmp_path, lambda: 10.0)  # a box of 0.5 s: the first shape
    assert record["chosen"] == sized.model.preset and sized.model.preset in SHAPES
    assert record["candidates"][0]["tokens_per_second"] > 0


def test_time_and_steps_or_too_short(small_store, tmp_path):
    p = lmobj("train", "--time", "5m", "--steps", "3", "--out", str(tmp_path / "a"))
    assert p.returncode == 2
    assert_user_error(p, "--steps or --time")
    p = lmobj("train", "--time", "1s", "--preset", "tiny", "--data", small_store,
              "--out", str(tmp_path / "b"))
    assert p.returncode == 2
    assert_user_error(p, "too short", "give at least")
    p = lmobj("train", "--time", "5 minutes", "--out", str(tmp_path / "c"))
    assert_user_error(p, "--time")


def test_a_kill_while_calibrating_restarts_the_calibration(tmp_path):
    """SIGKILL while a timed run without a preset calibrates (``config.yaml`` written, nothing
    trained): ``--resume`` calibrates again, its budget counted from the resume, and sizes
    the model as the start would have; once sized, ``--resume-if-exists`` with the command
    that started it still finds it (by the config it was given). Never a traceback."""
    import os
    import signal

    import runs_util as ru

    store = ru.make_store(tmp_path, n_docs=40, words=300)

    def kill_in_calibration() -> None:
        import lmobjectives.train.calibrate as cal

        def measure(*a, **kw):  # noqa: ANN002,ANN003,ANN202
            os.kill(os.getpid(), signal.SIGKILL)

        cal.measure = measure

    out = tmp_path / "run"
    args = ["train", "--time", "30s", "--data", str(store), "--out", str(out), "--json",
            "--set", "train.eval_batches=1", "--set", "model.precision=fp32"]
    p = ru.start_child(args, tmp_path / "killed.log", kill_in_calibration)
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    assert sorted(q.name for q in out.iterdir()) == ["config.yaml", "writer.lock"]
    done = lmobj("train", "--resume", str(out), "--json")  # a new process: its own budget
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "calibrating again" in done.stderr
    assert "resumed (no checkpoint yet: from step 0)" in done.stderr
    cal = json.loads((out / "run.json").read_text())["budget"]["calibration"]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["preset"] == cal["chosen"]
    assert cal["chosen"] in SHAPES and (out / "final" / "model.safetensors").is_file()
    done = lmobj(*args, "--resume-if-exists")
    assert done.returncode == 0 and "resumed from step-" in done.stderr, done.stderr[-2000:]
    assert "calibrating again" not in done.stderr and "calibration (" not in done.stderr
