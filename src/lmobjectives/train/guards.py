"""Loss guards of the train step: a non-finite loss or gradient is never applied, and a loss
spike (a z-score over a window of recent losses) is logged or skipped (``train.spike_action``).
"""

from __future__ import annotations

import math
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

    def verdict(self, record: dict, zscore: float, action: str) -> str | None:
        """Why this step's update is skipped (non-finite, spike), or None; marks a spike's
        z-score in ``record`` and keeps the window of recent good losses."""
        loss, grad_norm = record["loss"], record["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.bad_in_row += 1
            return "non-finite"
        self.bad_in_row = 0
        skip = None
        z = self.spike(loss, zscore)
        if z is not None:
            record["spike"] = round(z, 2)
            if action == "skip":
                skip = "spike"
        if skip is None:
            self.recent.append(loss)
        return skip
