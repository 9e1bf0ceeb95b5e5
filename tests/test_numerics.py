"""Training guards: a NaN loss or gradient leaves the weights (and optimizer state) exactly
as they were and is logged with its step; a 10× loss spike triggers the configured action;
a run of non-finite steps stops the run with a message naming the step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import runs_util as ru
from lmobjectives.config import build_config
from lmobjectives.errors import UserError
from lmobjectives.train.loop import Trainer
from lmobjectives.runtime import seed_everything
from lmobjectives.train.setup import open_run


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return ru.make_store(tmp_path_factory.mktemp("num"), n_docs=12, words=40)


def make_trainer(store: Path, out: Path, steps: int, **train) -> Trainer:
    cfg = build_config({"objective": "clm", "model": {"preset": "tiny", "precision": "fp32"},
                        "data": {"store": str(store), "seq_len": 32},
                        "train": {"steps": steps, "batch_size": 2, "checkpoint_every": 0,
                                  "eval_every": 0, **train},
                        "out": str(out)})
    seed_everything(cfg.train.seed)
    return Trainer(open_run(cfg, out, progress=False), progress=False)


def snapshot(tr: Trainer) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    params = {k: v.detach().clone() for k, v in tr.run.model.state_dict().items()}
    moments = [t.clone() for s in tr.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return params, moments


def same(a, b) -> bool:  # noqa: ANN001
    pa, ma = a
    pb, mb = b
    return all(torch.equal(pa[k], pb[k]) for k in pa) and len(ma) == len(mb) and \
        all(torch.equal(x, y) for x, y in zip(ma, mb))


def logged(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_nan_loss_skips_the_update_and_is_logged(store, tmp_path):
    tr = make_trainer(store, tmp_path / "run", 6)
    real = tr.run.model_with_loss.logits
    for step in range(1, 7):
        before = snapshot(tr)
        if step == 4:  # the forward returns NaN logits once
            tr.run.model_with_loss.logits = lambda batch: real(batch) * float("nan")
        rec = tr.train_step()
        tr.log(rec)
        tr.run.model_with_loss.logits = real
        if step == 4:
            assert rec["skipped"] == "non-finite" and rec["step"] == 4
            assert same(before, snapshot(tr))  # weights and Adam moments untouched
        else:
            assert "skipped" not in rec and not same(before, snapshot(tr))
    assert [r["step"] for r in logged(tmp_path / "run") if r.get("skipped") == "non-finite"] == [4]


def test_nan_gradient_skips_the_update(store, tmp_path):
    tr = make_trainer(store, tmp_path / "run", 4)
    real = tr.run.model_with_loss.forward_backward

    def poisoned(batch, totals, backward=True):  # noqa: ANN001
        out = real(batch, totals, backward)
        next(tr.run.model.parameters()).grad[0, 0] = float("inf")  # loss itself stays finite
        return out

    tr.train_step()
    before = snapshot(tr)
    tr.run.model_with_loss.forward_backward = poisoned
    rec = tr.train_step()
    assert rec["skipped"] == "non-finite" and rec["step"] == 2
    assert rec["loss"] == rec["loss"]  # finite loss: only the gradient was bad
    assert same(before, snapshot(tr))
    tr.run.model_with_loss.forward_backward = real
    assert "skipped" not in tr.train_step()


def test_non_finite_steps_in_a_row_stop_the_run(store, tmp_path):
    tr = make_trainer(store, tmp_path / "run", 10, max_bad_steps=3)
    real = tr.run.model_with_loss.logits
    tr.run.model_with_loss.logits = lambda batch: real(batch) * float("nan")
    with pytest.raises(UserError, match=r"non-finite loss or gradient 3 steps in a row \(last at step 3\)"):
        tr.fit()


@pytest.mark.parametrize("action", ["skip", "log"])
def test_ten_times_loss_spike_triggers_the_action(store, tmp_path, monkeypatch, action):
    import lmobjectives.step.standard as module

    tr = make_trainer(store, tmp_path / "run", 14, spike_action=action, spike_window=20)
    real = module.token_nll_sum
    spike_at = 13  # after 12 normal steps fill the window past its minimum of 10

    def nll_sum(*a, **kw):  # noqa: ANN002,ANN003
        nll, correct = real(*a, **kw)
        return (nll * 10 if tr.step + 1 == spike_at else nll), correct

    monkeypatch.setattr(module, "token_nll_sum", nll_sum)
    for step in range(1, 15):
        before = snapshot(tr)
        rec = tr.train_step()
        if step != spike_at:
            assert "spike" not in rec and "skipped" not in rec
            continue
        assert rec["spike"] > tr.cfg.train.spike_zscore
        if action == "skip":
            assert rec["skipped"] == "spike" and same(before, snapshot(tr))
            assert rec["loss"] not in tr.guard.recent  # the outlier does not shift the baseline
        else:
            assert "skipped" not in rec and not same(before, snapshot(tr))
