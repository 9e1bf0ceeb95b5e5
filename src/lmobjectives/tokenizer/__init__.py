"""Tokenizer stage: byte-level BPE with the reserved special tokens at ids 0..N-1."""

from __future__ import annotations

from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds
from lmobjectives.tokenizer.train import (
    default_tokenizer_dir,
    encode_data,
    load_tokenizer,
    save_hf_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

__all__ = [
    "SPECIAL_TOKENS", "SpecialIds", "default_tokenizer_dir", "encode_data", "load_tokenizer",
    "save_hf_tokenizer", "tokenizer_fingerprint", "train_tokenizer",
]
