"""Evaluation of masked diffusion models: an upper bound on bits-per-byte, and masked-token
accuracy at fixed noise levels.

A masked diffusion model gives no exact likelihood; its training loss is the negative ELBO,
−log p(x) ≤ E_t[(1/t) Σ_{masked i} −log p(x_i | z_t)] (MDLM Eq. 10). Its expectation over t
is estimated by Monte Carlo: every held-out row is noised ``samples`` times, each time with
the objective's own sampler and a fixed seed, and the per-row mean is the estimate. Summed
over rows and divided by the UTF-8 bytes of the scored tokens it is a bound on bits-per-byte
("≤"), comparable with a decoder's exact bits-per-byte (``metrics.bits_per_byte``); the
standard error is that of the Monte Carlo mean (rows fixed, noise random).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lmobjectives.data.converters import CONVERTERS, IGNORE
from lmobjectives.models.presets import forward_inputs
from lmobjectives.objectives.base import Objective, Rows

BOUND_SAMPLES = 4  # K noise draws per held-out row
FIXED_TIMES = (0.15, 0.5)  # masked-token accuracy at BERT's rate and at half the tokens masked
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


@torch.no_grad()
def token_nll(model, batch: dict[str, np.ndarray], suppressed: tuple[int, ...],  # noqa: ANN001
              device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (−log p, top-1 correct) at aligned labels, (B, T) each; 0 where unscored."""
    inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()
              if k in MODEL_KEYS}
    logits = model(**forward_inputs(model, inputs)).logits.float()  # (B, T, V)
    if suppressed:
        logits[..., list(suppressed)] = float("-inf")
    labels = torch.from_numpy(batch["labels"]).to(device)
    scored = labels != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    nll = torch.where(scored, -logp, 0.0)  # (B, T)
    correct = scored & (logits.argmax(-1) == labels)
    return nll.cpu().double().numpy(), correct.cpu().numpy()


def elbo_bound(model, objective: Objective, architecture: str, rows_list: list[Rows],  # noqa: ANN001
               byte_lengths: np.ndarray, *, samples: int = BOUND_SAMPLES, seed: int = 1234,
               device: torch.device | None = None) -> dict[str, Any]:
    """The Monte Carlo ELBO (see the module docstring): bits-per-byte bound, its standard
    error, and the bound in nats per scored token."""
    device = device or next(model.parameters()).device
    specials, convert = objective.specials, CONVERTERS[architecture]
    per_row: list[np.ndarray] = []  # (K,) weighted nats of each row, one entry per row
    n_bytes = n_tokens = 0
    was_training = model.training
    model.eval()
    try:
        for i, rows in enumerate(rows_list):
            draws = []
            for k in range(samples):
                batch = convert(objective(rows, np.random.default_rng([seed, i, k])), specials)
                nll, _ = token_nll(model, batch, objective.suppressed_ids(), device)
                draws.append((nll * batch.get("loss_weights", 1.0)).sum(axis=1))  # (B,)
            per_row.extend(np.stack(draws, axis=1))  # B rows of (K,)
            targets = np.where(batch["labels"] != IGNORE, batch["labels"], 0)
            n_bytes += int(np.where(batch["labels"] != IGNORE, byte_lengths[targets], 0).sum())
            n_tokens += int((batch["labels"] != IGNORE).sum())
    finally:
        model.train(was_training)
    draws_by_row = np.stack(per_row)  # (N, K)
    total = float(draws_by_row.mean(axis=1).sum())
    var = float((draws_by_row.var(axis=1, ddof=1) / samples).sum()) if samples > 1 else float("nan")
    scale = 1.0 / max(n_bytes, 1) / math.log(2)
    return {"bits_per_byte_bound": total * scale, "bits_per_byte_bound_se": math.sqrt(var) * scale,
            "loss_bound": total / max(n_tokens, 1), "bound_samples": samples,
            "bytes": n_bytes, "tokens": n_tokens}


def masked_accuracy_at(model, objective: Objective, architecture: str, rows_list: list[Rows],  # noqa: ANN001
                       t: float, *, seed: int = 1234, device: torch.device | None = None) -> float:
    """Top-1 accuracy on the masked tokens when every row is noised at time ``t`` (the
    objective's ``at_times``: a fraction ``t`` of the tokens masked)."""
    device = device or next(model.parameters()).device
    correct = total = 0
    was_training = model.training
    model.eval()
    try:
        for i, rows in enumerate(rows_list):
            f = objective.at_times(rows, np.full(rows.tokens.shape[0], t),
                                   np.random.default_rng([seed, i]))
            batch = CONVERTERS[architecture](f, objective.specials)
            _, ok = token_nll(model, batch, objective.suppressed_ids(), device)
            masked = batch["loss_weights"] > 0
            correct += int(ok[masked].sum())
            total += int(masked.sum())
    finally:
        model.train(was_training)
    return correct / max(total, 1)


def diffusion_eval(model, objective: Objective, architecture: str, rows_list: list[Rows],  # noqa: ANN001
                   byte_lengths: np.ndarray, *, samples: int = BOUND_SAMPLES,
                   device: torch.device | None = None) -> dict[str, Any]:
    """What ``lmobj eval`` reports for a masked diffusion run: the bits-per-byte bound with
    its standard error, and masked-token accuracy at each of ``FIXED_TIMES``."""
    out = elbo_bound(model, objective, architecture, rows_list, byte_lengths, samples=samples,
                     device=device)
    for t in FIXED_TIMES:
        out[f"masked_accuracy_t{t:g}"] = masked_accuracy_at(model, objective, architecture,
                                                            rows_list, t, device=device)
    return out


def likelihood_bound(spec, model, rows_list: list[Rows], device: torch.device) -> dict[str, Any] | None:  # noqa: ANN001
    """The bound and fixed-t accuracies for a run whose objective's likelihood is an ELBO
    (``Capabilities.likelihood``); None for the others."""
    if spec.objective.capabilities.likelihood != "elbo":
        return None
    from lmobjectives.evaluate.metrics import token_byte_lengths

    return diffusion_eval(model, spec.objective, spec.architecture, rows_list,
                          token_byte_lengths(spec.tokenizer), device=device)


def format_bound(value: float, se: float | None = None) -> str:
    """A bound as printed everywhere: "≤ 2.345 ± 0.012" (the ± part when its error is known)."""
    return f"≤ {value:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def infill_exact_match(loaded, documents: list[str], n: int, seed: int = 0, *,  # noqa: ANN001
                       context_tokens: int = 256) -> dict[str, Any]:
    """The single-line task of ``evaluate/infill.py`` for a masked diffusion model: the line's
    tokens become masks between its prefix and suffix (as many masks as the line has tokens:
    a diffusion model fills a gap of known length), filled greedily one token per step, then
    compared with the line character for character. Prefix and suffix are cut to fit
    ``context_tokens`` around the gap."""
    from lmobjectives.evaluate.infill import line_tasks
    from lmobjectives.infer.diffusion import reverse_diffusion

    encode = lambda s: loaded.tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    tasks = line_tasks(documents, n, seed)
    hits = 0
    for task in tasks:
        middle = encode(task.middle)
        room = max(context_tokens - len(middle), 0)
        prefix = encode(task.prefix)
        prefix = prefix[max(len(prefix) - (room - room // 2), 0):]  # the nearest context
        suffix = encode(task.suffix)[:room // 2]
        ids = prefix + [loaded.specials.mask] * len(middle) + suffix
        out = reverse_diffusion(loaded.model, ids, loaded.architecture, loaded.specials,
                                steps=max(len(middle), 1))
        got = out.tokens[len(prefix):len(prefix) + len(middle)]
        hits += loaded.tokenizer.decode(got, skip_special_tokens=False) == task.middle
    return {"exact_match": hits / len(tasks) if tasks else None, "samples": len(tasks),
            "hits": hits}
