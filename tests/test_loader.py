"""The packed loader: exactly-once, in-order, resumable, sharded, mixed."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from lmobjectives.data.loader import Loader, PackedSource, mix_schedule
from lmobjectives.store.store import DocTable

EOS, PAD = 0, 1
R = 8
LENGTHS = [0, 1, R - 1, R, R + 1, 10 * R]


def make_docs(lengths: list[int], start: int = 2) -> list[np.ndarray]:
    """Documents of distinct token values, so every served token names its origin."""
    docs, nxt = [], start
    for n in lengths:
        docs.append(np.arange(nxt, nxt + n) % 60000 + 2)
        nxt += n
    return docs


def epoch_stream(src: PackedSource, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    ks = np.arange(epoch * src.rows_per_epoch, (epoch + 1) * src.rows_per_epoch)
    rows = src.rows(ks)
    return rows.tokens.reshape(-1), rows.positions.reshape(-1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(LENGTHS), min_size=1, max_size=12), st.integers(0, 2**16), st.integers(0, 3))
def test_every_token_once_per_epoch_in_order(lengths, seed, epoch):
    docs = make_docs(lengths)
    src = PackedSource(DocTable.from_documents(docs, EOS), R, seed=seed, pad=PAD)
    tokens, positions = epoch_stream(src, epoch)
    real = tokens[tokens != PAD]
    # Split the served stream back into documents at EOS: each document once, in order.
    pieces = np.split(real, np.flatnonzero(real == EOS) + 1)[:-1]
    served = sorted(tuple(p[:-1].tolist()) for p in pieces)
    assert served == sorted(tuple(d.tolist()) for d in docs)
    # Padding only at the very end of the epoch.
    n_real = len(real)
    assert (tokens[:n_real] != PAD).all() and (tokens[n_real:] == PAD).all()
    assert n_real == sum(lengths) + len(lengths)
    # Positions count up inside a document, restarting at documents and rows.
    rows_tok = tokens.reshape(-1, R)
    rows_pos = positions.reshape(-1, R)
    for row_t, row_p in zip(rows_tok, rows_pos):
        assert row_p[0] == 0
        for i in range(1, R):
            if row_t[i] == PAD:
                assert row_p[i] == 0
            elif row_t[i - 1] == EOS:
                assert row_p[i] == 0
            else:
                assert row_p[i] == row_p[i - 1] + 1


def test_epochs_are_permuted_differently():
    docs = make_docs([3] * 30)
    src = PackedSource(DocTable.from_documents(docs, EOS), R, seed=0, pad=PAD)
    assert not np.array_equal(epoch_stream(src, 0)[0], epoch_stream(src, 1)[0])
    again = PackedSource(DocTable.from_documents(docs, EOS), R, seed=0, pad=PAD)
    assert np.array_equal(epoch_stream(src, 1)[0], epoch_stream(again, 1)[0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(LENGTHS), min_size=1, max_size=10), st.integers(0, 40), st.integers(1, 4))
def test_resume_gives_identical_remaining_stream(lengths, cut, batch):
    table = DocTable.from_documents(make_docs(lengths), EOS)
    a = Loader([PackedSource(table, R, seed=3, pad=PAD)], batch_size=batch)
    full = [next(a)[0].tokens for _ in range(cut + 5)]
    b = Loader([PackedSource(table, R, seed=3, pad=PAD)], batch_size=batch)
    for _ in range(cut):
        next(b)
    state = b.state_dict()
    c = Loader([PackedSource(table, R, seed=3, pad=PAD)], batch_size=batch)
    c.load_state_dict(state)
    rest = [next(c)[0].tokens for _ in range(5)]
    for x, y in zip(full[cut:], rest):
        assert np.array_equal(x, y)


def test_seek_far_is_direct():
    table = DocTable.from_documents(make_docs([5] * 100), EOS)
    loader = Loader([PackedSource(table, R, seed=1, pad=PAD)], batch_size=4)
    loader.load_state_dict({"counter": 10**6})
    rows, _ = next(loader)  # no replay: this returns at once
    src = PackedSource(table, R, seed=1, pad=PAD)
    expect = src.rows(np.arange(10**6 * 4, 10**6 * 4 + 4))
    assert np.array_equal(rows.tokens, expect.tokens)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3))
def test_rank_r_sees_micro_batch_r_of_accumulation(world, accum):
    table = DocTable.from_documents(make_docs([7, 13, 2, 30, 9, 1] * 5), EOS)
    single = Loader([PackedSource(table, R, seed=5, pad=PAD)], batch_size=2)
    ranks = [Loader([PackedSource(table, R, seed=5, pad=PAD)], batch_size=2, rank=r, world_size=world)
             for r in range(world)]
    for _step in range(3):
        singles = [next(single)[0].tokens for _ in range(world * accum)]
        for j in range(accum):
            for r in range(world):
                assert np.array_equal(next(ranks[r])[0].tokens, singles[j * world + r])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4), st.integers(0, 3000), st.integers(1, 500))
def test_mixing_shares_within_one_row(weights, start, window):
    tables = [DocTable.from_documents(make_docs([11] * 20, start=1000 * i + 2), EOS) for i in range(len(weights))]
    loader = Loader([PackedSource(t, R, seed=i, pad=PAD) for i, t in enumerate(tables)],
                    list(weights), batch_size=1)
    w = loader.weights  # the shares rounded to 1/1000, as served
    assert np.allclose(w, np.asarray(weights) / sum(weights), atol=1e-3)
    src, _ = loader._source_rows(np.arange(start + window))
    # Every prefix is within one row of its share.
    for i in range(len(w)):
        counts = np.cumsum(src == i)
        k = np.arange(1, len(src) + 1)
        assert np.all(np.abs(counts - w[i] * k) <= 1.0 + 1e-6)
    if len(w) == 2:  # two sources: every window, not just prefixes, is within one row
        window_counts = (src[start:] == 0).sum()
        assert abs(window_counts - w[0] * window) <= 1.0 + 1e-6


def test_mixed_rows_come_from_each_source_in_their_own_order():
    tables = [DocTable.from_documents(make_docs([5] * 10, start=100 * (i + 1)), EOS) for i in range(2)]
    srcs = [PackedSource(t, R, seed=i, pad=PAD) for i, t in enumerate(tables)]
    loader = Loader(srcs, [0.8, 0.2], batch_size=10)
    rows, src = next(loader)
    assert (src == 0).sum() == 8 and (src == 1).sum() == 2
    own = [PackedSource(t, R, seed=i, pad=PAD) for i, t in enumerate(tables)]
    got = {0: [], 1: []}
    for b, s in enumerate(src):
        got[int(s)].append(rows.tokens[b])
    for s in (0, 1):
        expect = own[s].rows(np.arange(len(got[s]))).tokens
        assert np.array_equal(np.stack(got[s]), expect)


def test_schedule_is_exact_over_a_period():
    sched = mix_schedule([0.8, 0.2], period=1000)
    assert (sched == 0).sum() == 800
