"""Masked language modelling (BERT §3.1): select ~15 % of the tokens, corrupt them, and score
the encoder's prediction of the originals at the selected positions only.

Selection never touches special tokens (EOS, PAD, MASK, sentinels, ...). By default each
token is selected independently with probability ``mask_rate`` (HF's dynamic masking);
``exact_count`` selects exactly ``round(mask_rate * eligible)`` per row instead (BERT's
``create_masked_lm_predictions``). A selected token becomes MASK with probability
``replace_mask`` (0.8), a random non-special token with ``replace_random`` (0.1), and stays
as it is otherwise (BERT §3.1 / appendix A.1). Unlike HF and BERT, random replacements are
never special tokens: a random PAD or EOS in the input would teach nothing useful.

Whole-word masking selects words instead of tokens: a word starts at a token whose text
begins with a space or newline (the byte-level BPE "Ġ" / "Ċ" prefix) or that follows a
special token, and runs over the following pieces. Objectives never see a tokenizer, so the
caller passes ``word_starts``, a boolean table over the vocabulary. Each word is selected
with probability ``mask_rate``, so the expected fraction of selected tokens stays
``mask_rate``; with ``exact_count`` the count is ``round(mask_rate * words)`` words per row.

Worked example (EOS 0, MASK 2), one row, selected positions 1 and 3; position 1 becomes
MASK and position 3 stays unchanged::

    tokens      = [[50, 51, 52, 53, 0]]
    inputs      = [[50,  2, 52, 53, 0]]
    targets     = [[50, 51, 52, 53, 0]]
    target_mask = [[ F,  T,  F,  T, F]]

Trade-off: Bernoulli selection costs one random word per token and no sort, but the count
per row varies (binomial); ``exact_count`` fixes the count at the price of a per-row sort.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmobjectives.objectives.base import Capabilities, Features, Objective, Rows
from lmobjectives.objectives.noise import in_region, random_u32, ranked_keys
from lmobjectives.tokenizer.special import SpecialIds

_U32 = 2.0**32  # probabilities are compared against uint32 words: resolution 2**-32


def word_start_table(tokenizer, vocab_size: int) -> np.ndarray:  # noqa: ANN001
    """(vocab_size,) bool: tokens whose text begins with a space or newline ("Ġ" / "Ċ" in the
    byte-level alphabet), and added (special) tokens, start a word."""
    table = np.zeros(vocab_size, dtype=bool)
    for piece, idx in tokenizer.get_vocab(with_added_tokens=True).items():
        if idx < vocab_size and piece[:1] in ("Ġ", "Ċ", "ĉ"):
            table[idx] = True
    for idx in tokenizer.get_added_tokens_decoder():
        if idx < vocab_size:
            table[idx] = True
    return table


def _below(u: np.ndarray, p: float) -> np.ndarray:
    """Bool mask of uint32 words ``u`` below ``p * 2**32``: probability ``p`` (to 2**-32)."""
    threshold = round(p * _U32)
    if threshold >= 2**32:
        return np.ones(u.shape, dtype=bool)
    return u < np.uint32(threshold)


@dataclass(frozen=True, kw_only=True)
class MLM(Objective):
    """BERT masked LM (BERT §3.1 defaults: 15 % selected; 80 % MASK, 10 % random, 10 % kept)."""

    name: ClassVar[str] = "mlm"
    capabilities: ClassVar[Capabilities] = Capabilities(
        architectures=("encoder",), infill="none", accuracy_key="masked_accuracy")

    specials: SpecialIds
    mask_rate: float = 0.15
    replace_mask: float = 0.8
    replace_random: float = 0.1
    whole_word: bool = False
    exact_count: bool = False
    # Not a parameter: (vocab_size,) bool, True where a token starts a word (whole_word only).
    word_starts: np.ndarray | None = dataclasses.field(
        default=None, repr=False, compare=False, hash=False, metadata={"param": False})

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_rate <= 1.0:
            raise ValueError(f"mask_rate must be in (0, 1], got {self.mask_rate}")
        for key in ("replace_mask", "replace_random"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if self.replace_mask + self.replace_random > 1.0 + 1e-9:
            raise ValueError(f"replace_mask + replace_random must be <= 1, got "
                             f"{self.replace_mask} + {self.replace_random}")
        if self.word_starts is not None:
            table = np.asarray(self.word_starts)
            if table.shape != (self.specials.vocab_size,) or table.dtype != bool:
                raise ValueError(f"word_starts must be a bool array of shape "
                                 f"({self.specials.vocab_size},), got {table.dtype} {table.shape}")
            object.__setattr__(self, "word_starts", table)
        elif self.whole_word:
            raise ValueError("whole_word masking needs word_starts, a bool table over the "
                             "vocabulary marking tokens that begin a word (text starting with a "
                             "space or newline); build it from the tokenizer and pass it in")

    def params(self) -> dict[str, object]:
        return {k: v for k, v in super().params().items() if k != "word_starts"}

    @classmethod
    def from_tokenizer(cls, tokenizer, *, specials: SpecialIds, **params: object) -> "MLM":  # noqa: ANN001
        """An MLM objective whose ``word_starts`` table comes from ``tokenizer`` (built only
        when whole-word masking is asked for)."""
        table = word_start_table(tokenizer, specials.vocab_size) if params.get("whole_word") else None
        return cls(specials=specials, word_starts=table, **params)

    @functools.cached_property
    def _random_ids(self) -> np.ndarray:
        """Ids a random replacement may take: every non-special id of the vocabulary."""
        return np.setdiff1d(np.arange(self.specials.vocab_size), self.specials.all_ids())

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        tokens = rows.tokens
        B, R = tokens.shape
        eligible = ~self.specials.is_special(tokens)  # (B, R) PAD, EOS, ... never selected
        if self.whole_word:
            selected = self._select_words(tokens, eligible, rng)
        else:
            selected = self._select(eligible, rng)
        corrupted = tokens.copy()
        where = np.flatnonzero(selected)  # flat positions of selected tokens
        u = random_u32(rng, where.size)
        to_mask = _below(u, self.replace_mask)
        to_random = ~to_mask & _below(u, self.replace_mask + self.replace_random)
        flat = corrupted.reshape(-1)
        flat[where[to_mask]] = self.specials.mask
        picks = rng.integers(0, self._random_ids.size, size=int(to_random.sum()))
        flat[where[to_random]] = self._random_ids[picks]
        return Features(targets=tokens, target_mask=selected, inputs=corrupted,
                        input_lengths=np.full(B, R, dtype=np.int32))

    def _select(self, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Selection among ``candidates`` (B, W): Bernoulli(mask_rate) or an exact count per row."""
        if self.exact_count:
            sizes = candidates.sum(axis=1, keepdims=True)  # (B, 1)
            counts = np.round(sizes * self.mask_rate).astype(np.int64)
            keys, thresholds = ranked_keys((~candidates).view(np.int8), sizes, counts, rng)
            return in_region(keys, 0, thresholds)
        return candidates & _below(random_u32(rng, candidates.shape), self.mask_rate)

    def _select_words(self, tokens: np.ndarray, eligible: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
        """Select whole words: choose among word starts, then spread to each word's pieces."""
        B, R = tokens.shape
        after_special = np.ones((B, R), dtype=bool)  # a row start counts as "after a special"
        after_special[:, 1:] = ~eligible[:, :-1]
        starts = eligible & (self.word_starts[tokens] | after_special)  # (B, R)
        chosen = self._select(starts, rng)  # (B, R) chosen word starts
        # Each eligible token belongs to the last word start at or before it, in its own row
        # (a row's first eligible token is a start), so a flat running max finds it.
        idx = np.arange(B * R).reshape(B, R)
        owner = np.maximum.accumulate(np.where(starts, idx, 0).reshape(-1))  # (B * R,)
        return eligible & chosen.reshape(-1)[owner].reshape(B, R)
