"""Pre-training objectives, each a pure numpy transform (see ``base``). The registry below is
the one place that lists them; ``build_objective`` makes one from its name and parameters,
``capabilities`` says what a named objective's model can do (evaluation, inference and
comparison ask it instead of comparing names)."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

from lmobjectives.errors import UserError
from lmobjectives.objectives.base import Capabilities, Features, Objective, Rows
from lmobjectives.objectives.clm import CLM
from lmobjectives.objectives.fim import FIM
from lmobjectives.objectives.mlm import MLM
from lmobjectives.objectives.mtp import MTP
from lmobjectives.objectives.prefix import PrefixLM
from lmobjectives.objectives.span import SpanCorruption
from lmobjectives.objectives.ul2 import UL2
from lmobjectives.tokenizer.special import SpecialIds

OBJECTIVES: dict[str, type[Objective]] = {
    CLM.name: CLM,
    MLM.name: MLM,
    SpanCorruption.name: SpanCorruption,
    UL2.name: UL2,
    PrefixLM.name: PrefixLM,
    FIM.name: FIM,
    MTP.name: MTP,
}


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, OBJECTIVES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown objective '{name}'{hint} (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def capabilities(name: str) -> Capabilities:
    """What the objective ``name`` declares its model can do (``base.Capabilities``)."""
    return objective_class(name).capabilities


def objectives_where(test: Callable[[Capabilities], bool]) -> list[str]:
    """Names of the registered objectives whose capabilities pass ``test``, in registry order."""
    return [name for name, cls in OBJECTIVES.items() if test(cls.capabilities)]


def objective_param_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(objective_class(name))
            if f.name != "specials" and f.metadata.get("param", True)]


def build_objective(name: str, params: dict[str, object], specials: SpecialIds,
                    tokenizer: object | None = None) -> Objective:
    """Make an objective; an unknown parameter is an error that names the closest valid one.
    Objectives that need tables derived from the tokenizer (FIM's byte pieces, whole-word
    starts) build them in their ``from_tokenizer`` classmethod."""
    cls = objective_class(name)
    known = objective_param_names(name)
    for key in params:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean 'objective.{close[0]}'?" if close else ""
            raise UserError(f"objective '{name}' has no parameter '{key}'{hint} "
                            f"(parameters: {', '.join(known) or 'none'})")
    try:
        if tokenizer is not None and hasattr(cls, "from_tokenizer"):
            return cls.from_tokenizer(tokenizer, specials=specials, **params)
        return cls(specials=specials, **params)
    except (TypeError, ValueError) as exc:
        raise UserError(f"bad parameters for objective '{name}': {exc}") from None


__all__ = ["OBJECTIVES", "Capabilities", "Features", "Objective", "Rows", "build_objective",
           "capabilities", "objective_class", "objectives_where"]
