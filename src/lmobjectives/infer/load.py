"""Load a finished run (its ``final/``) or any local HF model directory for inference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmobjectives.models.mtp import HEADS_JSON, load_heads
from lmobjectives.models.presets import auto_class
from lmobjectives.rundir import model_dir
from lmobjectives.tokenizer import load_tokenizer
from lmobjectives.tokenizer.special import SpecialIds


@dataclass
class Loaded:
    model: Any
    tokenizer: Any  # tokenizers.Tokenizer
    specials: SpecialIds
    architecture: str
    path: Path
    run_dir: Path | None


def load_model(path: str | Path) -> Loaded:
    import transformers as tf
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no per-load progress bar in command output
    mdir, run_dir = model_dir(path)
    architecture = None
    if run_dir is not None and (run_dir / "run.json").is_file():
        architecture = json.loads((run_dir / "run.json").read_text()).get("architecture")
    cfg = tf.AutoConfig.from_pretrained(str(mdir), trust_remote_code=False)
    if architecture is None:
        if getattr(cfg, "is_encoder_decoder", False):
            architecture = "encoder_decoder"
        elif cfg.model_type in ("modernbert", "bert", "roberta"):
            architecture = "encoder"
        else:
            architecture = "decoder"
    auto = auto_class(architecture)
    # A prefix LM needs sdpa, the attention that honours its boolean 4-D mask (data/converters.py).
    attn = "sdpa" if architecture == "prefix_lm" else None
    model = auto.from_pretrained(str(mdir), trust_remote_code=False, dtype=torch.float32,
                                 attn_implementation=attn)
    if (mdir / HEADS_JSON).is_file():  # a multi-token-prediction run: put its extra heads back
        model = load_heads(model, mdir)
    model.eval()
    tok = load_tokenizer(str(mdir))
    specials = SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size())
    return Loaded(model=model, tokenizer=tok, specials=specials, architecture=architecture,
                  path=mdir, run_dir=run_dir)
