"""MDLM transform: masking rate tracks t, specials and PAD never masked, weights exactly 1/t,
t spread over (eps, 1] by the low-discrepancy sampler, determinism, and the batches it makes
(documents blocked, labels aligned, weights carried)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lmobjectives.data.converters import CONVERTERS, IGNORE
from lmobjectives.objectives import build_objective
from lmobjectives.objectives.base import Rows
from lmobjectives.objectives.mdlm import MDLM, diffusion_times

from rows_util import SP, make_rows


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 6), length=st.integers(1, 64),
       low=st.booleans(), data=st.data())
def test_only_non_special_tokens_masked_and_weights_are_one_over_t(seed, batch, length, low, data):
    pads = data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    rows = make_rows(seed, batch, length, pads)
    f = MDLM(specials=SP, low_discrepancy=low)(rows, np.random.default_rng(seed))
    t = f.extras["t"]
    special = SP.is_special(rows.tokens)
    masked = f.inputs == SP.mask
    assert np.array_equal(f.inputs[~masked], rows.tokens[~masked])  # the rest is carried over
    assert not (masked & special).any()  # EOS and PAD are never masked
    assert np.array_equal(f.targets, rows.tokens)
    assert np.array_equal(f.target_mask, ~special)  # every non-special token is scored
    assert np.array_equal(f.positions, rows.positions)
    assert ((t > 1e-3) & (t <= 1.0)).all()
    expected = np.where(masked, (1.0 / t)[:, None], 0.0).astype(np.float32)
    assert np.array_equal(f.loss_weights, expected)  # exactly 1/t on masked, 0 elsewhere


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), t=st.floats(0.01, 1.0))
def test_masking_rate_tracks_t(seed, t):
    rows = make_rows(seed, 8, 256, [0] * 8)
    obj = MDLM(specials=SP)
    f = obj.at_times(rows, np.full(8, t), np.random.default_rng(seed))
    eligible = ~SP.is_special(rows.tokens)
    n, k = int(eligible.sum()), int((f.inputs == SP.mask).sum())
    assert abs(k - n * t) <= 5 * np.sqrt(n * t * (1 - t)) + 1  # binomial, 5 sigma


def test_low_discrepancy_times_cover_the_interval_evenly():
    rng = np.random.default_rng(0)
    for batch in (1, 4, 16):
        t = np.sort(diffusion_times(batch, rng, eps=1e-3))
        gaps = np.diff(t)
        assert np.allclose(gaps, (1 - 1e-3) / batch)  # one per stratum of width (1-eps)/B
    # Marginally uniform: the mean over many batches is (1 + eps) / 2.
    many = np.concatenate([diffusion_times(4, rng) for _ in range(4000)])
    assert abs(many.mean() - (1 + 1e-3) / 2) < 0.01


def test_same_seed_same_features_other_seed_other_masks():
    rows = make_rows(3, 4, 128, [0, 5, 0, 128])
    obj = MDLM(specials=SP)
    a, b = obj(rows, np.random.default_rng([7, 1])), obj(rows, np.random.default_rng([7, 1]))
    c = obj(rows, np.random.default_rng([7, 2]))
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.loss_weights, b.loss_weights)
    assert not np.array_equal(a.inputs, c.inputs)


def test_worked_example_and_batches():
    rows = Rows.from_tokens(np.array([[150, 151, SP.eos, 153, 154, SP.eos, SP.pad]]), SP.eos)
    f = MDLM(specials=SP).at_times(rows, np.array([1.0]), np.random.default_rng(0))
    assert f.inputs.tolist() == [[SP.mask, SP.mask, SP.eos, SP.mask, SP.mask, SP.eos, SP.pad]]
    for arch in MDLM.architectures:
        batch = CONVERTERS[arch](f, SP)
        assert batch["labels"].tolist() == [[150, 151, IGNORE, 153, 154, IGNORE, IGNORE]]
        assert batch["loss_weights"].tolist() == [[1, 1, 0, 1, 1, 0, 0]]
        assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0]]
        seen = batch["attention_mask"][0, 0]  # (T, T): documents blocked, PAD never seen
        assert seen[0].tolist() == [1, 1, 1, 0, 0, 0, 0]
        assert seen[4].tolist() == [0, 0, 0, 1, 1, 1, 0]
        assert seen[:, 6].tolist() == [0, 0, 0, 0, 0, 0, 1]


def test_parameters_validated_and_built_by_name():
    obj = build_objective("mdlm", {"eps": 0.01}, SP)
    assert obj.params() == {"eps": 0.01, "low_discrepancy": True}
    assert obj.suppressed_ids() == (SP.mask,)
    import pytest

    from lmobjectives.errors import UserError

    with pytest.raises(UserError, match="eps"):
        build_objective("mdlm", {"eps": 0.0}, SP)
