"""Time budgets: durations, the step plan against a fake clock, sizing, config rules."""

from __future__ import annotations

import pytest

from lmobjectives.config import build_config, config_to_yaml, default_budget
from lmobjectives.errors import UserError
from lmobjectives.models.sizing import SHAPES, choose_shape, predicted_loss
from lmobjectives.train.budget import StepPlan, parse_duration


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400),
                                           ("1h30m", 5400), ("1.5m", 90), (" 20S ", 20)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "m5", "0s", "-5m", "5m-", "1h 30"])
def test_bad_durations(text):
    with pytest.raises(UserError, match="--time"):
        parse_duration(text)


def plan(clock: FakeClock, budget: float = 240, step_s: float = 0.4, spent: float = 20) -> StepPlan:
    return StepPlan(budget_s=budget, deadline=clock() + budget - spent, step_s=step_s, eval_s=2.0,
                    save_s=0.5, schedule="wsd", warmup_fraction=0.05, decay_fraction=0.2, clock=clock)


def simulate(p: StepPlan, clock: FakeClock, seconds_of_step, eval_every=100, ckpt_every=100):
    """Run the loop's protocol on a fake clock; returns the lrs and the end time (reserve spent)."""
    step, lrs = 0, []
    p.start(step, eval_every, ckpt_every)
    while step < p.total:
        lrs.append(p.lr(step, 1e-2, 0.1))
        dt = seconds_of_step(step)
        clock.t += dt
        step += 1
        p.observe_step(dt)
        p.replan(step, eval_every, ckpt_every)
        if step % eval_every == 0 and step < p.total:
            clock.t += 2.0
            p.observe_eval(2.0)
            p.replan(step, eval_every, ckpt_every)
        if step % ckpt_every == 0 and step < p.total:
            clock.t += 0.5
            p.observe_save(0.5)
            p.replan(step, eval_every, ckpt_every)
    clock.t += 2.0 + 0.5 + 0.5  # final eval, checkpoint, export
    return lrs, clock.t


def test_plan_ends_at_the_deadline_with_a_wsd_decay():
    clock = FakeClock()
    p = plan(clock)
    deadline = p.deadline
    lrs, end = simulate(p, clock, lambda s: 0.4)
    assert deadline - 0.05 * 240 <= end <= deadline
    assert 450 < len(lrs) < 560  # the docstring's worked example: ~510 steps
    assert p.warmup == pytest.approx(0.05 * len(lrs), abs=2)  # fixed from the first plan
    assert lrs[0] < lrs[p.warmup] == 1e-2
    decay = lrs[p.decay_start:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # monotone decay
    assert decay[-1] == pytest.approx(1e-3)  # ends at min_lr_ratio x peak
    assert 0.15 <= len(decay) / len(lrs) <= 0.25  # its share of the run


def test_plan_adapts_when_the_machine_slows_down():
    clock = FakeClock()
    p = plan(clock)
    deadline = p.deadline
    lrs, end = simulate(p, clock, lambda s: 0.4 if s < 200 else 0.9)  # 2.25x slower midway
    assert deadline - 0.05 * 240 <= end <= deadline + 0.01 * 240
    clock2 = FakeClock()
    p2 = plan(clock2)
    lrs2, end2 = simulate(p2, clock2, lambda s: 0.4 if s < 200 else 0.2)  # faster
    assert len(lrs2) > len(lrs)
    assert p2.deadline - 0.05 * 240 <= end2 <= p2.deadline


def test_budget_too_short_for_one_step():
    clock = FakeClock()
    p = plan(clock, budget=10, step_s=4.0, spent=7)
    with pytest.raises(UserError, match="too short.*give at least"):
        p.start(0, 50, 50)


def test_plan_state_round_trip():
    clock = FakeClock()
    p = plan(clock)
    p.start(0, 100, 100)
    clock.t += 100.0  # 100 s of the budget spent since the plan began, 120 s in all
    state = p.state()
    assert state["spent_s"] == pytest.approx(120.0)
    q = StepPlan.restore(state, started_at=5000.0, clock=FakeClock(5000.0))
    assert q.deadline == pytest.approx(5000.0 + 240 - 120)
    assert (q.total, q.warmup, q.decay_start, q.step_s) == (p.total, p.warmup, p.decay_start, p.step_s)


def test_chinchilla_fit_and_choice():
    # Hoffmann et al. 2022 eq. 10 at N = 70 B, D = 1.4 T (Chinchilla) is about 1.94.
    assert predicted_loss(70e9, 1.4e12) == pytest.approx(1.94, abs=0.01)
    cands = [{"shape": "a", "parameters": 600_000, "tokens_per_second": 9e3},
             {"shape": "b", "parameters": 2_100_000, "tokens_per_second": 5e3},
             {"shape": "c", "parameters": 3_900_000, "tokens_per_second": 2.5e3}]
    assert choose_shape(cands, 240)["shape"] == "b"  # the module docstring's example
    assert choose_shape(cands, 24_000)["shape"] == "c"  # more time: a larger model
    assert cands[0]["planned_tokens"] == 9e3 * 24_000


def test_shapes_are_presets_of_every_family(specials):
    from lmobjectives.models.presets import build_model, count_parameters

    shape = SHAPES["d64-l2"]
    for arch in ("decoder", "encoder", "encoder_decoder"):
        model = build_model("d64-l2", arch, specials, 64, seed=0)
        assert model.config.vocab_size == specials.vocab_size
    decoder = build_model("d64-l2", "decoder", specials, 64, seed=0)
    assert count_parameters(decoder) == shape.parameters(specials.vocab_size)


def test_config_rules():
    with pytest.raises(UserError, match="not both"):
        build_config({"train": {"time": "5m", "steps": 10}})
    with pytest.raises(UserError, match="--time"):
        build_config({"train": {"time": "five minutes"}})
    cfg = build_config({"train": {"time": "5m"}})
    assert (cfg.train.schedule, cfg.train.decay_fraction) == ("wsd", 0.2)
    assert "steps" not in __import__("yaml").safe_load(config_to_yaml(cfg))["train"]
    again = build_config(__import__("yaml").safe_load(config_to_yaml(cfg)))  # a resume's reload
    assert again.train == cfg.train
    assert build_config({"train": {"time": "5m", "schedule": "cosine"}}).train.schedule == "cosine"
    assert default_budget({})["train"]["time"] == "4m"
    assert default_budget({"train": {"steps": 5}}) == {"train": {"steps": 5}}
    assert build_config({}).train.time is None  # Python callers keep counted steps


def test_compile_only_when_it_pays():
    from lmobjectives.train.calibrate import compile_pays

    assert compile_pays(eager_s=1.0, compiled_s=0.8, compile_s=30, seconds=600)
    assert not compile_pays(eager_s=1.0, compiled_s=0.8, compile_s=100, seconds=600)
    assert not compile_pays(eager_s=1.0, compiled_s=1.1, compile_s=0, seconds=600)


def test_a_failing_compile_falls_back_to_eager(small_store, tmp_path, monkeypatch):
    import torch

    from lmobjectives.train.calibrate import try_compile

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    cfg = build_config({"objective": "clm", "model": {"preset": "tiny"},
                        "data": {"store": small_store, "seq_len": 32},
                        "train": {"time": "20m", "batch_size": 2}, "out": str(tmp_path)})
    out = try_compile(cfg, tmp_path, {"step_seconds": 1.0, "threads": 1}, 1200, 1, __import__("time").time)
    assert out == {"used": False, "reason": "RuntimeError: no compiler here"}


def test_the_command_line_default_is_the_timed_default_job():
    from lmobjectives.config import config_from_flags

    cfg = config_from_flags({}, None, None)  # `lmobj train` with no arguments
    assert cfg.train.time == "4m" and "preset" not in cfg.model.model_fields_set
    assert config_from_flags({"train.steps": 5}, None, None).train.time is None
    assert config_from_flags({"train.time": "90s"}, None, None).train.time == "90s"
