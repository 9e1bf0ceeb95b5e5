"""Loss by position bucket: is the model good at long positions, not only on average?

A token's position is its offset in its document as the model sees it (``position_ids``,
which restart at every document and every row of a packed batch). Buckets double in width
from a first edge of ``max(16, R // 16)`` up to the row length ``R``, so a context extension
from 4k to 16k shows up as its own bucket (8192-16383) improving, and short contexts still
get a few buckets. Empty buckets are left out.

Worked example, R = 64 (first edge 16)::

    edges   = [0, 16, 32, 64]
    buckets = "0-15", "16-31", "32-63"
    nll of targets at positions [3, 20, 40, 41] = [2.0, 1.0, 0.5, 0.7]
        -> {"0-15": 2.0, "16-31": 1.0, "32-63": 0.6}
"""

from __future__ import annotations

import numpy as np

MIN_FIRST_EDGE = 16


def bucket_edges(row_len: int) -> list[int]:
    first = max(MIN_FIRST_EDGE, row_len // 16)
    edges, e = [0], first
    while e < row_len:
        edges.append(e)
        e *= 2
    edges.append(row_len)
    return edges


class PositionLoss:
    """Accumulates nll sums and counts per bucket over batches."""

    def __init__(self, row_len: int) -> None:
        self.edges = np.asarray(bucket_edges(row_len))
        self.nll = np.zeros(len(self.edges) - 1)
        self.count = np.zeros(len(self.edges) - 1, dtype=np.int64)

    def add(self, positions: np.ndarray, nll: np.ndarray) -> None:
        """``positions`` and ``nll`` of scored targets, flat (N,)."""
        b = np.clip(np.searchsorted(self.edges, positions, side="right") - 1, 0, len(self.count) - 1)
        np.add.at(self.nll, b, nll)
        np.add.at(self.count, b, 1)

    def result(self) -> dict[str, float]:
        out = {}
        for i in range(len(self.count)):
            if self.count[i]:
                out[f"{self.edges[i]}-{self.edges[i + 1] - 1}"] = float(self.nll[i] / self.count[i])
        return out

    def counts(self) -> dict[str, int]:
        return {f"{self.edges[i]}-{self.edges[i + 1] - 1}": int(self.count[i])
                for i in range(len(self.count)) if self.count[i]}
