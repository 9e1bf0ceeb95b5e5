"""T5 span corruption: exact reconstruction, sentinel order, T5's lengths and counts,
uniform span placement, PAD tails, determinism."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmobjectives.data.converters import IGNORE, to_encoder_decoder, to_prefix_lm
from lmobjectives.errors import UserError
from lmobjectives.objectives import build_objective
from lmobjectives.objectives.base import Rows
from lmobjectives.objectives.noise import noise_counts, random_spans_noise_mask, row_counts
from lmobjectives.objectives.span import SpanCorruption, denoise
from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds

SP = SpecialIds.default(1000)
FIRST_WORD = len(SPECIAL_TOKENS)  # ids below are the reserved specials


def make_rows(seed: int, batch: int, length: int, pads: list[int]) -> Rows:
    """Random word ids with an EOS every ~7 tokens; row b ends in ``pads[b]`` PADs."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(FIRST_WORD, SP.vocab_size, (batch, length)).astype(np.int32)
    tokens[rng.random((batch, length)) < 0.15] = SP.eos
    for b, n_pad in enumerate(pads):
        if n_pad:
            tokens[b, length - n_pad:] = SP.pad
    return Rows.from_tokens(tokens, SP.eos)


def spans_capped(n: int, density: float, mean: float) -> bool:
    """Whether T5's span count exceeds the clean tokens at length ``n`` (then capped)."""
    noise = min(max(round(n * density), 1), n - 1)
    return max(round(noise / mean), 1) > n - noise


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """Undo span corruption: each sentinel in the inputs takes the span that follows it in
    the targets. Asserts the sentinels come in order 0, 1, 2, ... on both sides."""
    sentinels = {s: i for i, s in enumerate(SP.sentinels)}
    spans: list[list[int]] = []
    for tok in targets:
        if tok in sentinels:
            assert sentinels[tok] == len(spans), "target sentinels out of order"
            spans.append([])
        else:
            spans[-1].append(tok)
    out: list[int] = []
    used = 0
    for tok in inputs:
        if tok in sentinels:
            assert sentinels[tok] == used, "input sentinels out of order"
            out.extend(spans[used])
            used += 1
        else:
            out.append(tok)
    assert used == len(spans)
    return out


def test_t5_lengths_for_512():
    # T5 en_mix.gin: inputs 512, targets 114 from 568 raw tokens (density 0.15, mean span 3).
    obj = SpanCorruption(specials=SP)
    assert obj.row_length(512) == 568
    assert obj.target_length(512) == 114


def test_docstring_example():
    sp = SpecialIds.default(1000)
    tokens = np.array([[121, 122, 123, 124, 125, 126, 127, 128]], dtype=np.int32)
    noise = np.array([[0, 0, 1, 0, 0, 0, 0, 1]], dtype=bool)
    out = denoise(tokens, noise, sp)
    s0, s1 = sp.sentinels[:2]
    assert out.inputs.tolist() == [[121, 122, s0, 124, 125, 126, 127, s1, sp.eos]]
    assert out.targets.tolist() == [[s0, 123, s1, 128, sp.eos]]
    assert out.input_lengths.tolist() == [9] and out.target_lengths.tolist() == [5]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 6), seq_len=st.integers(3, 120),
       density=st.sampled_from([0.05, 0.15, 0.3, 0.5, 0.8]),
       mean=st.sampled_from([1.0, 2.0, 3.0, 8.0]), data=st.data())
def test_reconstruction_lengths_and_pad(seed, batch, seq_len, density, mean, data):
    obj = SpanCorruption(specials=SP, noise_density=density, mean_span_length=mean)
    R = obj.row_length(seq_len)
    pads = data.draw(st.lists(st.integers(0, R), min_size=batch, max_size=batch))
    rows = make_rows(seed, batch, R, pads)
    f = obj(rows, np.random.default_rng(seed))
    assert f.inputs.shape[0] == batch and f.inputs.shape[1] in (seq_len - 1, seq_len)
    assert f.targets.shape == (batch, obj.target_length(seq_len))
    for b in range(batch):
        n = R - pads[b]
        noise, spans = (int(x[0]) for x in noise_counts(np.array([n]), density, mean))
        n_in, n_tg = int(f.input_lengths[b]), int(f.target_lengths[b])
        assert n_in == n - noise + spans + 1 and n_tg == noise + spans + 1
        if pads[b] == 0:  # a full row fills the inputs exactly, unless spans hit their cap
            capped = spans_capped(R, density, mean) or spans_capped(R + 1, density, mean)
            assert n_in == seq_len or (n_in == seq_len - 1 and capped)
        inputs, targets = f.inputs[b].tolist(), f.targets[b].tolist()
        assert inputs[n_in - 1] == SP.eos and targets[n_tg - 1] == SP.eos
        assert set(inputs[n_in:]) <= {SP.pad} and set(targets[n_tg:]) <= {SP.pad}
        assert f.target_mask[b].tolist() == [t < n_tg for t in range(len(targets))]
        restored = reconstruct(inputs[:n_in - 1], targets[:n_tg - 1])
        assert restored == rows.tokens[b, :n].tolist()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), lengths=st.lists(st.integers(0, 80), min_size=1, max_size=8),
       density=st.floats(0.01, 0.9), mean=st.floats(1.0, 20.0))
def test_mask_structure_matches_t5(seed, lengths, density, mean):
    width = max(lengths) + 3
    n = np.array(lengths)
    mask = random_spans_noise_mask(n, width, density, mean, np.random.default_rng(seed))
    noise, spans = noise_counts(n, density, mean)
    for b, length in enumerate(lengths):
        row = mask[b]
        assert not row[length:].any()
        assert row.sum() == noise[b]
        starts = int((row[1:] & ~row[:-1]).sum() + row[0])
        assert starts == spans[b]
        if length >= 2:
            assert not row[0] and row[length - 1]  # starts clean, ends in noise (T5)


def test_span_placement_is_uniform():
    # n = 10, density 0.3, mean 1.5: 3 noise tokens in 2 spans, 7 clean tokens in 2 pieces:
    # 2 * 6 = 12 masks, each equally likely under T5's segmentation.
    draws = 6000
    mask = random_spans_noise_mask(np.full(draws, 10), 10, 0.3, 1.5, np.random.default_rng(0))
    seen = Counter(map(bytes, mask.astype(np.uint8)))
    assert len(seen) == 12
    expected = draws / 12
    sigma = np.sqrt(draws * (1 / 12) * (11 / 12))
    assert all(abs(c - expected) < 5 * sigma for c in seen.values())
    # Exactly the 12 masks clean(a) noise(b) clean(7 - a) noise(3 - b), a in 1..6, b in 1..2.
    for a, b in itertools.product(range(1, 7), (1, 2)):
        row = [0] * a + [1] * b + [0] * (7 - a) + [1] * (3 - b)
        assert bytes(row) in seen


def test_density_and_mean_span_over_many_rows():
    obj = SpanCorruption(specials=SP)
    R = obj.row_length(512)
    rows = make_rows(1, 64, R, [0] * 64)
    f = obj(rows, np.random.default_rng(1))
    # 568 raw tokens: 85 noise tokens in 28 spans -> 28 sentinels + 85 tokens + EOS = 114.
    assert (f.target_lengths == 114).all()
    is_sentinel = np.isin(f.targets, SP.sentinels)
    assert (is_sentinel.sum(1) == 28).all()
    assert ((f.target_lengths - 1 - is_sentinel.sum(1)) == 85).all()
    # Span lengths: positive, mean exactly 85 / 28, and spread (not all equal).
    lengths = []
    for row in f.targets:
        cuts = np.flatnonzero(np.isin(row, SP.sentinels))
        lengths += np.diff(np.append(cuts, 113)).tolist()
    lengths = np.array(lengths) - 1
    assert lengths.min() >= 1 and abs(lengths.mean() - 85 / 28) < 1e-9 and lengths.max() >= 8


def test_deterministic_for_a_seed():
    obj = SpanCorruption(specials=SP)
    rows = make_rows(3, 8, obj.row_length(64), [0] * 7 + [20])
    before = rows.tokens.copy()
    a = obj(rows, np.random.default_rng(7))
    b = obj(rows, np.random.default_rng(7))
    c = obj(rows, np.random.default_rng(8))
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.inputs, c.inputs)
    assert np.array_equal(rows.tokens, before)  # the rows are not modified


def test_converters_accept_span_features():
    obj = SpanCorruption(specials=SP)
    rows = make_rows(4, 3, obj.row_length(40), [0, 0, 9])
    f = obj(rows, np.random.default_rng(0))
    ed = to_encoder_decoder(f, SP)
    assert ed["attention_mask"].sum(1).tolist() == f.input_lengths.tolist()
    assert ((ed["labels"] != IGNORE).sum(1) == f.target_lengths).all()
    pl = to_prefix_lm(f, SP)
    assert ((pl["labels"] != IGNORE).sum(1) == f.target_lengths).all()


def test_too_many_spans_is_an_error():
    obj = SpanCorruption(specials=SP)
    with pytest.raises(ValueError, match="100 sentinels"):
        obj.row_length(4096)  # 0.05 spans per token -> ~227 spans
    rows = make_rows(0, 1, 2100, [0])
    with pytest.raises(ValueError, match="sentinels"):
        obj(rows, np.random.default_rng(0))


@pytest.mark.parametrize("params", [{"noise_density": 0.0}, {"noise_density": 1.0},
                                    {"mean_span_length": 0.5}])
def test_bad_parameters(params):
    with pytest.raises(ValueError):
        SpanCorruption(specials=SP, **params)
    with pytest.raises(UserError, match="bad parameters for objective 'span'"):
        build_objective("span", params, SP)


def test_tiny_rows():
    obj = SpanCorruption(specials=SP)
    tokens = np.full((3, 2), SP.pad, dtype=np.int32)
    tokens[1, 0] = 500
    tokens[2] = [500, 501]
    f = obj(Rows.from_tokens(tokens, SP.eos), np.random.default_rng(0))
    assert f.inputs.tolist() == [[SP.eos, SP.pad, SP.pad], [500, SP.eos, SP.pad],
                                 [500, SP.sentinels[0], SP.eos]]
    assert f.targets.tolist() == [[SP.eos, SP.pad, SP.pad], [SP.eos, SP.pad, SP.pad],
                                  [SP.sentinels[0], 501, SP.eos]]


def test_scalar_and_vector_counts_agree():
    lengths = np.arange(0, 3000)
    settings_ = [(0.15, 3.0), (0.5, 1.0), (0.5, 3.0), (0.15, 64.0), (0.8, 1.5), (0.05, 8.0)]
    for density, mean in settings_:
        noise, spans = noise_counts(lengths, density, mean)
        pairs = [row_counts(int(n), density, mean) for n in lengths]
        assert [p[0] for p in pairs] == noise.tolist() and [p[1] for p in pairs] == spans.tolist()


def test_span_placement_is_uniform_in_padded_rows():
    # The same 12 masks when the rows sit in a wider, PAD-padded batch (the general path).
    draws = 6000
    lengths = np.full(draws, 10)
    lengths[::2] = 11  # mixed lengths: no shared block of cuts
    mask = random_spans_noise_mask(lengths, 14, 0.3, 1.5, np.random.default_rng(1))
    assert not mask[:, 11:].any()
    seen = Counter(map(bytes, mask[1::2, :10].astype(np.uint8)))
    assert len(seen) == 12
    sigma = np.sqrt(draws / 2 * (1 / 12) * (11 / 12))
    assert all(abs(c - draws / 2 / 12) < 5 * sigma for c in seen.values())
