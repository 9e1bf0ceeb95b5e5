"""UL2 mixture of denoisers: every row draws one of seven denoisers (UL2 §3.1.2), is corrupted
by it, and its inputs start with the denoiser's mode token (UL2 §3.1.3).

The seven denoisers (mean span length mu, noise density r), as released with UL2-20B and
re-stated by levanter's ``ul2_configs``:

    R (mode [NLU]):  (mu 3, r 0.15), (mu 8, r 0.15)              regular span corruption
    X (mode [NLG]):  (mu 3, r 0.5), (mu 8, r 0.5), (mu 64, r 0.15), (mu 64, r 0.5)   extreme
    S (mode [S2S]):  prefix LM, split uniform over the row                  sequential

R and X rows go through the span-corruption code with per-row density and mean span (one
vectorised noise mask for the whole batch); S rows through the prefix-LM split. Sampling is
uniform over the seven by default, as in the UL2 paper's appendix code (``rates=None`` ->
uniform over tasks); ``rates`` sets other relative weights, in the order above.

Worked example (EOS 0, PAD 1, sentinels 10.., [NLU] 110, [S2S] 112), two rows of 6 tokens:
row 0 draws R (mu 3, r 0.15): 1 noise token in 1 span; row 1 draws S with split point 2::

    tokens   = [[21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36]]
    inputs   = [[110, 21, 22, 23, 24, 25, 10, 0], [112, 31, 32, 1, 1, 1, 1, 1]]
    targets  = [[10, 26, 0, 1], [33, 34, 35, 36]]
    extras["denoiser"] = [0, 6]

Trade-off: one row length serves all seven denoisers, so it is the largest for which every
enabled denoiser's inputs (mode token included) fit ``seq_len``. With S enabled that is
``seq_len`` itself (an S prefix can be the whole row but one token), so span rows come out
shorter than ``seq_len`` and are padded; T5's per-task lengths would avoid that padding but
need a separate token stream per denoiser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmobjectives.objectives.base import Capabilities, Features, Objective, Rows
from lmobjectives.objectives.prefix import random_split_points
from lmobjectives.objectives.noise import non_pad_lengths, random_spans_noise_mask
from lmobjectives.objectives.span import check_sentinels, corrupted_lengths, denoise, raw_length
from lmobjectives.tokenizer.special import SpecialIds


@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: span corruption (mean span, density) or, with both None, prefix LM."""

    mode: str  # "R", "X" or "S"
    mean_span: float | None = None
    noise_density: float | None = None

    @property
    def is_prefix_lm(self) -> bool:
        return self.mean_span is None

    def __str__(self) -> str:
        if self.is_prefix_lm:
            return f"{self.mode}(prefix LM)"
        return f"{self.mode}(mean span {self.mean_span:g}, density {self.noise_density:g})"


# UL2 §3.1.2 / the released UL2-20B mixture (order matters: ``rates`` and extras index it).
DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("R", 3.0, 0.15),
    Denoiser("R", 8.0, 0.15),
    Denoiser("X", 3.0, 0.5),
    Denoiser("X", 8.0, 0.5),
    Denoiser("X", 64.0, 0.15),
    Denoiser("X", 64.0, 0.5),
    Denoiser("S"),
)
_MEAN_SPAN = np.array([d.mean_span or 1.0 for d in DENOISERS])  # (7,) S rows never use theirs
_DENSITY = np.array([d.noise_density or 0.5 for d in DENOISERS])
_IS_PREFIX = np.array([d.is_prefix_lm for d in DENOISERS])


@dataclass(frozen=True, kw_only=True)
class UL2(Objective):
    """UL2's mixture of seven denoisers with mode tokens [NLU] / [NLG] / [S2S]."""

    name: ClassVar[str] = "ul2"
    capabilities: ClassVar[Capabilities] = Capabilities(
        architectures=("encoder_decoder", "prefix_lm"), infill="sentinel_spans", mode_token="nlu")

    specials: SpecialIds
    # Relative sampling weights over DENOISERS; uniform as in the UL2 paper's appendix code.
    rates: tuple[float, ...] = (1.0,) * len(DENOISERS)

    def __post_init__(self) -> None:
        rates = tuple(float(r) for r in self.rates)
        object.__setattr__(self, "rates", rates)  # lists from a config become a hashable tuple
        if len(rates) != len(DENOISERS):
            names = ", ".join(str(d) for d in DENOISERS)
            raise ValueError(f"rates needs {len(DENOISERS)} weights ({names}), got {len(rates)}")
        if any(not math.isfinite(r) or r < 0 for r in rates) or sum(rates) <= 0:
            raise ValueError(f"rates must be finite, >= 0 and not all zero, got {list(rates)}")

    def _enabled(self) -> list[Denoiser]:
        return [d for d, r in zip(DENOISERS, self.rates) if r > 0]

    def row_length(self, seq_len: int) -> int:
        """Largest row for which every enabled denoiser's inputs (mode token too) fit."""
        # The mode token takes one input slot; an S prefix is at most the row but one token.
        lengths = [seq_len if d.is_prefix_lm
                   else raw_length(seq_len - 1, d.noise_density, d.mean_span)
                   for d in self._enabled()]
        length = min(lengths)
        self._check_sentinels(length)
        return length

    def target_length(self, seq_len: int) -> int:
        """Longest targets any enabled denoiser makes from a full row."""
        length = self.row_length(seq_len)
        return max(length - 1 if d.is_prefix_lm
                   else corrupted_lengths(length, d.noise_density, d.mean_span)[1]
                   for d in self._enabled())

    def _check_sentinels(self, length: int) -> None:
        for d in self._enabled():
            if not d.is_prefix_lm:
                check_sentinels(length, d.noise_density, d.mean_span,
                                len(self.specials.sentinels),
                                f"UL2 denoiser {d} (set its rate to 0 to drop it)")

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        tokens = rows.tokens
        B, R = tokens.shape
        self._check_sentinels(R)
        probs = np.asarray(self.rates) / sum(self.rates)
        which = rng.choice(len(DENOISERS), size=B, p=probs)  # (B,) denoiser per row
        lengths = non_pad_lengths(tokens, self.specials.pad)  # (B,)
        is_prefix = _IS_PREFIX[which]  # (B,)
        noise = np.zeros((B, R), dtype=bool)  # (B, R) target tokens
        span_rows = np.flatnonzero(~is_prefix)
        if span_rows.size:
            picked = which[span_rows]
            noise[span_rows] = random_spans_noise_mask(
                lengths[span_rows], R, _DENSITY[picked], _MEAN_SPAN[picked], rng)
        prefix_rows = np.flatnonzero(is_prefix)
        if prefix_rows.size:
            n = lengths[prefix_rows][:, None]  # (b, 1)
            split = random_split_points(lengths[prefix_rows], rng)[:, None]  # (b, 1)
            col = np.arange(R)[None, :]
            noise[prefix_rows] = (col >= split) & (col < n)  # the suffix is the target
        s = self.specials
        mode_ids = np.array([{"R": s.nlu, "X": s.nlg, "S": s.s2s}[d.mode] for d in DENOISERS],
                            dtype=tokens.dtype)
        out = denoise(tokens, noise, s, sentinels=~is_prefix, close_with_eos=~is_prefix,
                      mode_tokens=mode_ids[which])
        return out.features(denoiser=which.astype(np.int32))
