"""Reverse diffusion for masked diffusion models (MDLM §3.3 ancestral sampler, log-linear
schedule α_t = 1 − t, no time conditioning).

Start from a sequence whose unknown positions hold MASK, at time t = 1. Step from t to
s = t − 1/S: every position still masked is revealed with probability (α_s − α_t)/(1 − α_t)
= (t − s)/t, its token drawn from the model's distribution at that position (SUBS: MASK has
probability 0); revealed positions and the given ones never change. At s = 0 the
probability is 1, so no mask is left after S steps. The model takes no time input, so its
output changes only when the sequence does: MDLM's ``_ddpm_caching_update`` keeps it while
steps reveal nothing. Here the reveal draw (which does not depend on the model) comes first
and the model is called only in steps that reveal something, which is the same cache with
no stale copy kept; ``forward_passes`` counts the real calls.

Worked example, 2 masks, S = 2: step 1 (t = 1 -> 0.5) reveals each mask with probability
0.5; step 2 (0.5 -> 0) reveals whatever is left. With S ≥ number of masks and a step that
reveals nothing, the model is not called again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmobjectives.data.converters import CONVERTERS
from lmobjectives.errors import UserError
from lmobjectives.models.presets import forward_inputs
from lmobjectives.objectives.base import Features
from lmobjectives.tokenizer.special import SpecialIds


@dataclass
class Filled:
    tokens: list[int]  # the whole sequence, every mask filled
    forward_passes: int
    steps: int


def model_batch(ids: np.ndarray, architecture: str, specials: SpecialIds) -> dict[str, np.ndarray]:
    """One sequence as the model saw documents in training: one document, positions from 0,
    full attention (the training converter of ``architecture`` builds the mask)."""
    row = ids[None].astype(np.int32)  # (1, T)
    f = Features(targets=row, target_mask=np.zeros_like(row, dtype=bool),
                 positions=np.arange(row.shape[1], dtype=np.int32)[None], inputs=row,
                 input_lengths=np.array([row.shape[1]], dtype=np.int32))
    return CONVERTERS[architecture](f, specials)


@torch.no_grad()
def denoiser_logits(model, ids: np.ndarray, architecture: str, specials: SpecialIds) -> torch.Tensor:  # noqa: ANN001
    """(T, V) float32 logits of the clean tokens given ``ids``; MASK never predicted (SUBS)."""
    device = next(model.parameters()).device
    batch = model_batch(ids, architecture, specials)
    inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()
              if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**forward_inputs(model, inputs)).logits[0].float()  # (T, V)
    logits[:, specials.mask] = float("-inf")
    return logits


def draw_tokens(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """(N,) tokens from (N, V) logits: argmax at temperature 0, else softmax(logits / T)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


@torch.no_grad()
def reverse_diffusion(model, ids: list[int], architecture: str, specials: SpecialIds, *,  # noqa: ANN001
                      steps: int, temperature: float = 0.0, seed: int = 0) -> Filled:
    """Fill every MASK of ``ids`` in ``steps`` ancestral steps (see the module docstring)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    z = np.asarray(ids, dtype=np.int64)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    passes = 0
    try:
        for k in range(steps, 0, -1):
            masked = np.flatnonzero(z == specials.mask)
            if masked.size == 0:
                break
            t, s = k / steps, (k - 1) / steps
            reveal = torch.rand(masked.size, generator=gen).numpy() < (t - s) / t  # s = 0: all
            if not reveal.any():
                continue  # nothing changes: the model's last output would still hold
            logits = denoiser_logits(model, z, architecture, specials).cpu()  # (T, V)
            passes += 1
            where = masked[reveal]
            z[where] = draw_tokens(logits[torch.from_numpy(where)], temperature, gen).numpy()
    finally:
        model.train(was_training)
    return Filled(tokens=z.tolist(), forward_passes=passes, steps=steps)


# ------------------------------------------------------------------ generate and infill
DEFAULT_STEPS_PER_TOKEN = 1  # S = number of masks by default: about one token revealed per step


def _decode(loaded, ids: list[int]) -> str:  # noqa: ANN001 - Loaded
    return loaded.tokenizer.decode([t for t in ids if t != loaded.specials.eos],
                                   skip_special_tokens=False)


def diffusion_generate(loaded, prompt: str, *, max_new_tokens: int = 64,  # noqa: ANN001
                       steps: int | None = None, temperature: float = 0.0,
                       seed: int = 0) -> dict[str, Any]:
    """Continue ``prompt`` with ``max_new_tokens`` tokens: start from that many masks after it
    and run the reverse process for ``steps`` steps (default: one per new token)."""
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    prompt_ids = loaded.tokenizer.encode(prompt, add_special_tokens=False).ids
    ids = prompt_ids + [loaded.specials.mask] * max_new_tokens
    filled = reverse_diffusion(loaded.model, ids, loaded.architecture, loaded.specials,
                               steps=_steps(steps, max_new_tokens), temperature=temperature,
                               seed=seed)
    new = filled.tokens[len(prompt_ids):]
    # As for left-to-right generation: "text" is the continuation, printed after the prompt.
    return {"text": _decode(loaded, new), "tokens": new, "forward_passes": filled.forward_passes,
            "diffusion_steps": filled.steps, "stopped_by": "length"}


def diffusion_infill(loaded, text: str, *, steps: int | None = None,  # noqa: ANN001
                     temperature: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """Fill every ``<|mask|>`` of ``text`` (one token each), anywhere, in any order."""
    ids = loaded.tokenizer.encode(text, add_special_tokens=False).ids
    holes = [i for i, t in enumerate(ids) if t == loaded.specials.mask]
    if not holes:
        raise UserError("--text has no <|mask|> to fill")
    filled = reverse_diffusion(loaded.model, ids, loaded.architecture, loaded.specials,
                               steps=_steps(steps, len(holes)), temperature=temperature, seed=seed)
    return {"kind": "diffusion", "text": _decode(loaded, filled.tokens),
            "tokens": [filled.tokens[i] for i in holes], "positions": holes,
            "forward_passes": filled.forward_passes, "diffusion_steps": filled.steps,
            "fills": [loaded.tokenizer.decode([filled.tokens[i]], skip_special_tokens=False)
                      for i in holes]}


def _steps(steps: int | None, n_masks: int) -> int:
    if steps is None:
        return max(1, n_masks * DEFAULT_STEPS_PER_TOKEN)
    if steps < 1:
        raise UserError("--diffusion-steps must be >= 1")
    return steps
