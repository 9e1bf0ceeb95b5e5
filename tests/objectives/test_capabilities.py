"""Objectives declare what their models can do; evaluation, inference and comparison decide by
those declarations alone, so a new objective is one file. A toy objective registered here is
handled by its capabilities, with no name of it anywhere in the library."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest

from lmobjectives.objectives import OBJECTIVES, capabilities, objective_class, objectives_where
from lmobjectives.objectives.base import (ACCURACY_KEYS, ARCHITECTURES, INFILL_KINDS, MODEL_KINDS,
                                          Capabilities, Features, Objective, Rows,
                                          single_stream_mask)
from lmobjectives.tokenizer.special import SpecialIds

SP = SpecialIds.default(1000)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_declares_a_complete_set_of_capabilities(name):
    cls = objective_class(name)
    caps = cls.__dict__.get("capabilities")  # declared by the class itself, not inherited
    assert isinstance(caps, Capabilities), f"{name} declares no Capabilities"
    assert caps is capabilities(name)
    assert caps.architectures and set(caps.architectures) <= set(ARCHITECTURES)
    assert caps.infill in INFILL_KINDS and caps.accuracy_key in ACCURACY_KEYS
    assert caps.model_kind in MODEL_KINDS and isinstance(caps.drafts_tokens, bool)
    assert isinstance(caps.infill_benchmark, bool)
    assert caps.mode_token is None or isinstance(getattr(SP, caps.mode_token), int)
    # The class attributes the train loop and config read mirror the declaration.
    assert cls.architectures == caps.architectures and cls.model_kind == caps.model_kind
    assert caps.default_architecture == caps.architectures[0]


def test_the_shipped_declarations():
    assert objectives_where(lambda c: c.infill == "fim_prompt") == ["fim"]
    assert objectives_where(lambda c: c.infill == "sentinel_spans") == ["span", "ul2"]
    assert objectives_where(lambda c: c.drafts_tokens) == ["mtp"]
    assert objectives_where(lambda c: c.accuracy_key == "masked_accuracy") == ["mlm"]
    assert objectives_where(lambda c: c.infill_benchmark) == ["clm", "fim"]
    assert objectives_where(lambda c: c.mode_token is not None) == ["ul2"]
    assert capabilities("mtp").model_kind == "mtp" and capabilities("clm").model_kind == "standard"


def test_how_it_infills_must_be_declared():
    with pytest.raises(TypeError):
        Capabilities(architectures=("decoder",))  # type: ignore[call-arg]


@pytest.mark.parametrize("bad", [dict(architectures=()), dict(architectures=("rnn",)),
                                 dict(infill="telepathy"), dict(accuracy_key="f1"),
                                 dict(model_kind="moe"), dict(mode_token="no_such_token")])
def test_capabilities_reject_unknown_values(bad):
    with pytest.raises(ValueError):
        Capabilities(**{"architectures": ("decoder",), "infill": "left_to_right", **bad})


def test_a_masked_diffusion_objective_fits_the_declaration():
    caps = Capabilities(architectures=("encoder",), infill="unmasking",
                        accuracy_key="masked_accuracy")
    assert caps.default_architecture == "encoder" and not caps.drafts_tokens


@dataclass(frozen=True, kw_only=True)
class Toy(Objective):
    """A decoder objective nobody in the library has heard of: FIM-style infilling, masked
    accuracy, draft heads, the [NLG] mode token."""

    name: ClassVar[str] = "toy"
    capabilities: ClassVar[Capabilities] = Capabilities(
        architectures=("decoder", "prefix_lm"), infill="fim_prompt", infill_benchmark=True,
        accuracy_key="masked_accuracy", mode_token="nlg", drafts_tokens=True)

    specials: SpecialIds

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        return Features(targets=rows.tokens, target_mask=single_stream_mask(rows, self.specials),
                        positions=rows.positions)


@dataclass(frozen=True, kw_only=True)
class PlainToy(Toy):
    name: ClassVar[str] = "plain_toy"
    capabilities: ClassVar[Capabilities] = dataclasses.replace(
        Toy.capabilities, architectures=("encoder_decoder",), infill="sentinel_spans",
        infill_benchmark=False, accuracy_key="accuracy", mode_token=None, drafts_tokens=False)


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, Toy.name, Toy)
    monkeypatch.setitem(OBJECTIVES, PlainToy.name, PlainToy)


def test_evaluate_picks_its_metrics_from_capabilities(toys):
    from lmobjectives.evaluate.run import accuracy_key, gets_infill_metric

    assert accuracy_key("toy") == "masked_accuracy" and accuracy_key("plain_toy") == "accuracy"
    assert gets_infill_metric("toy", "decoder") and not gets_infill_metric("toy", "prefix_lm")
    assert not gets_infill_metric("plain_toy", "decoder")


def test_compare_applies_metrics_by_capabilities(toys):
    from lmobjectives.compare.measure import METRICS

    toy, plain = SimpleNamespace(objective="toy"), SimpleNamespace(objective="plain_toy")
    for metric in ("infill_exact_match", "speculative_speedup"):
        assert METRICS[metric].applies(toy) is None
        reason = METRICS[metric].applies(plain)
        assert reason is not None and "toy" in reason and "plain_toy" not in reason


def test_infer_picks_infill_form_and_mode_token_from_capabilities(toys, tmp_path):
    from lmobjectives.infer.api import (fills_fim, fills_sentinels, mode_token_id,
                                        run_capabilities)

    def loaded(objective: str | None) -> SimpleNamespace:
        run_dir = tmp_path / str(objective)
        run_dir.mkdir()
        if objective is not None:
            (run_dir / "run.json").write_text(json.dumps({"objective": objective}))
        return SimpleNamespace(run_dir=run_dir, specials=SP)

    toy, plain, bare = loaded("toy"), loaded("plain_toy"), loaded(None)
    assert run_capabilities(toy) is Toy.capabilities and run_capabilities(bare) is None
    assert fills_fim(run_capabilities(toy)) and not fills_sentinels(run_capabilities(toy))
    assert fills_sentinels(run_capabilities(plain)) and not fills_fim(run_capabilities(plain))
    assert mode_token_id(toy, run_capabilities(toy)) == SP.nlg
    assert mode_token_id(plain, run_capabilities(plain)) is None
    assert mode_token_id(loaded("ul2"), capabilities("ul2")) == SP.nlu
