"""Byte-level BPE: special ids, exact round trips (tokenizers and AutoTokenizer), the shipped asset."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lmobjectives.errors import UserError
from lmobjectives.tokenizer import (
    SPECIAL_TOKENS,
    SpecialIds,
    default_tokenizer_dir,
    encode_data,
    load_tokenizer,
    save_hf_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from lmobjectives.tokenizer.train import MIN_VOCAB_SIZE

TINY_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "for i in range(10):\n    print(i)\n" * 3,
    "naïve café — 中文 テキスト 😀\n",
]
N_SPECIAL = len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def shipped():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def shipped_hf():
    return AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))


def test_training_puts_specials_first_then_bytes(tmp_path):
    tok = train_tokenizer(TINY_CORPUS, 600, tmp_path)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(N_SPECIAL))
    assert N_SPECIAL + 256 < tok.get_vocab_size() <= 600  # some merges, capped by the request
    assert SpecialIds.from_vocab(vocab, tok.get_vocab_size()) == SpecialIds.default(tok.get_vocab_size())
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()


def test_training_is_deterministic():
    a = train_tokenizer(TINY_CORPUS * 3, 500, None)
    b = train_tokenizer(iter(TINY_CORPUS * 3), 500, None)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    c = train_tokenizer(TINY_CORPUS[:2], 500, None)
    assert tokenizer_fingerprint(c) != tokenizer_fingerprint(a)


def test_training_rejects_bad_requests():
    with pytest.raises(UserError, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(TINY_CORPUS, MIN_VOCAB_SIZE - 1, None)
    with pytest.raises(UserError, match="zero documents"):
        train_tokenizer([], 1000, None)


def test_shipped_tokenizer_asset(shipped, shipped_hf):
    directory = default_tokenizer_dir()
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 1_000_000
    assert shipped.get_vocab_size() == 8192 and len(shipped_hf) == 8192
    assert [shipped.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(N_SPECIAL))
    assert [shipped_hf.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(N_SPECIAL))
    ids = SpecialIds.default()
    assert (shipped_hf.eos_token_id, shipped_hf.pad_token_id, shipped_hf.mask_token_id) == (ids.eos, ids.pad, ids.mask)
    build_info = json.loads((directory / "build_info.json").read_text())
    assert build_info["tokenizer_fingerprint"] == tokenizer_fingerprint(shipped)
    # Loading through transformers must not change what the fingerprint sees.
    assert tokenizer_fingerprint(shipped_hf) == tokenizer_fingerprint(shipped)
    assert build_info["vocab_size"] == 8192
    # Code from the corpus compresses: well under one token per 2 bytes.
    code = "def main():\n    parser = argparse.ArgumentParser()\n    return parser.parse_args()\n"
    assert len(shipped.encode(code).ids) < len(code) / 2


def test_hf_encode_adds_nothing(shipped, shipped_hf):
    text = "x = 1\n"
    assert shipped_hf(text)["input_ids"] == shipped.encode(text).ids == shipped_hf.encode(text)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=200))
def test_round_trip_any_text_both_paths(shipped, shipped_hf, text):
    ids = shipped.encode(text).ids
    assert shipped.decode(ids, skip_special_tokens=False) == text
    assert shipped_hf.decode(shipped_hf.encode(text)) == text


def test_round_trip_awkward_whitespace(shipped, shipped_hf):
    for text in [" a .", "a ,b", " ' s", "do n't", "\r\n\t \u00a0\u3000", "\x00", "  leading", "trailing  "]:
        assert shipped.decode(shipped.encode(text).ids, skip_special_tokens=False) == text
        assert shipped_hf.decode(shipped_hf.encode(text)) == text


special_strings = st.sampled_from(SPECIAL_TOKENS)
text_with_specials = st.lists(st.one_of(st.text(max_size=20), special_strings), max_size=8).map("".join)


@settings(max_examples=100, deadline=None)
@given(text=text_with_specials)
def test_data_text_never_becomes_special_ids(shipped, text):
    tok = shipped
    before = tok.encode_special_tokens
    [ids] = encode_data(tok, [text])
    assert tok.encode_special_tokens == before  # flag restored
    assert all(i >= N_SPECIAL for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_strings_do_become_ids_without_the_flag(shipped):
    # The contrast that makes the property above meaningful.
    assert shipped.encode("a<|endoftext|>b").ids[1] == 0
    [ids] = encode_data(shipped, ["a<|endoftext|>b"])
    assert 0 not in ids


def test_save_and_reload_hf_directory(tmp_path):
    tok = train_tokenizer(TINY_CORPUS, 500, None)
    save_hf_tokenizer(tok, tmp_path, model_max_length=256)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.model_max_length == 256
    assert hf.eos_token == SPECIAL_TOKENS[0] and hf.pad_token_id == 1 and hf.mask_token_id == 2
    assert tokenizer_fingerprint(load_tokenizer(tmp_path)) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "tokenizer.json")) == tokenizer_fingerprint(tok)
    text = "naïve café  — ok .\n"
    assert hf.decode(hf.encode(text)) == text
    assert set(hf.all_special_tokens) >= set(SPECIAL_TOKENS[:3])
    hf.save_pretrained(str(tmp_path / "resaved"))
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "resaved")) == tokenizer_fingerprint(tok)
    with pytest.raises(TypeError):
        tokenizer_fingerprint("not a tokenizer")


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
