"""Causal language modelling: every token of a packed row is predicted from the tokens of its
own document before it. The transform is the identity on tokens; it only says which tokens
are scored (not a document's first token, whose context lies in another document, nor PAD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmobjectives.objectives.base import Capabilities, Features, Objective, Rows, single_stream_mask
from lmobjectives.tokenizer.special import SpecialIds


@dataclass(frozen=True, kw_only=True)
class CLM(Objective):
    name: ClassVar[str] = "clm"
    capabilities: ClassVar[Capabilities] = Capabilities(
        architectures=("decoder",), infill="left_to_right", infill_benchmark=True)

    specials: SpecialIds

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        return Features(targets=rows.tokens, target_mask=single_stream_mask(rows, self.specials),
                        positions=rows.positions)
