"""Prefix LM: the prefix-LM batch reads back the original row, labels cover the suffix only,
split points are uniform over [1, n - 1], PAD tails are respected, seeds reproduce."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lmobjectives.data.converters import IGNORE, to_prefix_lm
from lmobjectives.objectives import build_objective
from lmobjectives.objectives.prefix import PrefixLM, random_split_points, split_rows

from rows_util import SP, make_rows


def test_docstring_example():
    # PAD = 1 in the docstring; here the real PAD id, and EOS 0.
    pad = SP.pad
    tokens = np.array([[5, 6, 0, 7, 8], [9, 4, 0, pad, pad]], dtype=np.int32)
    inputs, targets = split_rows(tokens, np.array([5, 3]), np.array([2, 1]), pad)
    assert inputs.tolist() == [[5, 6], [9, pad]]
    assert targets.tolist() == [[0, 7, 8], [4, 0, pad]]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), batch=st.integers(1, 6), length=st.integers(2, 50),
       data=st.data())
def test_prefix_lm_batch_reads_back_the_row(seed, batch, length, data):
    pads = data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    rows = make_rows(seed, batch, length, pads)
    f = PrefixLM(specials=SP)(rows, np.random.default_rng(seed))
    out = to_prefix_lm(f, SP)
    for b in range(batch):
        n = length - pads[b]
        p = int(f.input_lengths[b])
        assert (1 <= p <= n - 1) if n >= 2 else p == n
        assert int(f.target_lengths[b]) == n - p
        assert out["input_ids"][b, :n].tolist() == rows.tokens[b, :n].tolist()
        scored = out["labels"][b] != IGNORE
        assert scored.tolist() == [p <= t < n for t in range(out["labels"].shape[1])]
        assert out["labels"][b, p:n].tolist() == rows.tokens[b, p:n].tolist()
        # The prefix sees itself both ways; the suffix is causal.
        att = out["attention_mask"][b, 0]
        assert att[:p, :p].all()
        if n - p >= 2:
            assert not att[p, p + 1]


def test_split_is_uniform():
    split = random_split_points(np.full(8000, 5), np.random.default_rng(0))
    counts = Counter(split.tolist())
    assert sorted(counts) == [1, 2, 3, 4]
    sigma = np.sqrt(8000 * 0.25 * 0.75)
    assert all(abs(c - 2000) < 5 * sigma for c in counts.values())


def test_deterministic_for_a_seed():
    rows = make_rows(1, 16, 64, [0] * 16)
    before = rows.tokens.copy()
    obj = build_objective("prefix", {}, SP)
    a, b = obj(rows, np.random.default_rng(3)), obj(rows, np.random.default_rng(3))
    c = obj(rows, np.random.default_rng(4))
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.input_lengths, c.input_lengths)
    assert obj.params() == {} and obj.row_length(64) == 64

    assert np.array_equal(rows.tokens, before)  # the rows are not modified