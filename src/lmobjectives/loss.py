"""Token cross-entropy outside the model, as a *sum* over scored tokens.

The train loop divides by the number of scored tokens in the whole optimizer step (every
micro-batch, every rank), so gradient accumulation and data parallelism give the same update
as one big batch (the torchtitan rule). Computing in float32 keeps the sum exact enough for
bit-identical resumes whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def scored(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the scored positions only: (N, V) and (N,).

    With ``shift`` (decoders, HF convention) position t's logits score ``labels[t + 1]``.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    keep = labels != IGNORE  # (B, T')
    return logits[keep], labels[keep]


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of negative log-likelihoods, number of correct top-1 predictions)."""
    flat_logits, flat_labels = scored(logits, labels, shift)  # (N, V), (N,)
    nll = F.cross_entropy(flat_logits.float(), flat_labels, reduction="sum")
    correct = (flat_logits.argmax(-1) == flat_labels).sum()
    return nll, correct
