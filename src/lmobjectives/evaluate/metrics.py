"""Evaluation: the objective's own loss and top-1 accuracy on held-out rows, and
bits-per-byte of left-to-right scoring for models that can score text left to right.

Bits-per-byte = (nats summed over scored tokens) / (UTF-8 bytes those tokens encode) / ln 2.
Special tokens (EOS, PAD, sentinels) encode no bytes and are left out of both sums, so the
number compares across tokenizers and objectives (the nanochat ``evaluate_bpb`` rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmobjectives.data.loader import PackedSource
from lmobjectives.loss import IGNORE, resolve_chunks
from lmobjectives.models.output import output_projection, projection_removed
from lmobjectives.objectives.base import Rows
from lmobjectives.objectives.clm import CLM
from lmobjectives.data.converters import to_decoder
from lmobjectives.runtime import autocast, to_torch
from lmobjectives.step import StandardModule, TrainModule

EVAL_SEED = 1234  # objectives' randomness on validation rows: fixed, so evals compare across steps
LEFT_TO_RIGHT = ("decoder", "prefix_lm")


def token_byte_lengths(tokenizer) -> np.ndarray:  # noqa: ANN001 - tokenizers.Tokenizer
    """UTF-8 bytes each token id stands for under a byte-level BPE; 0 for added (special) tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    out = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for piece, idx in vocab.items():
        if piece in added or idx >= len(out):
            continue
        out[idx] = sum(1 for ch in piece if ch in alphabet) if all(ch in alphabet for ch in piece) \
            else len(piece.encode())
    return out


def val_batches(source: PackedSource, batch_size: int, n_batches: int) -> list[Rows]:
    """The first ``n_batches`` of the (unshuffled) validation split, wrapping if it is short."""
    out = []
    for i in range(n_batches):
        ks = np.arange(i * batch_size, (i + 1) * batch_size) % source.rows_per_epoch
        out.append(source.rows(ks))
    return out


def no_reduce(sums: np.ndarray) -> np.ndarray:
    return sums


def my_share(n: int, share: tuple[int, int]) -> range:
    """Batch indices this process scores when ``share = (rank, world)`` processes split ``n``
    batches: every world-th, so the shares differ by at most one batch. Batch i keeps its own
    seed ``(EVAL_SEED, i)`` whoever scores it, so the summed result equals one process's."""
    rank, world = share
    return range(rank, n, world)


@torch.no_grad()
def objective_eval(spec, rows_list: list[Rows], module: TrainModule,  # noqa: ANN001 - spec.RunSpec
                   device: torch.device, share: tuple[int, int] = (0, 1),
                   reduce: Callable[[np.ndarray], np.ndarray] = no_reduce) -> dict[str, Any]:
    """The objective's loss and top-1 accuracy on ``rows_list`` (its features drawn with a
    fixed seed per batch), scored by ``module`` (the model with its loss, ``step/``). With
    ``share`` this process scores its part of the batches and ``reduce`` sums (nll, correct,
    count, predicted) over the processes (an all-reduce)."""
    nll = correct = count = predicted = 0.0
    was_training = module.model.training
    module.model.eval()
    try:
        for i in my_share(len(rows_list), share):
            rows = rows_list[i]
            features = spec.objective(rows, np.random.default_rng([EVAL_SEED, i]))
            batch = spec.converter(features, spec.specials)
            n = module.counts(batch)
            out = module.forward_backward(to_torch(batch, device),
                                          torch.as_tensor(n, dtype=torch.float32), backward=False)
            nll += float(out["nll"][0])
            correct += float(out["correct"][0])
            count += float(n[0])
            # a weighted loss predicts only its tokens of non-zero weight (masked diffusion)
            predicted += float(out["predicted"][0]) if "predicted" in out else float(n[0])
    finally:
        module.model.train(was_training)
    nll, correct, count, predicted = (float(x) for x in reduce(np.array([nll, correct, count, predicted],
                                                                             dtype=np.float64)))
    loss = nll / max(count, 1)
    return {"loss": loss, "accuracy": correct / max(predicted, 1), "targets": int(count)}


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, rows_list: list[Rows], specials, byte_lengths: np.ndarray,  # noqa: ANN001
                  device: torch.device, bf16: bool = False, by_position: bool = False,
                  share: tuple[int, int] = (0, 1),
                  reduce: Callable[[np.ndarray], np.ndarray] = no_reduce) -> dict[str, Any]:
    """Left-to-right scoring of plain text rows (CLM features) by a decoder; with
    ``by_position`` also the loss per position bucket (``evaluate.positions``). ``share`` and
    ``reduce`` split the batches over processes as in ``objective_eval``."""
    from lmobjectives.evaluate.positions import PositionLoss

    per_pos = PositionLoss(rows_list[0].tokens.shape[1]) if by_position and rows_list else None
    module = StandardModule(model, "decoder", bf16=bf16)
    clm = CLM(specials=specials)
    nats = 0.0
    n_bytes = n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        for i in my_share(len(rows_list), share):
            batch = to_decoder(clm(rows_list[i], np.random.default_rng(0)), specials)
            labels = batch["labels"]
            nbytes = np.where(labels >= 0, byte_lengths[np.maximum(labels, 0)], 0)
            keep = nbytes > 0  # special-token targets carry no bytes: out of both sums
            batch["labels"] = np.where(keep, labels, IGNORE)
            lab = torch.from_numpy(batch["labels"][:, 1:]).to(device)  # (B, T-1)
            valid = lab != IGNORE
            nll = next_token_nll(module, to_torch(batch, device), lab)  # (B, T-1)
            nats += float(nll[valid].sum())
            n_bytes += int(nbytes[:, 1:][keep[:, 1:]].sum())
            n_tokens += int(valid.sum())
            if per_pos is not None:
                pos = batch["position_ids"][:, 1:]  # (B, T-1) positions of the targets
                per_pos.add(pos[valid.cpu().numpy()], nll[valid].double().cpu().numpy())
    finally:
        model.train(was_training)
    buckets = [] if per_pos is None else [per_pos.nll, per_pos.count]
    sums = reduce(np.concatenate([np.array([nats, n_bytes, n_tokens], dtype=np.float64), *buckets]))
    nats, n_bytes, n_tokens = float(sums[0]), int(sums[1]), int(sums[2])
    if per_pos is not None:
        k = len(per_pos.nll)
        per_pos.nll, per_pos.count = sums[3:3 + k], sums[3 + k:].astype(np.int64)
    out = {"bits_per_byte": nats / max(n_bytes, 1) / math.log(2), "bpb_tokens": n_tokens,
           "bytes": n_bytes, "lm_loss": nats / max(n_tokens, 1)}
    if per_pos is not None:
        out["loss_by_position"] = per_pos.result()
    return out


def next_token_nll(module: StandardModule, batch: dict[str, torch.Tensor],
                   targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each next token, (B, T-1) fp32, ``targets`` (B, T-1) the
    labels shifted left (ignored ones score anything). While the batch's fp32 logits fit in
    ``CHUNK_LOGITS_BYTES`` they are formed in one piece; beyond, the model returns hidden
    states and the output head is applied a few rows at a time, so evaluating a large
    vocabulary never holds (B, T, V) logits (the memory rule of training's chunked loss)."""
    B, T = batch["input_ids"].shape[:2]
    vocab = output_projection(module.model).out_features
    chunks = resolve_chunks("auto", B * T, vocab)
    safe = targets.clamp(min=0)[..., None]  # (B, T-1, 1)
    if chunks == 1:
        logp = torch.log_softmax(module.logits(batch)[:, :-1].float(), dim=-1)  # (B, T-1, V)
        return -logp.gather(-1, safe)[..., 0]
    with projection_removed(module.model) as head:
        hidden = module.logits(batch)[:, :-1]  # (B, T-1, d): the projection's input
    out = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
    rows = max(1, -(-B // chunks))
    for lo in range(0, B, rows):
        with autocast(targets.device, module.bf16):
            z = F.linear(hidden[lo:lo + rows], head.weight, head.bias)  # (b, T-1, V)
        logp = torch.log_softmax(z.float(), dim=-1)
        out[lo:lo + rows] = -logp.gather(-1, safe[lo:lo + rows])[..., 0]
    return out


def left_to_right_bpb(spec, model: torch.nn.Module, rows_list: list[Rows], device: torch.device,  # noqa: ANN001
                      bf16: bool = False, share: tuple[int, int] = (0, 1),
                      reduce: Callable[[np.ndarray], np.ndarray] = no_reduce) -> dict[str, Any] | None:
    """Bits-per-byte (and loss by position) of a run's model on plain-text rows, for the
    architectures that score text left to right; None for the others."""
    if spec.architecture not in LEFT_TO_RIGHT:
        return None
    return bits_per_byte(model, rows_list, spec.specials, token_byte_lengths(spec.tokenizer),
                         device, bf16, by_position=True, share=share, reduce=reduce)
