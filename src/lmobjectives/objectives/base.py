"""The objective interface: a pure, seeded numpy transform from packed token rows to
architecture-neutral features.

The split follows seqio's task features vs model features: an objective says *what* is
predicted from *what*; a converter (``lmobjectives.data.converters``) says how a given
architecture sees it. So span corruption can train an encoder-decoder or a decoder-only
prefix LM from the same ``Features``.

Two shapes of features exist:

* single stream (``inputs is None``): ``targets`` is a sequence the model reads and predicts
  left to right (CLM, FIM, MTP). ``target_mask[b, t]`` says token ``t`` is scored, predicted
  from the tokens before it (HF's unshifted ``labels`` convention). ``positions`` carries
  per-document positions of packed rows.
* conditioned (``inputs`` given): the model reads ``inputs[b, :input_lengths[b]]`` and
  predicts ``targets`` (span corruption, UL2, prefix LM). For the ``encoder`` architecture
  (MLM) ``inputs`` and ``targets`` are aligned position by position instead.

Worked example, CLM on one packed row (EOS = 0, PAD = 1)::

    rows.tokens    = [[5, 6, 0, 7, 8, 0, 1, 1]]
    rows.positions = [[0, 1, 2, 0, 1, 2, 0, 0]]
    targets        = rows.tokens
    target_mask    = [[F, T, T, F, T, T, F, F]]   # a document's first token and PAD are never scored
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmobjectives.tokenizer.special import SpecialIds

# bidirectional_decoder: a decoder backbone read with full (non-causal) attention inside each
# document, labels aligned with their positions (masked diffusion on a Llama).
ARCHITECTURES = ("decoder", "prefix_lm", "encoder", "encoder_decoder", "bidirectional_decoder")


@dataclass(frozen=True)
class Rows:
    """A batch of packed rows as the loader serves them.

    ``tokens``: (B, R) documents each followed by EOS, concatenated; the last row of an epoch
    is padded with PAD. ``positions``: (B, R) offset of each token in its document, restarting
    at 0 at every document start and at the start of every row.
    """

    tokens: np.ndarray  # (B, R) int32
    positions: np.ndarray  # (B, R) int32

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, eos: int) -> "Rows":
        """Rows from raw token rows, positions recomputed from EOS separators (for tests, `show`)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        return cls(tokens=tokens, positions=positions_from_eos(tokens, eos))


def positions_from_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    """Per-document positions: restart at 0 after every EOS and at each row start.

    >>> positions_from_eos(np.array([[5, 6, 0, 7, 0, 9]]), eos=0).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    B, R = tokens.shape
    idx = np.broadcast_to(np.arange(R, dtype=np.int32), (B, R))
    starts = np.zeros((B, R), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(np.int32)


@dataclass(frozen=True)
class Features:
    """Architecture-neutral output of an objective for one batch (see module docstring)."""

    targets: np.ndarray  # (B, T) int32, PAD where unused
    target_mask: np.ndarray  # (B, T) bool: scored target tokens
    positions: np.ndarray | None = None  # (B, T) int32, single-stream features only
    inputs: np.ndarray | None = None  # (B, S) int32, PAD where unused
    input_lengths: np.ndarray | None = None  # (B,) int32: valid prefix of each inputs row
    target_lengths: np.ndarray | None = None  # (B,) int32: valid prefix of each targets row
    # (B, T) float32 per-target loss weights, aligned with ``targets``; None: every scored token
    # weighs 1. A scored token of weight 0 counts in the step's denominator but adds no loss.
    loss_weights: np.ndarray | None = None
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per-objective stats

    def __post_init__(self) -> None:
        if self.targets.shape != self.target_mask.shape:
            raise ValueError(f"targets {self.targets.shape} != target_mask {self.target_mask.shape}")
        if (self.inputs is None) != (self.input_lengths is None):
            raise ValueError("inputs and input_lengths come together")
        if self.loss_weights is not None and self.loss_weights.shape != self.targets.shape:
            raise ValueError(f"loss_weights {self.loss_weights.shape} != targets {self.targets.shape}")


class Objective(abc.ABC):
    """A pre-training objective. Subclasses are frozen keyword-only dataclasses whose fields
    are the objective's parameters (``lmobj train --set objective.PARAM=VALUE``); a field with
    ``metadata={"param": False}`` is a table derived from the tokenizer, not a parameter."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]  # the first is the default
    # How held-out text is scored: "exact" (left to right, where the architecture allows) or
    # "elbo" (an upper bound on bits-per-byte: masked diffusion).
    likelihood: ClassVar[str] = "exact"
    # How the trained model writes text: "left_to_right" or "diffusion" (reverse masked
    # diffusion: generate fills masks after the prompt, infill fills <|mask|> anywhere).
    generation: ClassVar[str] = "left_to_right"

    specials: SpecialIds

    def suppressed_ids(self) -> tuple[int, ...]:
        """Token ids the model must never predict: their logits are −∞ in the loss and at
        inference (masked diffusion's SUBS parameterisation never predicts MASK)."""
        return ()

    def row_length(self, seq_len: int) -> int:
        """Length of the packed rows this objective needs to make features of ``seq_len``."""
        return seq_len

    @abc.abstractmethod
    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        """Transform a batch of rows. Pure: same rows and rng state give the same features."""

    def params(self) -> dict[str, object]:
        """The objective's parameters, for config files and reports."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name != "specials" and f.metadata.get("param", True)}


def single_stream_mask(rows: Rows, specials: SpecialIds) -> np.ndarray:
    """Scored tokens of a packed CLM row: everything but a document's first token and PAD."""
    return (rows.positions > 0) & (rows.tokens != specials.pad)
