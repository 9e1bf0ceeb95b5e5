"""The output projection of a backbone, taken off for the length of one forward so that the
loss can apply it chunk by chunk (``loss.chunked_nll_sum``) and (B·T, V) logits never exist.

Every family here ends in one ``nn.Linear`` that transformers exposes as the model's output
embeddings (Llama's ``lm_head``, ModernBERT's ``decoder``, T5's ``lm_head``); everything
before it is per token (final norm, ModernBERT's prediction head, T5's d^-0.5 rescale of tied
embeddings). Swapping that Linear for an identity for one call makes the model's ``logits``
the projection's input, (B, T, d), while the call still runs through the model's own forward —
which is what DDP (gradient-sync bookkeeping) and FSDP (unsharding the root's parameters,
among them the tied embedding) hook into. A model taken apart by hand would bypass both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def plain_model(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` and DDP wrappers, whose attributes can be swapped."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def output_projection(model: nn.Module) -> nn.Linear:
    head = plain_model(model).get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no Linear output projection to apply in chunks")
    return head


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The output projection, or None for a model that does not end in one."""
    get = getattr(plain_model(model), "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if isinstance(head, nn.Linear) else None


@contextlib.contextmanager
def projection_removed(model: nn.Module) -> Iterator[nn.Linear]:
    """Within: ``model(...).logits`` is the projection's input (B, T, d); yields the projection."""
    plain = plain_model(model)
    head = output_projection(plain)
    plain.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        plain.set_output_embeddings(head)
