"""Prompts in and results out, shared by plain and speculative decoding (``infer.api``,
``infer.speculative``): a prompt tokenized as training saw a document, and the dictionary
``lmobj generate --json`` prints."""

from __future__ import annotations

from typing import Any

from lmobjectives.infer.generate import Generation


def prompt_ids(loaded: Any, prompt: str) -> list[int]:
    """A prompt as training saw documents: its tokens from position 0, no separator in front
    (a document's first token never attends to the EOS before it). An empty prompt is the
    EOS alone, the one context in which a document starts."""
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=False).ids
    return ids or [loaded.specials.eos]


def free_text_suppressed(specials: Any) -> tuple[int, ...]:
    """The reserved tokens free text never holds: every one but EOS (which ends a document).
    Without this a small model's sample can hold a FIM sentinel it saw in training."""
    return tuple(t for t in specials.all_ids() if t != specials.eos)


def generation_result(loaded: Any, g: Generation) -> dict[str, Any]:
    """What `lmobj generate --json` prints: the text (EOS dropped), the new tokens, the passes."""
    text_ids = [t for t in g.tokens if t != loaded.specials.eos]
    return {"text": loaded.tokenizer.decode(text_ids, skip_special_tokens=False),
            "tokens": g.tokens, "forward_passes": g.forward_passes, "stopped_by": g.stopped_by}
