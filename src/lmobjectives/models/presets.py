"""Backbones built from transformers configs, by preset name.

Three families, one per architecture kind: a Llama-style decoder (decoder and prefix-LM
objectives), a ModernBERT encoder (MLM) and a T5 encoder-decoder (span corruption, UL2).
Sizes are chosen for the vocabulary of the shipped tokenizer (8,192 ids, tied embeddings):
``tiny`` ≈ 1 M parameters (tests), ``small`` ≈ 17 M, ``base`` ≈ 120 M, ``1b`` ≈ 1.1 B; the
shapes of ``models.sizing`` (``d128-l4``, ...), which timed runs choose from, are presets of
every family too. Models return logits; they never compute a loss.
"""

from __future__ import annotations

import difflib
from typing import Any

from lmobjectives.errors import UserError
from lmobjectives.models.sizing import SHAPES
from lmobjectives.tokenizer.special import SpecialIds

# name -> (hidden, layers, heads, kv_heads, intermediate)
DECODER_PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 4, 256),
    "small": (384, 8, 6, 6, 1024),
    "base": (768, 12, 12, 12, 3072),
    "1b": (2048, 16, 32, 8, 8192),  # Llama-3.2-1B shape
}
ENCODER_PRESETS = {k: v for k, v in DECODER_PRESETS.items() if k != "1b"}
ENCDEC_PRESETS: dict[str, tuple[int, int, int, int]] = {  # hidden, layers per stack, heads, ff
    "tiny": (64, 1, 4, 256),
    "small": (384, 4, 6, 1024),
    "base": (768, 12, 12, 2048),  # T5-base shape
}
DECODER_PRESETS.update({n: (s.hidden, s.layers, s.heads, s.heads, s.ff) for n, s in SHAPES.items()})
ENCODER_PRESETS.update({n: (s.hidden, s.layers, s.heads, s.heads, s.ff) for n, s in SHAPES.items()})
ENCDEC_PRESETS.update({n: (s.hidden, max(s.layers // 2, 1), s.heads, s.ff) for n, s in SHAPES.items()})
FAMILY = {"decoder": "llama", "prefix_lm": "llama", "encoder": "modernbert", "encoder_decoder": "t5",
          "bidirectional_decoder": "llama"}
PRESETS = {"llama": DECODER_PRESETS, "modernbert": ENCODER_PRESETS, "t5": ENCDEC_PRESETS}


def check_preset(name: str, architecture: str) -> None:
    table = PRESETS[FAMILY[architecture]]
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown preset '{name}' for architecture {architecture}{hint} "
                        f"(presets: {', '.join(table)})")


def model_config(preset: str, architecture: str, specials: SpecialIds, max_positions: int,
                 overrides: dict[str, Any] | None = None):  # -> transformers.PretrainedConfig
    """The transformers config of a preset; ``overrides`` sets any config attribute."""
    import transformers as tf

    check_preset(preset, architecture)
    family = FAMILY[architecture]
    V = specials.vocab_size
    if family == "llama":
        d, n, h, kv, ff = DECODER_PRESETS[preset]
        cfg = tf.LlamaConfig(
            vocab_size=V, hidden_size=d, num_hidden_layers=n, num_attention_heads=h,
            num_key_value_heads=kv, intermediate_size=ff, max_position_embeddings=max_positions,
            tie_word_embeddings=True, bos_token_id=specials.eos, eos_token_id=specials.eos,
            pad_token_id=specials.pad, rope_theta=10000.0, attention_dropout=0.0,
        )
    elif family == "modernbert":
        d, n, h, _, ff = ENCODER_PRESETS[preset]
        cfg = tf.ModernBertConfig(
            vocab_size=V, hidden_size=d, num_hidden_layers=n, num_attention_heads=h,
            intermediate_size=ff, max_position_embeddings=max_positions,
            pad_token_id=specials.pad, eos_token_id=specials.eos, bos_token_id=specials.eos,
            cls_token_id=specials.eos, sep_token_id=specials.eos,
            global_attn_every_n_layers=3, local_attention=128,
            embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0,
            tie_word_embeddings=True,
        )
    else:
        d, n, h, ff = ENCDEC_PRESETS[preset]
        cfg = tf.T5Config(
            vocab_size=V, d_model=d, d_kv=d // h, d_ff=ff, num_layers=n, num_decoder_layers=n,
            num_heads=h, feed_forward_proj="gated-gelu", dropout_rate=0.0,
            pad_token_id=specials.pad, eos_token_id=specials.eos,
            decoder_start_token_id=specials.pad, tie_word_embeddings=True,
        )
    for key, value in (overrides or {}).items():
        if not hasattr(cfg, key):
            raise UserError(f"model config has no attribute '{key}' (--set model.config.{key})")
        setattr(cfg, key, value)
    return cfg


def model_class(architecture: str):  # -> type[transformers.PreTrainedModel]
    import transformers as tf

    return {"llama": tf.LlamaForCausalLM, "modernbert": tf.ModernBertForMaskedLM,
            "t5": tf.T5ForConditionalGeneration}[FAMILY[architecture]]


def forward_inputs(model, inputs: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    """The model's keyword inputs. A custom 4-D mask (packed documents kept apart) reaches
    every layer of a model as it is, so a model with sliding-window layers (ModernBERT: local
    attention in two layers of three) would let those layers see the whole document; give
    them the same mask cut to their window, as transformers builds it from a 2-D mask
    (``sliding_window_bidirectional_overlay``: |i - j| <= sliding_window)."""
    import torch

    mask = inputs.get("attention_mask")
    cfg = getattr(model, "config", None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 \
            or "sliding_attention" not in (getattr(cfg, "layer_types", None) or ()):
        return inputs
    idx = torch.arange(mask.shape[-1], device=mask.device)
    band = (idx[:, None] - idx[None, :]).abs() <= cfg.sliding_window  # (T, T)
    return {**inputs, "attention_mask": {"full_attention": mask, "sliding_attention": mask & band}}


def build_model(preset: str, architecture: str, specials: SpecialIds, max_positions: int,
                seed: int, overrides: dict[str, Any] | None = None, *, meta: bool = False):
    """A freshly initialised model; the seed fixes its weights (``models.init``: each module
    under a seed of its own name, so a sharded build gets the same values). With ``meta`` the
    model is left on the meta device, for ``models.init.materialise`` to fill in later."""
    import torch

    from lmobjectives.models.init import materialise

    cfg = model_config(preset, architecture, specials, max_positions, overrides)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):  # shapes only: the values come from materialise, unit by unit
        model = model_class(architecture)(cfg)
    if not meta:
        materialise(model, seed, torch.device("cpu"))
    return model


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# The transformers auto class that loads each architecture's model from a directory.
AUTO_CLASS_NAMES = {"decoder": "AutoModelForCausalLM", "prefix_lm": "AutoModelForCausalLM",
                    "encoder": "AutoModelForMaskedLM", "encoder_decoder": "AutoModelForSeq2SeqLM",
                    "bidirectional_decoder": "AutoModelForCausalLM"}


def auto_class(architecture: str) -> Any:
    """``transformers.AutoModelFor...`` for ``architecture`` (imported on first use)."""
    import transformers as tf

    return getattr(tf, AUTO_CLASS_NAMES[architecture])
