"""The token store: manifest, split, dtype, fingerprints, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmobjectives.errors import UserError
from lmobjectives.store.prepare import prepare_store
from lmobjectives.store.store import TokenStore, is_val, token_dtype, write_store
from lmobjectives.tokenizer import load_tokenizer, tokenizer_fingerprint


def test_manifest_counts_and_documents_round_trip(small_corpus, tmp_path):
    tok = load_tokenizer(None)
    store = prepare_store([small_corpus], tok, tmp_path / "s", val_fraction=0.2, progress=False)
    m = store.manifest
    assert m["documents"] == m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"]
    assert m["tokens"] == m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    assert m["splits"]["val"]["documents"] > 0 and m["dtype"] == "uint16"
    assert m["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert len(m["sources"]) == len(list(Path(small_corpus).iterdir()))
    # Every stored document decodes back to one source file's text, followed by EOS.
    texts = {p.read_text() for p in Path(small_corpus).iterdir()}
    table = store.split("train")
    for i in range(min(5, len(table.docs))):
        ids = table.document(i)
        assert ids[-1] == tok.token_to_id("<|endoftext|>")
        assert tok.decode(ids[:-1].tolist(), skip_special_tokens=False) in texts
    assert (tmp_path / "s" / "tokenizer" / "tokenizer.json").is_file()


def test_split_is_by_document_hash():
    assert is_val("same text", 0.5, 0) == is_val("same text", 0.5, 0)
    shares = np.mean([is_val(f"doc {i}", 0.1, 0) for i in range(5000)])
    assert 0.08 < shares < 0.12
    assert not any(is_val(f"doc {i}", 0.0, 0) for i in range(100))


def test_wide_vocabularies_use_uint32():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_other_tokenizer_is_refused(small_store, tmp_path):
    from lmobjectives.tokenizer import train_tokenizer

    other = train_tokenizer(["some other text entirely, with its own merges"] * 50, 400, None)
    with pytest.raises(UserError, match="different tokenizer"):
        TokenStore(small_store).check_tokenizer(tokenizer_fingerprint(other))


def test_failed_write_leaves_nothing_under_the_final_name(tmp_path):
    def docs():
        yield "a", np.array([5, 6])
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_store(tmp_path / "s", docs(), vocab_size=512, eos=0, tokenizer_fingerprint="x", sources={})
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory is gone too


def test_empty_corpus_is_a_user_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "blank.txt").write_text("   \n")
    with pytest.raises(UserError):
        prepare_store([str(tmp_path / "c")], load_tokenizer(None), tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_store_fingerprint_changes_with_content(small_corpus, tmp_path):
    tok = load_tokenizer(None)
    a = prepare_store([small_corpus], tok, tmp_path / "a", val_fraction=0.1, progress=False)
    b = prepare_store([small_corpus], tok, tmp_path / "b", val_fraction=0.1, progress=False)
    c = prepare_store([small_corpus], tok, tmp_path / "c", val_fraction=0.3, progress=False)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["fingerprint"] == a.fingerprint
