"""Random packed rows for objective tests: non-special tokens, ~10% EOS, PAD tails."""

from __future__ import annotations

import numpy as np

from lmobjectives.objectives.base import Rows
from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds

SP = SpecialIds.default(1000)


def make_rows(seed: int, batch: int, length: int, pads: list[int]) -> Rows:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(len(SPECIAL_TOKENS), SP.vocab_size, (batch, length)).astype(np.int32)
    tokens[rng.random((batch, length)) < 0.1] = SP.eos
    for b, n_pad in enumerate(pads):
        if n_pad:
            tokens[b, length - n_pad:] = SP.pad
    return Rows.from_tokens(tokens, SP.eos)
