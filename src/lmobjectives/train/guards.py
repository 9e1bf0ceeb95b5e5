"""Loss guards of the train step: a non-finite loss or gradient is never applied, and a loss
spike (a z-score over a window of recent losses) is logged or skipped (``train.spike_action``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GuardState:
    bad_in_row: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=50))

    def spike(self, loss: float, zscore: float) -> float | None:
        """z-score of ``loss`` against the recent window, when the window is full enough."""
        if len(self.recent) < min(10, self.recent.maxlen):
            return None
        arr = np.asarray(self.recent)
        std = float(arr.std())
        z = (loss - float(arr.mean())) / max(std, 1e-6)
        return z if z > zscore else None
