"""``lmobj show``: what an objective makes of a text, as the model will see it."""

from __future__ import annotations

from typing import Any

import numpy as np

from lmobjectives.config import decoder_form
from lmobjectives.data.converters import CONVERTERS, IGNORE
from lmobjectives.objectives import build_objective, objective_class
from lmobjectives.objectives.base import Rows
from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds


def text_row(tokenizer, text: str, length: int, specials: SpecialIds) -> Rows:  # noqa: ANN001
    """One packed row from ``text``: its tokens then EOS, repeated documents' worth cut or
    padded to ``length`` (special-token strings in the text are honoured)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids + [specials.eos]
    row = np.full(length, specials.pad, dtype=np.int32)
    n = min(len(ids), length)
    row[:n] = ids[:n]
    return Rows.from_tokens(row[None], specials.eos)


def special_ids(tokenizer) -> SpecialIds:  # noqa: ANN001
    """The reserved ids, looked up one by one (copying the whole vocabulary costs ~20 ms)."""
    found = {t: i for t in SPECIAL_TOKENS if (i := tokenizer.token_to_id(t)) is not None}
    return SpecialIds.from_vocab(found, tokenizer.get_vocab_size())


def show(objective: str, text: str, tokenizer, *, seed: int = 0, seq_len: int = 128,  # noqa: ANN001
         params: dict[str, Any] | None = None, architecture: str | None = None) -> dict[str, Any]:
    specials = special_ids(tokenizer)
    obj = build_objective(objective, params or {}, specials, tokenizer=tokenizer)
    arch = decoder_form(objective, architecture) if architecture else \
        objective_class(objective).architectures[0]
    rows = text_row(tokenizer, text, obj.row_length(seq_len), specials)
    features = obj(rows, np.random.default_rng(seed))
    batch = CONVERTERS[arch](features, specials)
    out: dict[str, Any] = {"objective": objective, "architecture": arch, "seed": seed}
    for key, value in batch.items():
        row = np.asarray(value)[0]
        out[key] = row.round(6).tolist() if row.dtype.kind == "f" else row.astype(int).tolist()
    # Per-row facts the objective reports (UL2: which denoiser), for checks over many seeds.
    out["extras"] = {k: np.asarray(v)[0].tolist() for k, v in features.extras.items()}
    out["special_tokens"] = specials.as_dict()
    return out


def render(shown: dict[str, Any], tokenizer) -> str:  # noqa: ANN001
    """Readable text of the ids (special tokens visible), one block per batch key."""
    pad = shown["special_tokens"]["pad"]

    def text(ids: list[int]) -> str:
        ids = [i for i in ids if i >= 0]
        n_pad = 0
        while ids and ids[-1] == pad:  # trailing padding: count it, do not print it
            ids.pop()
            n_pad += 1
        body = tokenizer.decode(ids, skip_special_tokens=False)
        return body + (f"  [+{n_pad} <|pad|>]" if n_pad else "")

    lines = [f"objective {shown['objective']} ({shown['architecture']}), seed {shown['seed']}"]
    for key in ("input_ids", "decoder_input_ids"):
        if key in shown:
            lines += [f"--- {key}", text(shown[key])]
    labels = shown["labels"]
    scored = [i for i in labels if i != IGNORE]
    lines += [f"--- labels ({len(scored)} scored of {len(labels)})", text(scored)]
    if "loss_weights" in shown:
        weights = [w for w, i in zip(shown["loss_weights"], labels) if i != IGNORE]
        nonzero = sorted({w for w in weights if w})
        lines.append(f"--- loss_weights: {sum(1 for w in weights if w)} of {len(weights)} scored "
                     f"tokens weigh {', '.join(f'{w:g}' for w in nonzero) or 'nothing'}, the rest 0")
    if shown.get("extras"):
        lines.append("--- extras: " + ", ".join(f"{k} {v}" for k, v in shown["extras"].items()))
    return "\n".join(lines)
