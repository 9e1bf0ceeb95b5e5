"""The step's model side: how a batch becomes a loss and gradients.

The loop hands every micro-batch to ``forward_backward`` with the step's global number of
scored tokens per loss term; the module returns sums for logging. A module may have several
loss terms (multi-token prediction has one per depth); the standard module has one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from lmobjectives.data.converters import CAUSAL_SHIFT, IGNORE, SCORED_INDEX
from lmobjectives.loss import (aligned_labels, chunked_nll_sum, gather_rows, resolve_chunks,
                               scored_targets, token_nll_sum)
from lmobjectives.models.output import linear_head, output_projection, projection_removed
from lmobjectives.models.presets import forward_inputs
from lmobjectives.runtime import autocast

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "decoder_input_ids",
              "decoder_attention_mask")


class TrainModule(Protocol):
    model: torch.nn.Module
    terms: tuple[str, ...]  # names of loss terms; the first is the headline "loss"

    def counts(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Scored tokens per loss term in a micro-batch, (n_terms,) int64."""

    def forward_backward(self, batch: dict[str, torch.Tensor], totals: torch.Tensor,
                         backward: bool = True) -> dict[str, torch.Tensor]:
        """Add this micro-batch's gradient of sum(loss_term / totals[term]); return
        per-term ``nll`` and ``correct`` sums (detached), and optionally ``predicted``: the
        tokens top-1 accuracy is over, when weights leave some scored tokens unpredicted."""


def sparse_index(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The batch's ``scored_index`` (N,) when fewer than half the positions are scored (the
    choice reads N, a shape, not a value: no host synchronisation); None otherwise."""
    index = batch.get(SCORED_INDEX)
    if index is None or index.shape[0] * 2 >= batch["labels"].numel():
        return None
    return index


class StandardModule:
    """One loss term: cross-entropy of the model's logits against ``labels``."""

    terms = ("loss",)

    def __init__(self, model: torch.nn.Module, architecture: str, bf16: bool = False,
                 loss_chunks: int | str = 1, suppressed: tuple[int, ...] = ()) -> None:
        self.model = model
        self.shift = CAUSAL_SHIFT[architecture]
        self.bf16 = bf16
        self.loss_chunks = loss_chunks
        self.suppressed = tuple(suppressed)  # ids the objective never lets the model predict

    def counts(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        labels = batch["labels"][:, 1:] if self.shift else batch["labels"]
        return np.array([(labels != IGNORE).sum()], dtype=np.int64)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = forward_inputs(self.model, {k: v for k, v in batch.items() if k in MODEL_KEYS})
        device = next(self.model.parameters()).device
        with autocast(device, self.bf16):
            return self.model(**inputs).logits  # (B, T, V)

    def score(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(nll sum, correct count, predicted-token count) of a batch, in one piece or chunk by
        chunk. Weighted or suppressed scoring (masked diffusion) takes the one-piece path: the
        chunked kernel scores plain, unweighted cross-entropy only. With sparse targets the
        head sees the scored positions only (``score_sparse``)."""
        labels = batch["labels"]
        weights = batch.get("loss_weights")
        index = sparse_index(batch)
        if index is not None and linear_head(self.model) is not None:
            return self.score_sparse(batch, index)
        plain = self.loss_chunks == 1 or weights is not None or bool(self.suppressed)
        chunks = 1 if plain else resolve_chunks(self.loss_chunks, labels.numel(),
                                                output_projection(self.model).out_features)
        if chunks == 1:
            # With ``index`` here the model has no Linear head to gather before: all logits,
            # the softmax on the scored rows only.
            return token_nll_sum(self.logits(batch), labels, self.shift, weights=weights,
                                 suppressed=self.suppressed, index=index)
        device = labels.device
        with projection_removed(self.model) as head:
            hidden = self.logits(batch)  # (B, T, d): the projection's input
        with autocast(device, self.bf16):
            nll, correct = chunked_nll_sum(hidden, head.weight, head.bias, labels, self.shift, chunks)
        return nll, correct, (aligned_labels(labels, self.shift) != IGNORE).sum()

    def score_sparse(self, batch: dict[str, torch.Tensor],
                     index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``score`` with the output head applied to the scored positions only (ModernBERT's
        sparse prediction): the hidden states are gathered before the head, so MLM at 15 %
        pays about a sixth of the head's FLOPs. The same sums as the full head, to rounding."""
        labels, weights = batch["labels"], batch.get("loss_weights")
        target, w = scored_targets(labels, self.shift, index, weights)  # (N,) each
        with projection_removed(self.model) as head:
            hidden = gather_rows(self.logits(batch), index)  # (N, d)
        chunks = 1 if w is not None or self.suppressed or self.loss_chunks == 1 else \
            resolve_chunks(self.loss_chunks, target.numel(), head.out_features)
        with autocast(labels.device, self.bf16):
            if chunks > 1:
                nll, correct = chunked_nll_sum(hidden, head.weight, head.bias, target, False, chunks)
                return nll, correct, (target != IGNORE).sum()
            logits = head(hidden)  # (N, V); a call, so the head's hooks see it
        return token_nll_sum(logits, target, False, weights=w, suppressed=self.suppressed)

    def forward_backward(self, batch: dict[str, torch.Tensor], totals: torch.Tensor,
                         backward: bool = True) -> dict[str, torch.Tensor]:
        nll, correct, predicted = self.score(batch)
        if backward:
            (nll / totals[0].clamp(min=1)).backward()
        return {"nll": nll.detach()[None], "correct": correct.detach()[None],
                "predicted": predicted.detach()[None]}
