"""Converters: architecture-neutral ``Features`` -> the model's batch, in HF conventions
(``input_ids``, ``attention_mask``, ``position_ids``, ``labels`` with -100 ignored,
``decoder_input_ids``). Idea from seqio's feature converters.

``labels`` follow the convention of the HF class each architecture maps to: unshifted for
decoders (position t's logits score ``labels[t + 1]``), aligned for encoders and
encoder-decoders. ``CAUSAL_SHIFT`` tells the loss which is which.

Prefix-LM worked example (PAD = 1): inputs [[7, 8, 1]], input_lengths [2], targets [[9, 4]]::

    input_ids      = [[7, 8, 9, 4]]          # inputs compacted, then targets
    labels         = [[-100, -100, 9, 4]]
    attention_mask = 4-D boolean (B, 1, L, L): row i sees j when j < 2 (the prefix, both ways)
                     or j <= i (causal); padding is never seen.

The 4-D mask uses torch SDPA's convention, True = may attend. transformers (5.x) passes a 4-D
mask through its mask preprocessing unchanged, and its ``sdpa`` attention hands it to
``scaled_dot_product_attention`` as is (tests/test_seq2seq.py proves the resulting
visibility on the Llama preset). The ``eager`` implementation instead *adds* the mask to the
scores, where a boolean mask would mask nothing; models are therefore always built and
loaded with ``sdpa``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lmobjectives.objectives.base import IGNORE, Features
from lmobjectives.tokenizer.special import SpecialIds

Batch = dict[str, np.ndarray]

# Which architectures' labels are scored one position later than their logits.
CAUSAL_SHIFT = {"decoder": True, "prefix_lm": True, "encoder": False, "encoder_decoder": False,
                "bidirectional_decoder": False}


def _labels(targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, targets, IGNORE).astype(np.int64)


def _with_weights(batch: Batch, f: Features, mask: np.ndarray) -> Batch:
    """Add ``loss_weights`` (aligned with ``labels``, 0 where nothing is scored) when the
    objective weighs its tokens."""
    if f.loss_weights is not None:
        batch["loss_weights"] = np.where(mask, f.loss_weights, 0.0).astype(np.float32)
    return batch


def document_mask(positions: np.ndarray, tokens: np.ndarray, pad: int) -> np.ndarray:
    """(B, 1, T, T) bool, True = may attend: full attention inside each packed document (a
    document starts where ``positions`` is 0), none across documents, PAD never seen.

    >>> document_mask(np.array([[0, 1, 0, 1]]), np.array([[5, 0, 6, 0]]), pad=1)[0, 0].astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    doc = np.cumsum(positions == 0, axis=1)  # (B, T) document index within the row
    mask = (doc[:, :, None] == doc[:, None, :]) & (tokens != pad)[:, None, :]  # (B, T, T)
    # A PAD query sees itself so its softmax stays finite; its labels are ignored anyway.
    mask |= np.eye(tokens.shape[1], dtype=bool)[None]
    return mask[:, None]


def to_decoder(f: Features, specials: SpecialIds) -> Batch:
    """Single-stream features -> causal decoder batch. Padding sits at row ends only, so a
    causal mask already keeps it out of every real token's context."""
    if f.inputs is not None:
        return to_prefix_lm(f, specials)
    B, T = f.targets.shape
    positions = f.positions if f.positions is not None else np.broadcast_to(np.arange(T), (B, T))
    batch = {
        "input_ids": f.targets.astype(np.int64),
        "position_ids": positions.astype(np.int64),
        "labels": _labels(f.targets, f.target_mask),
    }
    return _with_weights(batch, f, f.target_mask)


def _target_lengths(f: Features) -> np.ndarray:
    if f.target_lengths is not None:
        return f.target_lengths
    return np.full(f.targets.shape[0], f.targets.shape[1], dtype=np.int32)


def to_prefix_lm(f: Features, specials: SpecialIds) -> Batch:
    """Conditioned features -> one decoder sequence: inputs (bidirectional) then targets (causal)."""
    if f.inputs is None:
        return to_decoder(f, specials)
    B, S = f.inputs.shape
    T = f.targets.shape[1]
    n_in = f.input_lengths.astype(np.int64)
    n_tg = _target_lengths(f).astype(np.int64)
    L = int((n_in + n_tg).max())
    col = np.arange(L)[None, :]  # (1, L)
    in_part = col < n_in[:, None]  # (B, L)
    tg_idx = np.clip(col - n_in[:, None], 0, T - 1)  # (B, L)
    tg_part = ~in_part & (col - n_in[:, None] < n_tg[:, None])
    rows = np.arange(B)[:, None]
    tokens = np.where(in_part, f.inputs[rows, np.minimum(col, S - 1)], f.targets[rows, tg_idx])
    tokens = np.where(in_part | tg_part, tokens, specials.pad)
    scored = tg_part & f.target_mask[rows, tg_idx]
    valid = in_part | tg_part  # (B, L)
    causal = np.tril(np.ones((L, L), dtype=bool))[None]  # (1, L, L)
    bidir = in_part[:, None, :] & in_part[:, :, None]  # (B, L, L) prefix sees prefix
    mask = (causal | bidir) & valid[:, None, :] & valid[:, :, None]
    # Padding rows see themselves so softmax stays finite; their labels are ignored anyway.
    mask |= np.eye(L, dtype=bool)[None]
    batch = {
        "input_ids": tokens.astype(np.int64),
        "position_ids": np.broadcast_to(col, (B, L)).astype(np.int64).copy(),
        "attention_mask": mask[:, None],  # (B, 1, L, L)
        "labels": _labels(tokens, scored),
    }
    if f.loss_weights is not None:
        batch["loss_weights"] = np.where(scored, f.loss_weights[rows, tg_idx], 0.0).astype(np.float32)
    return batch


def to_encoder(f: Features, specials: SpecialIds) -> Batch:
    """Aligned features (MLM, MDLM) -> encoder batch: read ``inputs``, score ``targets`` where
    masked. Features with per-document ``positions`` keep packed documents apart (a 4-D mask
    and positions restarting per document); without them the row is one sequence."""
    if f.positions is not None:
        return to_bidirectional_decoder(f, specials)
    inputs = f.inputs if f.inputs is not None else f.targets
    batch = {
        "input_ids": inputs.astype(np.int64),
        "attention_mask": (inputs != specials.pad).astype(np.int64),
        "labels": _labels(f.targets, f.target_mask),
    }
    return _with_weights(batch, f, f.target_mask)


def to_bidirectional_decoder(f: Features, specials: SpecialIds) -> Batch:
    """Aligned features -> a batch read with full attention inside each packed document
    (``document_mask``); labels aligned with their positions, as for an encoder."""
    inputs = f.inputs if f.inputs is not None else f.targets
    B, T = inputs.shape
    positions = f.positions if f.positions is not None else np.broadcast_to(np.arange(T), (B, T))
    batch = {
        "input_ids": inputs.astype(np.int64),
        "position_ids": positions.astype(np.int64),
        "attention_mask": document_mask(positions, inputs, specials.pad),
        "labels": _labels(f.targets, f.target_mask),
    }
    return _with_weights(batch, f, f.target_mask)


def to_encoder_decoder(f: Features, specials: SpecialIds) -> Batch:
    """Conditioned features -> T5-style batch; the decoder starts from PAD as T5 does."""
    if f.inputs is None:
        raise ValueError("encoder-decoder needs conditioned features (inputs and targets)")
    B, S = f.inputs.shape
    n_in = f.input_lengths[:, None]
    n_tg = _target_lengths(f)[:, None]
    T = f.targets.shape[1]
    decoder_inputs = np.full_like(f.targets, specials.pad)
    decoder_inputs[:, 1:] = f.targets[:, :-1]
    tg_valid = np.arange(T)[None, :] < n_tg
    batch = {
        "input_ids": f.inputs.astype(np.int64),
        "attention_mask": (np.arange(S)[None, :] < n_in).astype(np.int64),
        "decoder_input_ids": decoder_inputs.astype(np.int64),
        "decoder_attention_mask": tg_valid.astype(np.int64),
        "labels": _labels(f.targets, f.target_mask & tg_valid),
    }
    return _with_weights(batch, f, f.target_mask & tg_valid)


CONVERTERS: dict[str, Callable[[Features, SpecialIds], Batch]] = {
    "decoder": to_decoder,
    "prefix_lm": to_prefix_lm,
    "encoder": to_encoder,
    "encoder_decoder": to_encoder_decoder,
    "bidirectional_decoder": to_bidirectional_decoder,
}

# The batch key of the loss's gather index (``scored_index``).
SCORED_INDEX = "scored_index"


def scored_index(labels: np.ndarray, shift: bool, weights: np.ndarray | None = None) -> np.ndarray:
    """(N,) int64: the flat indices, into the batch's B·T logits rows, of the rows the loss
    scores (after the decoder shift: row t scores ``labels[t + 1]``). A token of loss weight 0
    is left out: it adds nothing and is not predicted.

    Computed on the host so that the loss can gather these rows before the output head, and
    choose between that and the full head from N alone (a shape, not a value: no host
    synchronisation). Flat indices are exact (no padding rows), which is what lets masked
    diffusion, whose rows vary from nearly none to all masked, take the sparse path; the price
    is that a batch carrying them cannot be cut into rows without recomputing them.

    >>> scored_index(np.array([[5, -100, 6, 7], [-100, -100, 8, -100]]), shift=True).tolist()
    [1, 2, 5]
    """
    scored = labels != IGNORE
    if weights is not None:
        scored &= weights != 0
    if shift:
        scored = np.pad(scored[:, 1:], ((0, 0), (0, 1)))  # (B, T), aligned with the logits
    return np.flatnonzero(scored).astype(np.int64)  # (N,)


def convert_for_loss(architecture: str, f: Features, specials: SpecialIds) -> Batch:
    """``CONVERTERS[architecture]``'s batch plus ``scored_index`` for the training loss."""
    batch = CONVERTERS[architecture](f, specials)
    batch[SCORED_INDEX] = scored_index(batch["labels"], CAUSAL_SHIFT[architecture],
                                       batch.get("loss_weights"))
    return batch
