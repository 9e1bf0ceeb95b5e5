"""Prefix LM: split each row at a random point; the model reads the prefix with bidirectional
attention and predicts the suffix left to right, scored on the suffix only.

The split point ``p`` is uniform over ``[1, n - 1]`` for a row of ``n`` real (non-PAD) tokens,
as T5's ``random_prefix_noise_mask`` at noise density 0.5 (the seqio / T5 prefix-LM task)
and T5's ``pack_prefix_lm_decoder_only``: both parts are never empty. There is no parameter:
a skewed split (e.g. NeMo's UL2 pivot at 25 % of the row) would be one more knob with no
reference default to match.

Worked example (PAD = 1), two rows, split points 2 and 1::

    tokens         = [[5, 6, 0, 7, 8],      rows.tokens, the second row ends in padding
                      [9, 4, 0, 1, 1]]
    inputs         = [[5, 6],               input_lengths  = [2, 1]
                      [9, 1]]
    targets        = [[0, 7, 8],            target_lengths = [3, 2]
                      [4, 0, 1]]
    target_mask    = [[T, T, T],
                      [T, T, F]]

``converters.to_prefix_lm`` joins inputs and targets back into the original row. Trade-off:
a packed row holds several documents, so the prefix may end in one document and the suffix
start in the next (as in T5's packed prefix LM); the split is over the row, not a document.
A row of fewer than two real tokens is all prefix (nothing to predict).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmobjectives.objectives.base import Capabilities, Features, Objective, Rows
from lmobjectives.objectives.noise import non_pad_lengths
from lmobjectives.tokenizer.special import SpecialIds


def random_split_points(lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B,) prefix lengths, uniform over [1, n - 1]; ``n`` itself for rows of < 2 tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    split = rng.integers(1, np.maximum(lengths, 2), size=lengths.shape[0])  # high exclusive
    return np.minimum(split, lengths)


def split_rows(tokens: np.ndarray, lengths: np.ndarray, split: np.ndarray,
               pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``tokens[:p]`` and targets ``tokens[p:n]``, each padded to the batch maximum.

    Rows hold PAD after their ``n`` real tokens, so a window of the row starting at ``p``
    is already the padded target; a PAD margin keeps every window inside the array.
    """
    B, R = tokens.shape
    S = max(int(split.max(initial=0)), 1)
    T = max(int((lengths - split).max(initial=0)), 1)
    inputs = tokens[:, :S].copy()  # (B, S)
    inputs[np.arange(S)[None, :] >= split[:, None]] = pad
    margin = np.full((B, R + T), pad, dtype=tokens.dtype)  # (B, R + T)
    margin[:, :R] = tokens
    windows = np.lib.stride_tricks.sliding_window_view(margin, T, axis=1)  # (B, R + 1, T) view
    targets = windows[np.arange(B), split]  # (B, T)
    return inputs, targets


@dataclass(frozen=True, kw_only=True)
class PrefixLM(Objective):
    """Prefix LM with a uniform split point (T5 ``prefix_lm``, seqio's prefix-LM converter)."""

    name: ClassVar[str] = "prefix"
    capabilities: ClassVar[Capabilities] = Capabilities(
        architectures=("prefix_lm",), infill="left_to_right")

    specials: SpecialIds

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        tokens = rows.tokens
        lengths = non_pad_lengths(tokens, self.specials.pad)  # (B,)
        split = random_split_points(lengths, rng)  # (B,)
        inputs, targets = split_rows(tokens, lengths, split, self.specials.pad)
        n_tg = lengths - split
        target_mask = np.arange(targets.shape[1])[None, :] < n_tg[:, None]  # (B, T)
        return Features(targets=targets, target_mask=target_mask, inputs=inputs,
                        input_lengths=split.astype(np.int32), target_lengths=n_tg.astype(np.int32))
