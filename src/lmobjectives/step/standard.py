"""The step's model side: how a batch becomes a loss and gradients.

The loop hands every micro-batch to ``forward_backward`` with the step's global number of
scored tokens per loss term; the module returns sums for logging. A module may have several
loss terms (multi-token prediction has one per depth); the standard module has one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from lmobjectives.data.converters import CAUSAL_SHIFT, IGNORE
from lmobjectives.loss import chunked_nll_sum, resolve_chunks, token_nll_sum
from lmobjectives.models.output import output_projection, projection_removed
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
        per-term ``nll`` and ``correct`` sums (detached)."""


class StandardModule:
    """One loss term: cross-entropy of the model's logits against ``labels``."""

    terms = ("loss",)

    def __init__(self, model: torch.nn.Module, architecture: str, bf16: bool = False,
                 loss_chunks: int | str = 1) -> None:
        self.model = model
        self.shift = CAUSAL_SHIFT[architecture]
        self.bf16 = bf16
        self.loss_chunks = loss_chunks

    def counts(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        labels = batch["labels"][:, 1:] if self.shift else batch["labels"]
        return np.array([(labels != IGNORE).sum()], dtype=np.int64)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in MODEL_KEYS}
        device = next(self.model.parameters()).device
        with autocast(device, self.bf16):
            return self.model(**inputs).logits  # (B, T, V)

    def score(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(nll sum, correct count) of a batch, in one piece or chunk by chunk."""
        labels = batch["labels"]
        vocab = output_projection(self.model).out_features
        chunks = resolve_chunks(self.loss_chunks, labels.numel(), vocab)
        if chunks == 1:
            return token_nll_sum(self.logits(batch), labels, self.shift)
        device = labels.device
        with projection_removed(self.model) as head:
            hidden = self.logits(batch)  # (B, T, d): the projection's input
        with autocast(device, self.bf16):
            return chunked_nll_sum(hidden, head.weight, head.bias, labels, self.shift, chunks)

    def forward_backward(self, batch: dict[str, torch.Tensor], totals: torch.Tensor,
                         backward: bool = True) -> dict[str, torch.Tensor]:
        nll, correct = self.score(batch)
        if backward:
            (nll / totals[0].clamp(min=1)).backward()
        return {"nll": nll.detach()[None], "correct": correct.detach()[None]}
