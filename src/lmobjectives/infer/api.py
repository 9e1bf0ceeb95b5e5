"""Library entry points behind ``lmobj generate`` (and later infill, fill-mask)."""

from __future__ import annotations

from typing import Any

from lmobjectives.errors import UserError
from lmobjectives.infer.generate import generate
from lmobjectives.infer.load import load_model


def generate_text(path: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, speculative: bool = False) -> dict[str, Any]:
    loaded = load_model(path)
    if speculative:
        from lmobjectives.infer.speculative import speculative_text

        return speculative_text(loaded, prompt, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed)
    if loaded.architecture not in ("decoder", "prefix_lm"):
        raise UserError(f"{path} is an {loaded.architecture} model; `generate` needs a decoder "
                        "(use fill-mask for encoders, infill for encoder-decoders)")
    if not 0 < top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    ids = [loaded.specials.eos] + loaded.tokenizer.encode(prompt, add_special_tokens=False).ids
    g = generate(loaded.model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_p=top_p, seed=seed, stop_ids=(loaded.specials.eos,),
                 bidirectional_prompt=loaded.architecture == "prefix_lm")
    text_ids = [t for t in g.tokens if t != loaded.specials.eos]
    return {"text": loaded.tokenizer.decode(text_ids, skip_special_tokens=False),
            "tokens": g.tokens, "forward_passes": g.forward_passes, "stopped_by": g.stopped_by}
