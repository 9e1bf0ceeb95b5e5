"""Checks made once before the first optimizer step, and a cheap per-batch guard, so that
a mismatch between tokenizer, model and data ends in one message saying what differs —
not in an ``IndexError`` deep inside an embedding (or, on a GPU, a device-side assert far
from its cause).

Before the first step (``preflight(run)``):

1. the model's input (and output) embedding tables have a row for every tokenizer id:
   ``rows >= len(tokenizer)`` (added tokens included; a larger, padded table is fine);
2. when the weights come from ``model.init_from`` and that directory carries its own
   tokenizer, the run's tokenizer is the same one (same size, same token at every id);
3. every store's token ids lie in ``[0, rows)``: the manifest's ``vocab_size`` is checked,
   then the shards are scanned (up to ``SCAN_LIMIT`` tokens per store: larger stores rely on
   the manifest and on the per-batch guard);
4. the training data fill at least one optimizer step without repeating a row:
   ``ceil(tokens / R) >= B * A * W`` rows of ``R`` tokens (micro-batch B, accumulation A,
   W processes), i.e. at least ``(B*A*W - 1) * R + 1`` tokens.

Missing reserved special tokens are refused earlier, when ``open_run`` reads the tokenizer
(``SpecialIds.from_vocab`` names them).

Worked example: tokenizer of 8,192 ids, ``--set model.config.vocab_size=100`` ⇒
"the model's input embedding table has 100 rows but the tokenizer has 8192 tokens";
B=2, A=1, W=1, R=32 and a store of 40 training tokens ⇒ "… has 40 training tokens; one
optimizer step needs 2 rows of 32 tokens, at least 33 tokens".

Per batch (``check_batch``): ids in ``input_ids``/``decoder_input_ids`` and non-ignored
``labels`` lie in ``[0, rows)`` — one ``min``/``max`` over an (B, T) array, negligible
next to the forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmobjectives.data.converters import IGNORE
from lmobjectives.errors import UserError

SCAN_LIMIT = 1 << 31  # tokens per store scanned at start (~4 GiB of uint16: seconds from page cache)
SCAN_CHUNK = 1 << 24  # tokens per np.max call: bounded memory whatever the shard size
ID_KEYS = ("input_ids", "decoder_input_ids", "labels")


def _input_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The input embedding of an HF model, or of a wrapper around one (its first Embedding)."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        return get()
    return next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)


def embedding_rows(model: torch.nn.Module) -> int | None:
    """Rows of the smaller of the input and output embedding tables (None: no table found)."""
    emb = _input_embedding(model)
    if emb is None:
        return None
    rows = emb.num_embeddings
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None and getattr(out, "out_features", None) is not None:
        rows = min(rows, out.out_features)
    return int(rows)


def check_vocab(model: torch.nn.Module, tokenizer: Any, where: str = "the model") -> int | None:
    """Refuse a model whose embedding tables miss some tokenizer ids; returns the row count."""
    rows = embedding_rows(model)
    if rows is None:
        return None
    n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
    n_in = _input_embedding(model).num_embeddings
    if rows < n_tok:
        table = "input" if n_in < n_tok else "output"
        have = n_in if n_in < n_tok else rows
        raise UserError(f"{where}'s {table} embedding table has {have} rows but the tokenizer has "
                        f"{n_tok} tokens (ids 0..{n_tok - 1}); use the model's own tokenizer, or a "
                        "model built for this tokenizer")
    return rows


def compare_tokenizers(ours: Any, theirs: Any, theirs_name: str) -> None:
    """Refuse two tokenizers that map some id to different tokens; the message shows the
    sizes, how many ids differ and the first difference. Ours may extend theirs with new
    ids past their end (an extended tokenizer, or reserved tokens appended to a foreign one)."""
    a = ours.get_vocab(with_added_tokens=True)
    b = theirs.get_vocab(with_added_tokens=True)
    if a == b:
        return
    inv_a = {i: t for t, i in a.items()}
    inv_b = {i: t for t, i in b.items()}
    ids = sorted(set(inv_a) | set(inv_b))
    diff = [i for i in ids if i in inv_b and inv_a.get(i) != inv_b[i]]
    if not diff:
        return
    first = diff[0]
    raise UserError(
        f"tokenizer mismatch: {theirs_name} has {len(b)} tokens, the run's tokenizer has {len(a)}; "
        f"{len(diff)} id(s) differ (first: id {first} is {inv_b.get(first)!r} there, "
        f"{inv_a.get(first)!r} here); train with --tokenizer {theirs_name}")


def _scan_max(table: Any, limit: int) -> tuple[int, int] | None:
    """(max id, shard) over a split's shards, None if the split holds more than ``limit`` tokens."""
    total = sum(len(s) for s in table.shards)
    if total > limit:
        return None
    best, where = -1, -1
    for i, shard in enumerate(table.shards):
        for lo in range(0, len(shard), SCAN_CHUNK):
            m = int(np.max(shard[lo:lo + SCAN_CHUNK]))
            if m > best:
                best, where = m, i
    return best, where


def check_store_ids(store: Any, rows: int, name: str, limit: int = SCAN_LIMIT) -> None:
    """Refuse a store whose ids can fall outside ``[0, rows)`` (ids are unsigned on disk)."""
    declared = int(store.manifest.get("vocab_size", 0))
    label = f"store {store.path}" + ("" if Path(store.path).name == name else f" ({name})")
    if declared > rows:
        raise UserError(f"{label} was made for a vocabulary of {declared} ids, "
                        f"but the model's embedding table has {rows} rows")
    for split in ("train", "val"):
        if not (Path(store.path) / split / "docs.npy").is_file():
            continue
        found = _scan_max(store.split(split), limit)
        if found is not None and found[0] >= rows:
            raise UserError(f"{label} holds token id {found[0]} "
                            f"({split}/tokens-{found[1]:05d}.bin), outside the model's embedding "
                            f"table of {rows} rows; the store is damaged or was made with another "
                            "tokenizer: re-run `lmobj prepare`")


def check_enough_data(run: Any) -> None:
    """Refuse training data that cannot fill one optimizer step without repeating rows."""
    t = run.cfg.train
    R = run.row_length
    need_rows = t.batch_size * t.grad_accum * run.world_size
    tokens = sum(int(s.store.manifest["splits"]["train"]["tokens"]) for s in run.sources)
    have_rows = -(-tokens // R)
    if have_rows < need_rows:
        minimum = (need_rows - 1) * R + 1
        raise UserError(
            f"the training data has {tokens} tokens, fewer than one optimizer step needs: "
            f"{need_rows} rows of {R} tokens (batch_size {t.batch_size} × grad_accum {t.grad_accum} "
            f"× {run.world_size} process(es)), at least {minimum} tokens; add data or lower "
            "--batch-size / --seq-len")


def preflight(run: Any) -> int | None:
    """All start-up checks for ``run`` (a ``train.setup.Run``); returns the embedding rows
    (None for a model without a recognisable embedding table: only the data checks run)."""
    rows = check_vocab(run.model, run.tokenizer)
    init_from = run.cfg.model.init_from
    if init_from:
        from lmobjectives.tokenizer import load_tokenizer
        from lmobjectives.rundir import init_dir

        src = init_dir(init_from)
        if (src / "tokenizer.json").is_file():
            compare_tokenizers(run.tokenizer, load_tokenizer(str(src)), str(src))
    for s in run.sources:
        if rows is not None:
            check_store_ids(s.store, rows, s.name)
    check_enough_data(run)
    return rows


def check_batch(batch: dict[str, np.ndarray], rows: int | None, step: int) -> None:
    """Refuse a micro-batch holding an id outside ``[0, rows)`` before it reaches the model."""
    if rows is None:
        return
    for key in ID_KEYS:
        a = batch.get(key)
        if a is None or a.size == 0:
            continue
        ids = a[a != IGNORE] if key == "labels" else a
        if ids.size == 0:
            continue
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise UserError(f"step {step}: the batch's {key} holds token id {bad}, outside the "
                            f"model's embedding table [0, {rows}); the data or the objective "
                            "produced an id the model cannot embed")
