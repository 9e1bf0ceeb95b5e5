"""The optimizer (AdamW) and learning-rate schedules as pure functions of the step (so
resuming needs only the step).

* cosine: linear warmup to the peak, cosine decay to ``min_lr_ratio`` × peak.
* WSD (warmup-stable-decay, MiniCPM §4): warmup, a constant peak, then a linear decay over
  the last ``decay_fraction`` of steps (MiniCPM uses ~10%) to ``min_lr_ratio`` × peak.
"""

from __future__ import annotations

import math

import torch


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


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms and biases (1-D parameters) do not."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
