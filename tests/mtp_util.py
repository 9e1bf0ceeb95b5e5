"""A tiny multi-token-prediction model, shared by the MTP test files."""

from __future__ import annotations

from lmobjectives.models.mtp import MTPModel, MTPSpec, init_heads
from lmobjectives.models.presets import build_model

DESIGNS = ("parallel", "sequential")


def tiny_mtp(specials, n_heads: int, design: str, seed: int = 0, **config) -> MTPModel:  # noqa: ANN001
    lm = build_model("tiny", "decoder", specials, max_positions=128, seed=seed, overrides=config)
    model = MTPModel(lm, MTPSpec(n_heads, design))
    init_heads(model, seed + 1)
    return model.eval()
