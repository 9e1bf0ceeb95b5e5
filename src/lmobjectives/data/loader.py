"""The packed, deterministic, resumable loader.

Each epoch is one seeded permutation of the documents, concatenated (each document already
ends in EOS) and cut into rows of ``R`` tokens; the last row of an epoch is padded with PAD.
Row ``i`` of epoch ``e`` covers stream tokens ``[i*R, (i+1)*R)``, found by binary search in
the epoch's cumulative lengths, so any row is computed directly: seeking to step 10^6 costs
one permutation and one cumulative sum (O(n_docs), cached per epoch), never a replay.

Global micro-batch ``g`` holds global rows ``[g*B, (g+1)*B)``. Rank ``r`` of ``W`` processes
serves local micro-batches ``c = 0, 1, ...`` as global micro-batches ``g = c*W + r``: so with
``A`` accumulation steps, rank ``r``'s micro-batch ``j`` of step ``s`` is global micro-batch
``(s*A + j)*W + r`` — exactly micro-batch ``j*W + r`` of step ``s`` of one process running
``A*W`` accumulation steps. The state is the counter ``c``.

Worked example (R = 4, EOS = 0, PAD = 1, one epoch, documents [5 6 0], [7 0], [8 9 9 0]
in permuted order 2, 0, 1)::

    stream    = 8 9 9 0 | 5 6 0 7 | 0 1 1 1
    positions = 0 1 2 3 | 0 1 2 0 | 0 0 0 0    (restart at each document and each row)

Positions restart at a row's start even inside a document, so a model never sees a
position it was not trained on, whatever the document lengths.

Mixing several sources serves row ``k`` from the source with the largest deficit
``(k+1)*w_i - served_i`` (a deterministic stride schedule, period ``MIX_PERIOD`` rows), so
in every prefix each source's count is within one row of ``w_i * k``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmobjectives.objectives.base import Rows
from lmobjectives.store.store import DocTable

MIX_PERIOD = 1000  # rows; weights are served exactly over each period


@dataclass
class PackedSource:
    """Rows of one document table, by global row index."""

    table: DocTable
    row_len: int
    seed: int
    pad: int
    shuffle: bool = True
    _epoch: int = field(default=-1, init=False, repr=False)
    _order: np.ndarray = field(default=None, init=False, repr=False)  # type: ignore[assignment]
    _cum: np.ndarray = field(default=None, init=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.total = int(self.table.lengths.sum())
        if self.total == 0:
            raise ValueError("a source needs at least one token")
        self.rows_per_epoch = -(-self.total // self.row_len)

    def _use_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        n = len(self.table.docs)
        if self.shuffle:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            self._order = np.arange(n)
        self._cum = np.concatenate([[0], np.cumsum(self.table.lengths[self._order])])
        self._epoch = epoch

    def rows(self, ks: np.ndarray) -> Rows:
        """Rows ``ks``. Consecutive rows of one epoch are one contiguous stretch of the
        epoch's stream: it is built from one slice per document it overlaps and cut into
        rows, so the cost is a few vector passes plus one slice per document."""
        ks = np.asarray(ks, dtype=np.int64)
        B, R = len(ks), self.row_len
        tokens = np.empty((B, R), dtype=np.int32)
        positions = np.empty((B, R), dtype=np.int32)
        epochs, within = np.divmod(ks, self.rows_per_epoch)
        breaks = np.flatnonzero((np.diff(within) != 1) | (np.diff(epochs) != 0)) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, B]):
            self._use_epoch(int(epochs[lo]))
            self._stretch(int(within[lo]), int(hi - lo), tokens[lo:hi], positions[lo:hi])
        return Rows(tokens=tokens, positions=positions)

    def _stretch(self, first_row: int, n_rows: int, tokens: np.ndarray, positions: np.ndarray) -> None:
        """Fill ``n_rows`` consecutive rows starting at ``first_row`` of the current epoch."""
        R, cum = self.row_len, self._cum
        lo = first_row * R
        hi = min(lo + n_rows * R, self.total)
        d0 = int(np.searchsorted(cum, lo, side="right")) - 1
        d1 = int(np.searchsorted(cum, hi - 1, side="right")) - 1
        pieces = []
        for d in range(d0, d1 + 1):
            shard, start, _ = self.table.docs[self._order[d]]
            a, b = max(int(cum[d]), lo) - int(cum[d]), min(int(cum[d + 1]), hi) - int(cum[d])
            pieces.append(self.table.shards[shard][start + a:start + b])
        n = hi - lo
        flat_tok, flat_pos = tokens.reshape(-1), positions.reshape(-1)
        flat_tok[:n] = np.concatenate(pieces)
        flat_tok[n:] = self.pad  # the epoch's last row is padded
        # Positions restart at each document start and each row start.
        starts = np.zeros(n, dtype=bool)
        starts[::R] = True
        starts[cum[d0 + 1:d1 + 1] - lo] = True
        idx = np.arange(n, dtype=np.int32)
        flat_pos[:n] = idx - np.maximum.accumulate(np.where(starts, idx, 0))
        flat_pos[n:] = 0


def period_counts(weights: list[float], period: int = MIX_PERIOD) -> np.ndarray:
    """Rows per source in one period: shares rounded to 1/period by largest remainder."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * period
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[: period - counts.sum()]] += 1
    return counts


def mix_schedule(weights: list[float], period: int = MIX_PERIOD) -> np.ndarray:
    """Source of each row in one period: the source furthest behind its share goes next.
    Shares are rounded to 1/period so that every period serves them exactly and the
    schedule can repeat without drift."""
    w = period_counts(weights, period) / period
    served = np.zeros(len(w))
    out = np.empty(period, dtype=np.int64)
    for k in range(period):
        i = int(np.argmax((k + 1) * w - served))
        out[k] = i
        served[i] += 1
    return out


class Loader:
    """Serves ``Rows`` micro-batches from one or several weighted sources; resumable."""

    def __init__(self, sources: list[PackedSource], weights: list[float] | None = None, *,
                 batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not sources:
            raise ValueError("a loader needs a source")
        if len({s.row_len for s in sources}) != 1:
            raise ValueError("all sources must have the same row length")
        self.sources = sources
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.schedule = mix_schedule(weights or [1.0] * len(sources))
        self.weights = period_counts(weights or [1.0] * len(sources)) / MIX_PERIOD  # as served
        # served[i, k]: rows of source i among the first k rows of a period.
        onehot = self.schedule[None, :] == np.arange(len(sources))[:, None]
        self._served = np.concatenate([np.zeros((len(sources), 1), np.int64),
                                       np.cumsum(onehot, axis=1)], axis=1)
        self.counter = 0

    def _source_rows(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global rows ``k``: which source serves each, and that source's own row index."""
        period, within = np.divmod(k, len(self.schedule))
        src = self.schedule[within]
        local = period * self._served[src, -1] + self._served[src, within]
        return src, local

    def batch(self, g: int) -> tuple[Rows, np.ndarray]:
        """Global micro-batch ``g``: its rows and the source index of each row."""
        ks = np.arange(g * self.batch_size, (g + 1) * self.batch_size)
        src, local = self._source_rows(ks)
        if len(self.sources) == 1:
            return self.sources[0].rows(local), src
        R = self.sources[0].row_len
        tokens = np.empty((len(ks), R), dtype=np.int32)
        positions = np.empty((len(ks), R), dtype=np.int32)
        for i in np.unique(src):
            sel = src == i
            part = self.sources[i].rows(local[sel])
            tokens[sel], positions[sel] = part.tokens, part.positions
        return Rows(tokens=tokens, positions=positions), src

    def __iter__(self) -> "Loader":
        return self

    def __next__(self) -> tuple[Rows, np.ndarray]:
        out = self.batch(self.counter * self.world_size + self.rank)
        self.counter += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"counter": self.counter, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counter = int(state["counter"])
