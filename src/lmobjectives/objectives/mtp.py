"""Multi-token prediction (MTP): from every position t, predict tokens t+1 ... t+n of the same
document, one output head per offset (Gloeckle et al. 2024, "Better & Faster Large Language
Models via Multi-token Prediction"; DeepSeek-V3 §2.2 for the sequential variant).

The data side is CLM's: one packed stream, per-document positions, every token but a
document's first (and PAD) scored. What MTP adds is which target each *depth* k sees: the
token k places ahead, and only if it lies in the same document. In a packed row a document
is a run of positions increasing by one, so the target of depth k at t is valid iff
``positions[t + k] == positions[t] + k`` and token t+k is scored. The cost of doing this in
the objective rather than by rolling the row (Megatron's ``roll_tensor``) is nothing: it is
one vectorised comparison; the gain is that no depth ever learns across a document boundary.

Worked example (EOS = 0, PAD = 1), one row holding two documents::

    tokens      = [[5, 6, 7, 0, 8, 9, 0, 1]]
    positions   = [[0, 1, 2, 3, 0, 1, 2, 0]]
    target_mask = [[F, T, T, T, F, T, T, F]]
    depth_targets(tokens, target_mask, positions, k=1)
                = [[6, 7, 0, -100, 9, 0, -100, -100]]       # ordinary next-token targets
    depth_targets(tokens, target_mask, positions, k=2)
                = [[7, 0, -100, -100, 0, -100, -100, -100]]  # t=2 would reach 8: next document

The objective also carries the parameters that shape the MTP model and its loss (they are
part of the objective's config, so ``--objective mtp --set objective.n_heads=2`` is the whole
change from CLM, and the run's config hash covers them):

* ``n_heads`` (default 4, Gloeckle §3.4: n = 4 is best on code at 7B): head 1 is the
  next-token head; heads 2..n predict further ahead. ``n_heads=1`` is plain CLM.
* ``head_design``: ``parallel`` — n transformer layers on a shared trunk (Gloeckle §2);
  ``sequential`` — DeepSeek-V3's chained modules, each seeing the embedding of the token
  before its target.
* ``compute_matched``: remove one trunk layer per extra head, so parameters match the
  next-token baseline (Gloeckle §3 intro).
* ``weights``: per-head loss weights (head 1 first). Default: all 1 for ``parallel``
  (Gloeckle's loss is the plain sum); ``[1, λ/D, ..., λ/D]`` for ``sequential`` with
  D = n - 1 and λ = 0.3 (DeepSeek-V3 §2.2 Eq. 25, §4.2).
* ``weight_schedule``: ``constant``, or ``deepseek``: λ = 0.3 for the first 10/14.8 of the
  steps then 0.1 (DeepSeek-V3 §4.2: 0.3 for the first 10T of 14.8T tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmobjectives.objectives.base import (IGNORE, Capabilities, Features, Objective, Rows,
                                          single_stream_mask)
from lmobjectives.tokenizer.special import SpecialIds

HEAD_DESIGNS = ("parallel", "sequential")
WEIGHT_SCHEDULES = ("constant", "deepseek")
# DeepSeek-V3 §4.2: MTP loss weight 0.3 for the first 10T tokens, 0.1 for the remaining 4.8T.
DEEPSEEK_LAMBDA = (0.3, 0.1)
DEEPSEEK_SWITCH = 10.0 / 14.8


def depth_targets(tokens: np.ndarray, target_mask: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """Targets of depth ``k`` aligned to the position that predicts them, (B, T) int64 with
    ``IGNORE`` where there is none (see the module docstring)."""
    B, T = tokens.shape
    out = np.full((B, T), IGNORE, dtype=np.int64)
    if k >= T:
        return out
    same_doc = positions[:, k:] == positions[:, :-k] + k  # (B, T-k)
    valid = same_doc & target_mask[:, k:]
    out[:, :-k] = np.where(valid, tokens[:, k:], IGNORE)
    return out


def loss_weights(n_heads: int, design: str, weights: tuple[float, ...] | None, schedule: str,
                 progress: float) -> tuple[float, ...]:
    """Per-head loss weights at ``progress`` (share of training done, in [0, 1])."""
    if weights is not None:
        return tuple(weights)
    if design == "parallel" and schedule == "constant":
        return (1.0,) * n_heads
    lam = DEEPSEEK_LAMBDA[0] if schedule == "constant" or progress < DEEPSEEK_SWITCH else DEEPSEEK_LAMBDA[1]
    extra = n_heads - 1
    return (1.0,) + (lam / max(extra, 1),) * extra


@dataclass(frozen=True, kw_only=True)
class MTP(Objective):
    name: ClassVar[str] = "mtp"
    capabilities: ClassVar[Capabilities] = Capabilities(
        architectures=("decoder",), infill="left_to_right", drafts_tokens=True, model_kind="mtp")

    specials: SpecialIds
    n_heads: int = 4
    head_design: str = "parallel"
    compute_matched: bool = False
    weights: tuple[float, ...] | None = None
    weight_schedule: str = "constant"

    def __post_init__(self) -> None:
        if not isinstance(self.n_heads, int) or self.n_heads < 1:
            raise ValueError(f"n_heads must be an integer >= 1, got {self.n_heads!r}")
        if self.head_design not in HEAD_DESIGNS:
            raise ValueError(f"head_design must be one of {', '.join(HEAD_DESIGNS)}, got {self.head_design!r}")
        if self.weight_schedule not in WEIGHT_SCHEDULES:
            raise ValueError(f"weight_schedule must be one of {', '.join(WEIGHT_SCHEDULES)}, "
                             f"got {self.weight_schedule!r}")
        if self.weights is not None:
            w = tuple(float(x) for x in self.weights)
            if len(w) != self.n_heads:
                raise ValueError(f"weights has {len(w)} entries but n_heads is {self.n_heads}")
            if any(x < 0 for x in w) or w[0] <= 0:
                raise ValueError("weights must be >= 0, the first (next-token head) > 0")
            if self.weight_schedule != "constant":
                raise ValueError("give either weights or weight_schedule=deepseek, not both")
            object.__setattr__(self, "weights", w)

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        return Features(targets=rows.tokens, target_mask=single_stream_mask(rows, self.specials),
                        positions=rows.positions)

    def loss_weights(self, progress: float) -> tuple[float, ...]:
        return loss_weights(self.n_heads, self.head_design, self.weights, self.weight_schedule, progress)
