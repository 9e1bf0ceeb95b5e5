"""Masked diffusion language modelling (MDLM: Sahoo et al. 2024, "Simple and Effective Masked
Diffusion Language Models", arXiv 2406.07524; LLaDA: Nie et al. 2025).

Forward process, per row: draw a time t in (ε, 1] and replace every non-special token by
MASK independently with probability t (the log-linear schedule α_t = 1 − t). Special tokens
(EOS between packed documents, PAD) are never masked, and the converters keep packed
documents apart (``positions`` restart at each document), so a document never sees another.

Loss: the continuous-time ELBO of this schedule is E_t[(1/t) Σ_{masked i} −log p(x_i | z_t)]
(MDLM Eq. 10 with α′/(1 − α_t) = −1/t). With the SUBS parameterisation an unmasked position
carries its token over (log-probability 0) and the model never predicts MASK. So every
non-special token is *scored*, with weight 1/t where masked and 0 where not: the frame's rule
(weighted sum over scored tokens / scored-token count of the whole optimizer step) then gives
exactly the ELBO per token, and accumulation and data parallelism still give one update.

t is drawn with MDLM's low-discrepancy sampler: one uniform u shared by the batch, row b gets
((u + b) / B) mod 1, so a batch always covers (ε, 1] evenly (the marginal of each row stays
uniform, which keeps the ELBO estimate unbiased while cutting its variance).

Worked example (EOS 0, MASK 2), one row, t = 0.5, positions 1 and 3 masked::

    tokens       = [[50, 51, 52, 53, 0]]
    inputs       = [[50,  2, 52,  2, 0]]
    targets      = [[50, 51, 52, 53, 0]]
    target_mask  = [[ T,  T,  T,  T, F]]    # every non-special token is scored ...
    loss_weights = [[ 0,  2,  0,  2, 0]]    # ... the masked ones with weight 1/t
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmobjectives.objectives.base import Capabilities, Features, Objective, Rows
from lmobjectives.tokenizer.special import SpecialIds

# MDLM's sampling_eps and LLaDA's ε: t stays away from 0, where the weight 1/t explodes.
DEFAULT_EPS = 1e-3


def diffusion_times(batch: int, rng: np.random.Generator, eps: float = DEFAULT_EPS,
                    low_discrepancy: bool = True) -> np.ndarray:
    """(batch,) float64 times in (eps, 1]; stratified across the batch when ``low_discrepancy``
    (MDLM ``_sample_t``: one offset shared by the batch, rows spread 1/batch apart).

    >>> diffusion_times(4, np.random.default_rng(0), eps=0.0).round(3).tolist()
    [0.363, 0.113, 0.863, 0.613]
    """
    if low_discrepancy:
        s = (rng.random() + np.arange(batch) / batch) % 1.0
    else:
        s = rng.random(batch)
    return 1.0 - (1.0 - eps) * s  # s in [0, 1) -> t in (eps, 1]


def mask_tokens(tokens: np.ndarray, t: np.ndarray, specials: SpecialIds,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The forward process: (noisy tokens, masked positions). Each non-special token of row b
    becomes MASK independently with probability ``t[b]``; special tokens never do."""
    eligible = ~specials.is_special(tokens)  # (B, R)
    masked = eligible & (rng.random(tokens.shape) < t[:, None])  # (B, R)
    return np.where(masked, specials.mask, tokens).astype(tokens.dtype), masked


@dataclass(frozen=True, kw_only=True)
class MDLM(Objective):
    """Masked diffusion (MDLM defaults: log-linear schedule, SUBS, continuous time, ε = 1e-3,
    low-discrepancy sampling of t)."""

    name: ClassVar[str] = "mdlm"
    # Fills <|mask|> anywhere by iterative unmasking; held-out text gets the ELBO bound.
    capabilities: ClassVar[Capabilities] = Capabilities(
        architectures=("encoder", "bidirectional_decoder"), infill="unmasking",
        accuracy_key="masked_accuracy", likelihood="elbo")

    specials: SpecialIds
    eps: float = DEFAULT_EPS
    low_discrepancy: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")

    def suppressed_ids(self) -> tuple[int, ...]:
        """SUBS: the model never predicts MASK (its logit is −∞ in the loss and in sampling)."""
        return (self.specials.mask,)

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        t = diffusion_times(rows.tokens.shape[0], rng, self.eps, self.low_discrepancy)
        return self.at_times(rows, t, rng)

    def at_times(self, rows: Rows, t: np.ndarray, rng: np.random.Generator) -> Features:
        """Features at given per-row times ``t`` (evaluation at fixed t uses this)."""
        tokens = rows.tokens
        noisy, masked = mask_tokens(tokens, np.asarray(t, dtype=np.float64), self.specials, rng)
        weights = np.where(masked, 1.0 / np.asarray(t)[:, None], 0.0).astype(np.float32)  # (B, R)
        return Features(targets=tokens, target_mask=~self.specials.is_special(tokens),
                        positions=rows.positions, inputs=noisy,
                        input_lengths=np.full(tokens.shape[0], tokens.shape[1], dtype=np.int32),
                        loss_weights=weights, extras={"t": np.asarray(t, dtype=np.float64)})
