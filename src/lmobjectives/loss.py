"""Token cross-entropy outside the model, as a *sum* over scored tokens.

The train loop divides by the number of scored tokens in the whole optimizer step (every
micro-batch, every rank), so gradient accumulation and data parallelism give the same update
as one big batch (the torchtitan rule). Computing in float32 keeps the sum exact enough for
bit-identical resumes whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmobjectives.objectives.base import IGNORE


def aligned_labels(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Labels aligned with the logits: with ``shift`` (decoders, HF convention) position t's
    logits score ``labels[t + 1]``; the last position scores nothing. Shifting the labels
    rather than slicing the logits keeps the (B, T, V) logits contiguous: no copy."""
    if not shift:
        return labels
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of negative log-likelihoods, number of correct top-1 predictions) over scored tokens."""
    V = logits.shape[-1]
    target = aligned_labels(labels, shift).reshape(-1)  # (B*T,)
    flat = logits.reshape(-1, V)  # (B*T, V), a view
    keep = target != IGNORE
    if int(keep.sum()) * 2 < target.numel():
        # Sparse targets (MLM, padded seq2seq): score only the selected rows.
        flat, target = flat[keep], target[keep]  # (N, V), (N,)
        keep = torch.ones_like(target, dtype=torch.bool)
    nll = F.cross_entropy(flat.float(), target, ignore_index=IGNORE, reduction="sum")
    return nll, top1_correct(flat.detach(), target, keep)


def top1_correct(flat: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Scored rows whose target logit is the largest. Comparing with ``amax`` instead of
    taking ``argmax``: on CPU ``argmax`` over (N, V) is an unvectorised pass as costly as a
    third of the cross-entropy (0.10 s vs 0.003 s for 2,048 x 8,192, one thread, measured),
    ``amax`` a vectorised reduction. A tie for the maximum counts as correct."""
    safe = torch.where(keep, target, 0)  # (N,), ignored rows point at any valid id
    hit = flat.gather(1, safe[:, None]).squeeze(1) >= flat.amax(-1)  # (N,)
    return (hit & keep).sum()
