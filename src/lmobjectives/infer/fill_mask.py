"""Fill-mask inference for MLM encoders: the top-k tokens, with probabilities, for every
``<|mask|>`` in a text.

Algorithm: encode the text (the mask string becomes the MASK id), wrap it in EOS on both sides
as a document sits in a packed training row, run the encoder once, softmax the logits at each
mask position over the whole vocabulary and keep the ``k`` largest. Every mask is predicted
from the same single pass, independently of the others (what BERT-style models are trained
for; filling several masks jointly would need one pass per mask, left to right).

A space right before a mask belongs to the masked token: byte-level BPE words carry their
leading space ("Ġ+" is " +"), so training masked " +" as one token, and ``"a <|mask|> b"``
must ask for " +" rather than for a token after a lone space (RoBERTa's mask token strips
the space on its left for the same reason).

Worked example (EOS 0, MASK 2; token ids illustrative)::

    text       "x = <|mask|>(y)"  ->  "x =<|mask|>(y)"  ->  ids [87, 300, 2, 41, 90, 42]
    model in   [0, 87, 300, 2, 41, 90, 42, 0]          # EOS + ids + EOS
    mask at    input position 3 (index 2 of the text's ids)
    output     [{"index": 2, "predictions": [{"token": 1710, "token_str": " len",
                                              "score": 0.41}, ...]}]

Trade-off: the EOS wrapping matches what the model saw in training (documents end with EOS
and usually follow one), at the price of not being byte-for-byte the input that transformers'
``pipeline("fill-mask")`` builds from the same text; give the pipeline
``"<|endoftext|>" + text + "<|endoftext|>"`` (with the space before each mask removed) and
the scores agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmobjectives.errors import UserError
from lmobjectives.tokenizer.special import MASK, SpecialIds


@torch.no_grad()
def mask_predictions(model, ids: list[int], mask_id: int, top_k: int) -> list[dict[str, Any]]:  # noqa: ANN001
    """Top-k ids and probabilities at each ``mask_id`` position of ``ids`` (one forward pass)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)  # (1, T)
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0]  # (T, V)
    where = (input_ids[0] == mask_id).nonzero()[:, 0]  # (M,)
    probs = torch.softmax(logits[where].float(), dim=-1)  # (M, V)
    scores, tokens = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # (M, k)
    return [{"position": int(p), "tokens": t.tolist(), "scores": s.tolist()}
            for p, t, s in zip(where.tolist(), tokens, scores)]


def fill_mask(model, tokenizer, specials: SpecialIds, text: str, *, top_k: int = 5) -> dict[str, Any]:  # noqa: ANN001
    """Predictions for every MASK in ``text``: per mask its index among the text's tokens and
    ``top_k`` candidates (``token``, ``token_str``, ``score``); ``filled`` is the text with
    every mask replaced by its best candidate."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    ids = tokenizer.encode(text.replace(" " + MASK, MASK), add_special_tokens=False).ids
    if specials.mask not in ids:
        raise UserError(f"the text has no {MASK}; put one where a token should be predicted, "
                        f"e.g. \"def f(x): {MASK} x + 1\"")
    wrapped = [specials.eos, *ids, specials.eos]
    masks = []
    best = list(ids)
    for found in mask_predictions(model, wrapped, specials.mask, top_k):
        index = found["position"] - 1  # position in the text's own ids
        preds = [{"token": t, "token_str": tokenizer.decode([t], skip_special_tokens=False),
                  "score": s} for t, s in zip(found["tokens"], found["scores"])]
        best[index] = preds[0]["token"]
        masks.append({"index": index, "predictions": preds})
    return {"text": text, "masks": masks,
            "filled": tokenizer.decode(best, skip_special_tokens=False)}


def fill_mask_text(path: str | Path, text: str, *, top_k: int = 5) -> dict[str, Any]:
    """``lmobj fill-mask``: load a run (or an HF directory) and fill the masks of ``text``."""
    from lmobjectives.infer.load import load_model

    loaded = load_model(path)
    if loaded.architecture != "encoder":
        raise UserError(f"{path} is a {loaded.architecture} model; fill-mask needs an MLM encoder "
                        "(use generate for decoders, infill for encoder-decoders)")
    return fill_mask(loaded.model, loaded.tokenizer, loaded.specials, text, top_k=top_k)


def render(result: dict[str, Any]) -> str:
    """Readable fill-mask result: one block per mask, candidates with their probabilities."""
    lines = []
    for i, m in enumerate(result["masks"]):
        lines.append(f"mask {i + 1} (token index {m['index']}):")
        lines += [f"  {p['score']:.4f}  {p['token_str']!r}" for p in m["predictions"]]
    lines.append(f"filled: {result['filled']}")
    return "\n".join(lines)
