"""The step's model side: a model with its loss (``standard``: one cross-entropy term;
``mtp``: one term per prediction depth), chosen by the objective's ``model_kind``.

Placed between ``models/`` and ``train/``: the train loop drives these, and evaluation scores
validation rows with them, without either importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from lmobjectives.objectives import Objective
from lmobjectives.step.mtp import MTPModule, base_overrides, wrap_model
from lmobjectives.step.standard import StandardModule, TrainModule


def _no_overrides(objective: Objective, preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    return overrides


def _unwrapped(model: torch.nn.Module, objective: Objective, seed: int,
               init_from: str | None) -> torch.nn.Module:
    return model


def _standard(model: torch.nn.Module, objective: Objective, architecture: str, bf16: bool,
              compile_model: bool = False, loss_chunks: int | str = 1) -> TrainModule:
    # torch.compile wraps the same parameters: checkpoints and export use the plain model.
    return StandardModule(torch.compile(model) if compile_model else model, architecture, bf16=bf16,
                          loss_chunks=loss_chunks)


def _mtp(model: torch.nn.Module, objective: Any, architecture: str, bf16: bool,
         compile_model: bool = False, loss_chunks: int | str = 1) -> TrainModule:
    return MTPModule(model, objective, bf16=bf16, loss_chunks=loss_chunks)


@dataclass(frozen=True)
class ModelKind:
    """How a kind of model is built around the backbone and how it computes its loss."""

    overrides: Callable[..., dict[str, Any]]  # preset overrides before the backbone is built
    wrap: Callable[..., torch.nn.Module]  # backbone -> the model that trains (e.g. extra heads)
    step: Callable[..., TrainModule]  # model -> its loss terms, forward and backward


MODEL_KINDS: dict[str, ModelKind] = {
    "standard": ModelKind(_no_overrides, _unwrapped, _standard),
    "mtp": ModelKind(base_overrides, wrap_model, _mtp),  # multi-token prediction heads
}


def model_kind(objective: Objective) -> ModelKind:
    """The objective's declared ``model_kind`` (``standard`` when it declares none)."""
    return MODEL_KINDS[getattr(objective, "model_kind", None) or "standard"]


def step_module(model: torch.nn.Module, objective: Objective, architecture: str, bf16: bool,
                compile_model: bool = False, loss_chunks: int | str = 1) -> TrainModule:
    """The model with its loss; ``loss_chunks`` as ``train.loss_chunks`` (``loss.py``)."""
    return model_kind(objective).step(model, objective, architecture, bf16, compile_model, loss_chunks)
