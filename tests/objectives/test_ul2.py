"""UL2: every row reconstructs under its own denoiser, mode tokens match, per-denoiser counts
follow T5's formulas, the mixture follows ``rates``, lengths fit, seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmobjectives.data.converters import IGNORE, to_encoder_decoder, to_prefix_lm
from lmobjectives.errors import UserError
from lmobjectives.objectives import build_objective
from lmobjectives.objectives.noise import noise_counts
from lmobjectives.objectives.span import denoise
from lmobjectives.objectives.ul2 import DENOISERS, UL2

from rows_util import SP, make_rows

MODE = {"R": SP.nlu, "X": SP.nlg, "S": SP.s2s}


def reconstruct(inputs: list[int], targets: list[int]) -> tuple[list[int], int]:
    """Undo span corruption (sentinels in order on both sides); returns (row, number of spans)."""
    index = {s: i for i, s in enumerate(SP.sentinels)}
    spans: list[list[int]] = []
    for tok in targets:
        if tok in index:
            assert index[tok] == len(spans)
            spans.append([])
        else:
            spans[-1].append(tok)
    out, used = [], 0
    for tok in inputs:
        if tok in index:
            assert index[tok] == used
            out.extend(spans[used])
            used += 1
        else:
            out.append(tok)
    assert used == len(spans)
    return out, used


def test_docstring_example():
    tokens = np.array([[21, 22, 23, 24, 25, 26], [31, 32, 33, 34, 35, 36]], dtype=np.int32) + 200
    noise = np.array([[0, 0, 0, 0, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=bool)
    out = denoise(tokens, noise, SP, sentinels=np.array([True, False]),
                  close_with_eos=np.array([True, False]), mode_tokens=np.array([SP.nlu, SP.s2s]))
    p, s0, e = SP.pad, SP.sentinels[0], SP.eos
    assert out.inputs.tolist() == [[SP.nlu, 221, 222, 223, 224, 225, s0, e],
                                   [SP.s2s, 231, 232, p, p, p, p, p]]
    assert out.targets.tolist() == [[s0, 226, e, p], [233, 234, 235, 236]]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 8), seq_len=st.integers(8, 160),
       data=st.data())
def test_every_row_reconstructs_under_its_denoiser(seed, batch, seq_len, data):
    obj = UL2(specials=SP)
    R = obj.row_length(seq_len)
    pads = data.draw(st.lists(st.integers(0, R), min_size=batch, max_size=batch))
    rows = make_rows(seed, batch, R, pads)
    f = obj(rows, np.random.default_rng(seed))
    which = f.extras["denoiser"]
    assert which.shape == (batch,) and f.inputs.shape[1] <= seq_len
    assert f.targets.shape[1] <= obj.target_length(seq_len)
    for b in range(batch):
        d = DENOISERS[which[b]]
        n = R - pads[b]
        n_in, n_tg = int(f.input_lengths[b]), int(f.target_lengths[b])
        inputs, targets = f.inputs[b, :n_in].tolist(), f.targets[b, :n_tg].tolist()
        assert inputs[0] == MODE[d.mode]
        assert set(f.inputs[b, n_in:].tolist()) <= {SP.pad}
        assert set(f.targets[b, n_tg:].tolist()) <= {SP.pad}
        assert f.target_mask[b].tolist() == [t < n_tg for t in range(f.targets.shape[1])]
        original = rows.tokens[b, :n].tolist()
        if d.is_prefix_lm:
            assert inputs[1:] + targets == original
            assert (1 <= n_in - 1 <= n - 1) if n >= 2 else n_tg == 0
        else:
            assert inputs[-1] == SP.eos and targets[-1] == SP.eos
            restored, spans = reconstruct(inputs[1:-1], targets[:-1])
            assert restored == original
            noise, want_spans = (int(x[0]) for x in
                                 noise_counts(np.array([n]), d.noise_density, d.mean_span))
            assert spans == want_spans and n_tg == noise + spans + 1


def test_mixture_follows_rates():
    rows = make_rows(0, 4000, 40, [0] * 4000)
    f = UL2(specials=SP)(rows, np.random.default_rng(0))
    counts = np.bincount(f.extras["denoiser"], minlength=7)
    sigma = np.sqrt(4000 / 7 * 6 / 7)
    assert (np.abs(counts - 4000 / 7) < 5 * sigma).all()
    obj = UL2(specials=SP, rates=[3, 0, 0, 0, 0, 0, 1])
    counts = np.bincount(obj(rows, np.random.default_rng(1)).extras["denoiser"], minlength=7)
    assert counts[1:6].sum() == 0 and abs(counts[0] - 3000) < 5 * np.sqrt(4000 * 0.75 * 0.25)


def test_long_and_dense_denoisers_corrupt_what_they_promise():
    rows = make_rows(1, 700, 512, [0] * 700)
    f = UL2(specials=SP)(rows, np.random.default_rng(1))
    for k, d in enumerate(DENOISERS):
        picked = f.extras["denoiser"] == k
        assert picked.any()
        if d.is_prefix_lm:
            continue
        n_sent = np.isin(f.targets[picked], SP.sentinels).sum(1)
        noise = f.target_lengths[picked] - n_sent - 1
        assert (noise == round(512 * d.noise_density)).all()
        assert (n_sent == max(round(noise[0] / d.mean_span), 1)).all()


def test_lengths():
    obj = UL2(specials=SP)
    assert obj.row_length(512) == 512  # S can take the whole row as prefix
    assert obj.target_length(512) == 511
    spans_only = UL2(specials=SP, rates=[1, 1, 1, 1, 1, 1, 0])
    R = spans_only.row_length(512)
    assert R > 512
    rows = make_rows(2, 200, R, [0] * 200)
    f = spans_only(rows, np.random.default_rng(2))
    assert f.input_lengths.max() == 512  # R (mean span 3), the densest inputs, fills it
    assert f.target_lengths.max() <= spans_only.target_length(512)


def test_converters_accept_ul2_features():
    obj = UL2(specials=SP)
    rows = make_rows(3, 6, obj.row_length(64), [0, 0, 0, 0, 0, 30])
    f = obj(rows, np.random.default_rng(3))
    ed = to_encoder_decoder(f, SP)
    assert ((ed["labels"] != IGNORE).sum(1) == f.target_lengths).all()
    pl = to_prefix_lm(f, SP)
    assert ((pl["labels"] != IGNORE).sum(1) == f.target_lengths).all()


def test_deterministic_for_a_seed():
    obj = UL2(specials=SP)
    rows = make_rows(4, 16, obj.row_length(128), [0] * 16)
    before = rows.tokens.copy()
    a, b = obj(rows, np.random.default_rng(9)), obj(rows, np.random.default_rng(9))
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
    assert np.array_equal(a.extras["denoiser"], b.extras["denoiser"])
    assert np.array_equal(rows.tokens, before)  # the rows are not modified


def test_errors():
    with pytest.raises(ValueError, match="7 weights"):
        UL2(specials=SP, rates=(1.0, 1.0))
    with pytest.raises(ValueError, match="not all zero"):
        UL2(specials=SP, rates=(0,) * 7)
    with pytest.raises(UserError, match="bad parameters"):
        build_objective("ul2", {"rates": [-1, 1, 1, 1, 1, 1, 1]}, SP)
    # X (mean span 3, density 0.5) needs > 100 sentinels on rows of 1024 tokens.
    with pytest.raises(ValueError, match=r"X\(mean span 3, density 0.5\).*rate to 0"):
        UL2(specials=SP).row_length(1024)
    assert UL2(specials=SP, rates=[1, 1, 0, 1, 1, 1, 1]).row_length(1024) == 1024
    assert UL2(specials=SP, rates=[1, 1, 0, 1, 1, 1, 1]).params() == {
        "rates": (1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0)}
