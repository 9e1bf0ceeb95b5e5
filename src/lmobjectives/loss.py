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


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool,
                  weights: torch.Tensor | None = None,
                  suppressed: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of weighted negative log-likelihoods, correct top-1 predictions, predicted tokens)
    over scored tokens. ``weights`` (B, T), aligned with ``labels``, multiply each token's
    loss; a token of weight 0 is scored (the caller's denominator counts it) but adds nothing
    and is not predicted (masked diffusion: an unmasked token carries itself over).
    ``suppressed`` ids get logit −∞ (never predicted)."""
    V = logits.shape[-1]
    target = aligned_labels(labels, shift).reshape(-1)  # (B*T,)
    flat = logits.reshape(-1, V)  # (B*T, V), a view
    keep = target != IGNORE
    w = None
    if weights is not None:
        w = aligned_labels_weights(weights, shift).reshape(-1)  # (B*T,)
        keep = keep & (w != 0)
    if int(keep.sum()) * 2 < target.numel():
        # Sparse targets (MLM, padded seq2seq, diffusion): score only the selected rows.
        flat, target = flat[keep], target[keep]  # (N, V), (N,)
        w = w[keep] if w is not None else None
        keep = torch.ones_like(target, dtype=torch.bool)
    flat = flat.float()
    if suppressed:
        flat = flat.index_fill(-1, torch.as_tensor(suppressed, device=flat.device), float("-inf"))
    if w is None:
        nll = F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum")
    else:
        per_token = F.cross_entropy(flat, torch.where(keep, target, 0), reduction="none")  # (N,)
        nll = torch.where(keep, per_token * w.float(), 0.0).sum()
    correct = ((flat.argmax(-1) == target) & keep).sum()
    return nll, correct, keep.sum()


def aligned_labels_weights(weights: torch.Tensor, shift: bool) -> torch.Tensor:
    """Loss weights shifted like ``aligned_labels`` (0 where the last position scores nothing)."""
    if not shift:
        return weights
    return F.pad(weights[:, 1:], (0, 1), value=0.0)  # (B, T)
