"""Learning-rate schedules as pure functions of the step (so resuming needs only the step).

* cosine: linear warmup to the peak, cosine decay to ``min_lr_ratio`` × peak.
* WSD (warmup-stable-decay, MiniCPM §4): warmup, a constant peak, then a linear decay over
  the last ``decay_fraction`` of steps (MiniCPM uses ~10%) to ``min_lr_ratio`` × peak.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, total: int, peak: float, warmup: int, schedule: str,
          min_ratio: float, decay_fraction: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    floor = peak * min_ratio
    if schedule == "cosine":
        span = max(total - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(round(total * decay_fraction), 1)
    decay_start = total - decay_steps
    if step < decay_start:
        return peak
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return peak - (peak - floor) * progress
