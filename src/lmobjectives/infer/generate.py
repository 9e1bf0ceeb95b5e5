"""Decoding as a ladder of small functions: prefill, decode one token, decode n tokens.

The KV cache is transformers' own ``DynamicCache``; ``distribution`` is the one sampling
distribution (temperature, then nucleus) that plain and speculative decoding share;
``sample`` turns one position's logits into a token (greedy at temperature 0, else a draw
from ``distribution`` with an explicit ``torch.Generator``); ``suppress`` takes tokens out
of the choice first (free text never holds a FIM sentinel or a mode token, so
``lmobj generate`` suppresses every reserved token but EOS). ``decode_until`` is the one
decode loop: ``generate`` runs it with a stop-token rule, infilling (``infer/infill.py``)
with its own stop rules and rungs. ``forward_passes`` counts model calls, the unit
speculative decoding saves.

A prefix LM reads its prompt as the prefix: ``prefill(..., bidirectional=True)`` passes a
4-D all-True mask so every prompt token sees the whole prompt, as in training
(``converters.to_prefix_lm``); each later token is decoded causally against the cache, which
is exactly the suffix's view in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Generation:
    tokens: list[int]  # the new tokens only
    forward_passes: int
    stopped_by: str  # "eos", "stop" or "length"
    extras: dict = field(default_factory=dict)


Step = Callable[[int, Any], tuple[torch.Tensor, Any]]  # (token, cache) -> (logits (V,), cache)
StopRule = Callable[[list[int]], "str | None"]  # tokens so far -> why to stop, or None


def distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(V,) sampling probabilities from (V,) logits: temperature, then nucleus (top-p)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set reaching top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return probs / probs.sum()


def suppress(logits: torch.Tensor, ids: tuple[int, ...]) -> torch.Tensor:
    """``logits`` (..., V) with the tokens ``ids`` made impossible (a copy; as is when none)."""
    if not ids:
        return logits
    out = logits.clone()
    out[..., list(ids)] = float("-inf")
    return out


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """One token from (V,) logits."""
    if temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(distribution(logits, temperature, top_p), 1, generator=gen))


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, bidirectional: bool = False):  # noqa: ANN001 -> (logits (V,), cache)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    extra = {}
    if bidirectional:  # prefix LM: the prompt attends to itself both ways
        n = input_ids.shape[0]
        extra["attention_mask"] = torch.ones((1, 1, n, n), dtype=torch.bool, device=input_ids.device)
    out = model(input_ids=input_ids[None], cache=cache, use_cache=True, **extra)
    return out.logits[0, -1], cache


@torch.no_grad()
def decode_one(model, token: int, cache):  # noqa: ANN001
    ids = torch.tensor([[token]], device=next(model.parameters()).device)
    out = model(input_ids=ids, cache=cache, use_cache=True)  # the cache grows in place
    return out.logits[0, -1], cache


@torch.no_grad()
def decode_until(start: tuple[torch.Tensor, Any], step: Step, stop: StopRule, *,
                 max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, suppress_ids: tuple[int, ...] = ()) -> Generation:
    """Sample from the prefill's logits, then step, until ``stop`` names a reason or
    ``max_new_tokens`` are out; ``stopped_by`` is that reason or ``"length"``. Tokens in
    ``suppress_ids`` are never chosen."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits, cache = start
    passes, out = 1, []
    while len(out) < max_new_tokens:
        tok = sample(suppress(logits.cpu(), suppress_ids), temperature, top_p, gen)
        out.append(tok)
        reason = stop(out)
        if reason is not None:
            return Generation(out, passes, reason)
        if len(out) == max_new_tokens:
            break
        logits, cache = step(tok, cache)
        passes += 1
    return Generation(out, passes, "length")


def stop_at(stop_ids: tuple[int, ...]) -> StopRule:
    """Stop (reason ``"eos"``) once the last token is one of ``stop_ids``."""
    return lambda tokens: "eos" if tokens[-1] in stop_ids else None


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, max_new_tokens: int = 64, temperature: float = 0.0,  # noqa: ANN001
             top_p: float = 1.0, seed: int = 0, stop_ids: tuple[int, ...] = (),
             bidirectional_prompt: bool = False, suppress_ids: tuple[int, ...] = ()) -> Generation:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        start = prefill(model, torch.tensor(prompt_ids, device=device), bidirectional_prompt)
        return decode_until(start, lambda tok, cache: decode_one(model, tok, cache),
                            stop_at(stop_ids), max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed,
                            suppress_ids=suppress_ids)
    finally:
        model.train(was_training)
