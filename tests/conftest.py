"""Shared fixtures: tiny in-memory stores and the special ids of the shipped tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lmobjectives.tokenizer.special import SpecialIds  # noqa: E402


@pytest.fixture
def specials() -> SpecialIds:
    return SpecialIds.default(vocab_size=512)
