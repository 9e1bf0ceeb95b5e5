"""Corpus readers on tiny temporary files: plain files, bad inputs, fingerprints, the default
corpus and arbitrary bytes (JSONL and parquet rows: ``test_corpus_rows.py``)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmobjectives.corpus import (
    DEFAULT_CORPUS,
    CorpusStats,
    Document,
    default_corpus_info,
    default_corpus_paths,
    file_fingerprints,
    iter_documents,
    resolve_files,
)
from lmobjectives.corpus.default import default_prose_topics, fingerprint_items
from lmobjectives.errors import UserError
from corpus_util import read


# -- plain files, directories, globs ---------------------------------------------------------


def test_directory_is_walked_recursively_sorted_and_hidden_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_bytes(b"print(1)\r\n")  # line endings are kept as is
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: x\n")
    (tmp_path / ".hidden.txt").write_text("secret\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "m.txt").write_text("cached\n")
    docs, stats, warnings = read([str(tmp_path)])
    assert docs == [Document("alpha\n", str(tmp_path / "a.txt")), Document("print(1)\r\n", str(tmp_path / "b" / "z.py"))]
    assert stats.documents == 2 and stats.files == 2 and stats.text_bytes == 6 + 10
    assert warnings == []


def test_glob_and_argument_order_and_dedup(tmp_path):
    for name in ["b.txt", "a.txt", "c.md"]:
        (tmp_path / name).write_text(name)
    docs, _, _ = read([str(tmp_path / "c.md"), str(tmp_path / "*.txt"), str(tmp_path)])
    # c.md first (argument order), then the glob sorted; the directory adds nothing new.
    assert [d.text for d in docs] == ["c.md", "a.txt", "b.txt"]
    assert resolve_files(str(tmp_path / "**" / "*.txt")) == [tmp_path / "a.txt", tmp_path / "b.txt"]


def test_symlink_leaving_the_directory_is_skipped(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("outside\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside.txt").write_text("inside\n")
    (root / "link.txt").symlink_to(outside)
    (root / "ok_link.txt").symlink_to(root / "inside.txt")
    files = resolve_files([str(root)])
    assert root / "link.txt" not in files
    assert files == [root / "inside.txt"]  # ok_link resolves to the same file: read once


def test_bom_is_dropped(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello")
    docs, _, _ = read([str(tmp_path / "a.txt")])
    assert docs[0].text == "hello"


def test_a_bare_string_is_one_path(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert [d.text for d in read(str(tmp_path / "a.txt"))[0]] == ["x"]


# -- bad inputs ------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read([str(tmp_path / "nope.txt")])


def test_missing_path_fails_before_reading_anything(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    seen = []
    with pytest.raises(UserError, match="does not exist"):
        for doc in iter_documents([str(tmp_path / "a.txt"), str(tmp_path / "nope")]):
            seen.append(doc)
    assert seen == []


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(UserError, match="matches no files"):
        read([str(tmp_path / "*.txt")])


def test_empty_directory(tmp_path):
    with pytest.raises(UserError, match="contains no files"):
        read([str(tmp_path)])


def test_no_paths():
    with pytest.raises(UserError, match="no corpus paths"):
        read([])


def test_unknown_policy(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match="encoding policy"):
        read([str(tmp_path / "a.txt")], encoding="latin-1")


def test_zero_byte_and_whitespace_only_are_dropped_and_counted(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b" \n\t\r\n")
    (tmp_path / "real.txt").write_bytes(b"x")
    docs, stats, _ = read([str(tmp_path)])
    assert [d.text for d in docs] == ["x"]
    assert stats.dropped_empty == 2


def test_corpus_of_only_empty_files_says_so(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"   \n")
    with pytest.raises(UserError, match=r"no documents from 2 file\(s\): 2 empty or whitespace-only"):
        read([str(tmp_path)])


def test_nul_bytes_mean_binary_skipped_with_one_warning(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc\x00def")
    (tmp_path / "b.txt").write_text("text")
    for policy in ("strict", "replace", "skip"):
        docs, stats, warnings = read([str(tmp_path)], encoding=policy)
        assert [d.text for d in docs] == ["text"]
        assert stats.skipped_binary == 1
        assert len(warnings) == 1 and "a.bin" in warnings[0] and "binary" in warnings[0]


def test_nul_after_the_sniff_window_is_text(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 8192 + b"\x00")
    docs, stats, _ = read([str(tmp_path / "a.txt")])
    assert docs[0].text == "a" * 8192 + "\x00" and stats.skipped_binary == 0


def test_only_binary_corpus_says_so(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x00\x01")
    with pytest.raises(UserError, match=r"1 binary file"):
        read([str(tmp_path)])


BAD_UTF8 = b"caf\xc3\xa9 ok\nbad \xff here"  # the bad byte sits at offset 13


def test_invalid_utf8_strict_names_file_and_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(BAD_UTF8)
    with pytest.raises(UserError, match=r"bad\.txt: invalid UTF-8 at byte offset 13"):
        read([str(path)], encoding="strict")


def test_invalid_utf8_replace_substitutes(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(BAD_UTF8)
    docs, stats, warnings = read([str(path)], encoding="replace")
    assert docs[0].text == "café ok\nbad \ufffd here"
    assert stats.skipped_undecodable == 0 and warnings == []


def test_invalid_utf8_skip_warns_once_with_offset(tmp_path):
    (tmp_path / "bad.txt").write_bytes(BAD_UTF8)
    (tmp_path / "good.txt").write_text("good")
    docs, stats, warnings = read([str(tmp_path)])  # skip is the default
    assert [d.text for d in docs] == ["good"]
    assert stats.skipped_undecodable == 1
    assert len(warnings) == 1 and "bad.txt" in warnings[0] and "byte offset 13" in warnings[0]


def test_all_undecodable_corpus_says_so(tmp_path):
    (tmp_path / "bad.txt").write_bytes(BAD_UTF8)
    with pytest.raises(UserError, match="undecodable"):
        read([str(tmp_path)], encoding="skip")


# -- fingerprints and the default corpus -----------------------------------------------------


def test_file_fingerprints_are_sha256_of_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"abc")
    (tmp_path / "b.txt").write_bytes(b"\x00")
    fps = file_fingerprints([str(tmp_path)])
    assert fps == {str(tmp_path / "a.txt"): hashlib.sha256(b"abc").hexdigest(),
                   str(tmp_path / "b.txt"): hashlib.sha256(b"\x00").hexdigest()}


def test_fingerprint_framing_separates_neighbours():
    assert fingerprint_items([("a", b"bc")]) != fingerprint_items([("ab", b"c")])
    assert fingerprint_items([("a", b"b"), ("c", b"")]) != fingerprint_items([("a", b""), ("bc", b"")])


def test_default_corpus_parts():
    prose, stats_p, _ = read(["default:prose"])
    assert stats_p.files == 0 and len(prose) == len(default_prose_topics()) > 10
    assert all(d.source.startswith("pydoc_data.topics:") for d in prose)
    code_stats = CorpusStats()
    first_code = next(iter_documents(["default:code"], stats=code_stats))
    assert first_code.source == default_corpus_paths()[0] and first_code.source.endswith(".py")
    paths = default_corpus_paths()
    assert paths == sorted(paths, key=lambda p: Path(p).relative_to(Path(paths[0]).parent).as_posix())
    assert not any(f"{os.sep}test{os.sep}" in p or "idlelib" in p or "site-packages" in p for p in paths)
    with pytest.raises(UserError, match="unknown default corpus part"):
        read(["default:poetry"])


def test_default_corpus_info_covers_both_parts():
    info = default_corpus_info(DEFAULT_CORPUS)
    assert set(info["parts"]) == {"prose", "code"}
    assert info["files"] == len(default_corpus_paths())
    assert 4_000_000 < info["parts"]["code"]["bytes"] < 10_000_000  # the documented size target
    assert info["bytes"] == info["parts"]["code"]["bytes"] + info["parts"]["prose"]["bytes"]
    fps = file_fingerprints(["default"])
    assert fps == {"default:prose": info["parts"]["prose"]["fingerprint"],
                   "default:code": info["parts"]["code"]["fingerprint"]}
    assert default_corpus_info("default:prose")["fingerprint"] != info["fingerprint"]
    topic_bytes = sum(len(t.encode()) for _, t in default_prose_topics())
    assert info["parts"]["prose"]["bytes"] == topic_bytes


# -- arbitrary bytes: only documented errors ---------------------------------------------------


SUFFIXES = [".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=300),
                      st.lists(st.one_of(st.binary(max_size=30), st.text(max_size=20).map(
                          lambda t: json.dumps({"text": t}).encode())), max_size=6).map(b"\n".join)),
       suffix=st.sampled_from(SUFFIXES), policy=st.sampled_from(["strict", "replace", "skip"]))
def test_arbitrary_bytes_raise_only_user_errors(data, suffix, policy):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f{suffix}"
        path.write_bytes(data)
        try:
            docs, stats, _ = read([str(path)], encoding=policy)
        except UserError as exc:
            assert str(exc)
            return
        assert docs and all(d.text.strip() for d in docs)
        assert stats.documents == len(docs)
        for d in docs:
            d.text.encode("utf-8")  # always valid Unicode text
        if suffix == ".txt" and policy != "skip":
            expected = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
            assert docs[0].text == expected
