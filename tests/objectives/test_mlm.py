"""MLM: specials never selected, 15 % / 80-10-10 within binomial bounds, exact counts,
whole-word masking, determinism, and the encoder batch it makes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmobjectives.data.converters import IGNORE, to_encoder
from lmobjectives.errors import UserError
from lmobjectives.objectives import build_objective, objective_class
from lmobjectives.objectives.base import Rows
from lmobjectives.objectives.mlm import MLM
from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds

SP = SpecialIds.default(2048)
FIRST_WORD = len(SPECIAL_TOKENS)


def make_rows(seed: int, batch: int, length: int, pads: list[int] | None = None,
              special_rate: float = 0.1) -> Rows:
    """Word ids with random special tokens sprinkled in; row b ends in ``pads[b]`` PADs."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FIRST_WORD, SP.vocab_size, (batch, length)).astype(np.int32)
    specials = np.asarray(SP.all_ids(), dtype=np.int32)
    where = rng.random((batch, length)) < special_rate
    tokens[where] = rng.choice(specials, size=int(where.sum()))
    for b, n_pad in enumerate(pads or []):
        if n_pad:
            tokens[b, length - n_pad:] = SP.pad
    return Rows.from_tokens(tokens, SP.eos)


def within(count: float, n: int, p: float, sigmas: float = 5.0) -> bool:
    """Binomial(n, p) count within ``sigmas`` standard deviations of its mean."""
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 5), length=st.integers(1, 64),
       exact=st.booleans(), rate=st.sampled_from([0.15, 0.5, 1.0]), data=st.data())
def test_specials_untouched_and_only_selected_changed(seed, batch, length, exact, rate, data):
    pads = data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    rows = make_rows(seed, batch, length, pads, special_rate=0.3)
    f = MLM(specials=SP, mask_rate=rate, exact_count=exact)(rows, np.random.default_rng(seed))
    special = SP.is_special(rows.tokens)
    assert not (f.target_mask & special).any()
    assert np.array_equal(f.inputs[special], rows.tokens[special])  # PAD, EOS, ... untouched
    assert np.array_equal(f.targets, rows.tokens)
    changed = f.inputs != rows.tokens
    assert not (changed & ~f.target_mask).any()
    randomised = changed & (f.inputs != SP.mask)
    assert not SP.is_special(f.inputs[randomised]).any()  # random ids are never specials
    assert f.input_lengths.tolist() == [length] * batch
    if exact:
        eligible = (~special).sum(1)
        assert f.target_mask.sum(1).tolist() == np.round(eligible * rate).astype(int).tolist()
    if rate == 1.0:
        assert np.array_equal(f.target_mask, ~special)


def test_rates_within_binomial_bounds():
    rows = make_rows(0, 64, 512)
    f = MLM(specials=SP)(rows, np.random.default_rng(0))
    eligible = int((~SP.is_special(rows.tokens)).sum())
    selected = int(f.target_mask.sum())
    assert within(selected, eligible, 0.15)
    masked = int((f.inputs[f.target_mask] == SP.mask).sum())
    kept = int((f.inputs[f.target_mask] == rows.tokens[f.target_mask]).sum())
    assert within(masked, selected, 0.8)
    assert within(kept, selected, 0.1 + 0.9 / SP.vocab_size)  # a random id may hit the original
    assert within(selected - masked - kept, selected, 0.1)


def test_custom_replacement_split():
    rows = make_rows(1, 32, 256)
    f = MLM(specials=SP, mask_rate=0.3, replace_mask=0.0, replace_random=1.0)(
        rows, np.random.default_rng(1))
    picked = f.inputs[f.target_mask]
    assert (picked != SP.mask).all()
    assert (picked >= FIRST_WORD).all()  # default specials occupy the first ids
    assert within(int(f.target_mask.sum()), int((~SP.is_special(rows.tokens)).sum()), 0.3)


def test_deterministic_for_a_seed():
    rows = make_rows(2, 4, 100)
    before = rows.tokens.copy()
    obj = MLM(specials=SP)
    a, b = obj(rows, np.random.default_rng(5)), obj(rows, np.random.default_rng(5))
    c = obj(rows, np.random.default_rng(6))
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.target_mask, b.target_mask)
    assert not np.array_equal(a.target_mask, c.target_mask)
    assert np.array_equal(rows.tokens, before)  # the rows are not modified


def test_encoder_batch_scores_selected_only():
    rows = make_rows(3, 2, 50, pads=[0, 10])
    f = MLM(specials=SP)(rows, np.random.default_rng(3))
    batch = to_encoder(f, SP)
    assert np.array_equal(batch["labels"] != IGNORE, f.target_mask)
    assert np.array_equal(batch["labels"][f.target_mask], rows.tokens[f.target_mask])
    assert batch["attention_mask"][1, 40:].sum() == 0


# --------------------------------------------------------------------------- whole words


def word_table(seed: int) -> np.ndarray:
    """A vocabulary where about 40 % of the non-special ids start a word."""
    table = np.random.default_rng(seed).random(SP.vocab_size) < 0.4
    table[:FIRST_WORD] = False
    return table


def words_of(tokens: np.ndarray, table: np.ndarray) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each word, from the definition in the MLM docstring."""
    out = []
    for row in tokens:
        words, start = [], None
        for t, tok in enumerate(row):
            special = tok < FIRST_WORD
            if special or table[tok] or start is None:
                if start is not None:
                    words.append((start, t))
                start = None if special else t
        if start is not None:
            words.append((start, len(row)))
        out.append(words)
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 4), length=st.integers(1, 60),
       exact=st.booleans(), data=st.data())
def test_whole_words_are_selected_together(seed, batch, length, exact, data):
    pads = data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    rows = make_rows(seed, batch, length, pads, special_rate=0.15)
    table = word_table(seed)
    obj = MLM(specials=SP, whole_word=True, exact_count=exact, word_starts=table)
    f = obj(rows, np.random.default_rng(seed))
    assert not (f.target_mask & SP.is_special(rows.tokens)).any()
    for b, words in enumerate(words_of(rows.tokens, table)):
        picked = [bool(f.target_mask[b, s]) for s, _ in words]
        for (s, e), p in zip(words, picked):
            assert f.target_mask[b, s:e].all() == p and f.target_mask[b, s:e].any() == p
        if exact:
            assert sum(picked) == round(len(words) * 0.15)
        covered = sum(e - s for s, e in words)
        assert covered == int((~SP.is_special(rows.tokens[b])).sum())


def test_whole_word_token_rate():
    rows = make_rows(4, 64, 512)
    f = MLM(specials=SP, whole_word=True, word_starts=word_table(4))(rows, np.random.default_rng(4))
    eligible = int((~SP.is_special(rows.tokens)).sum())
    # ~12k words of ~2.5 tokens: the token fraction has a standard deviation of ~0.004.
    assert abs(f.target_mask.sum() / eligible - 0.15) < 0.02


def test_whole_word_needs_a_table():
    with pytest.raises(ValueError, match="word_starts"):
        MLM(specials=SP, whole_word=True)
    with pytest.raises(ValueError, match="shape"):
        MLM(specials=SP, whole_word=True, word_starts=np.ones(7, dtype=bool))
    with pytest.raises(UserError, match="word_starts"):
        build_objective("mlm", {"whole_word": True}, SP)


def test_params_and_validation():
    obj = MLM(specials=SP, whole_word=True, word_starts=word_table(0))
    assert obj.params() == {"mask_rate": 0.15, "replace_mask": 0.8, "replace_random": 0.1,
                            "whole_word": True, "exact_count": False}
    assert hash(obj) == hash(MLM(specials=SP, whole_word=True, word_starts=word_table(1)))
    assert objective_class("mlm") is MLM
    for bad in ({"mask_rate": 0.0}, {"replace_mask": 0.8, "replace_random": 0.3},
                {"replace_random": -0.1}):
        with pytest.raises(ValueError):
            MLM(specials=SP, **bad)
