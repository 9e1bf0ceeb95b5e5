"""Corpus readers on tiny temporary files: every format, every bad input, and arbitrary bytes."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
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


def read(paths, **kw):
    warnings: list[str] = []
    stats = CorpusStats()
    docs = list(iter_documents(paths, warn=warnings.append, stats=stats, **kw))
    return docs, stats, warnings


def jsonl_bytes(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


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


# -- JSONL -----------------------------------------------------------------------------------


def test_jsonl_rows_with_line_numbers_and_custom_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes([{"body": "one", "id": 1}]) + b"\n" + jsonl_bytes([{"body": "two"}, {"body": " "}]))
    docs, stats, _ = read([str(path)], text_field="body")
    assert docs == [Document("one", f"{path}:1"), Document("two", f"{path}:3")]
    assert stats.dropped_empty == 1 and stats.files == 1


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl(tmp_path, suffix):
    rows = [{"text": f"doc {i} é"} for i in range(500)]
    raw = jsonl_bytes(rows)
    path = tmp_path / f"d{suffix}"
    if suffix.endswith("gz"):
        path.write_bytes(gzip.compress(raw))
    else:  # two frames back to back, as `cat a.zst b.zst` makes
        c = zstandard.ZstdCompressor()
        path.write_bytes(c.compress(raw[:1000]) + c.compress(raw[1000:]))
    docs, _, _ = read([str(path)])
    assert [d.text for d in docs] == [r["text"] for r in rows]
    assert docs[-1].source == f"{path}:500"


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_jsonl(tmp_path, suffix):
    raw = jsonl_bytes([{"text": f"document number {i}"} for i in range(3000)])
    blob = gzip.compress(raw) if suffix.endswith("gz") else zstandard.ZstdCompressor().compress(raw)
    path = tmp_path / f"d{suffix}"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match="d.jsonl"):
        read([str(path)])


def test_not_compressed_at_all(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(jsonl_bytes([{"text": "plain"}]))
    with pytest.raises(UserError, match="corrupt"):
        read([str(path)])


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("x")

    def denied(self, *a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)  # chmod 0 does not stop root
    with pytest.raises(UserError, match="a.txt: cannot read file \\(Permission denied\\)"):
        read([str(path)])


MALFORMED = jsonl_bytes([{"text": "good"}]) + b'{"text": "unterminated\n' + b"[1, 2]\n" + jsonl_bytes(
    [{"other": "x"}, {"text": 5}, {"text": "also good"}])


def test_malformed_jsonl_strict_names_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(MALFORMED)
    with pytest.raises(UserError, match=r"m\.jsonl:2: malformed JSONL row: not valid JSON"):
        read([str(path)], encoding="strict")


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_malformed_jsonl_lenient_skips_with_one_warning(tmp_path, policy):
    path = tmp_path / "m.jsonl"
    path.write_bytes(MALFORMED)
    docs, stats, warnings = read([str(path)], encoding=policy)
    assert [d.text for d in docs] == ["good", "also good"]
    assert stats.skipped_malformed == 4
    assert warnings == [f"{path}: skipped 4 malformed line(s); first at line 2: " + warnings[0].split("line 2: ")[1]]


def test_wrong_text_field_everywhere_says_check_text_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(jsonl_bytes([{"content": "a"}, {"content": "b"}]))
    with pytest.raises(UserError, match="2 malformed JSONL row.*text_field"):
        read([str(path)])
    with pytest.raises(UserError, match=r"m\.jsonl:1: .*no field 'text' \(fields: content\)"):
        read([str(path)], encoding="strict")


def test_jsonl_invalid_utf8_under_each_policy(tmp_path):
    path = tmp_path / "u.jsonl"
    good = jsonl_bytes([{"text": "ok"}])  # 15 bytes
    path.write_bytes(good + b'{"text": "x\xffy"}\n')
    with pytest.raises(UserError, match=r"u\.jsonl:2: invalid UTF-8 at byte offset 26"):
        read([str(path)], encoding="strict")
    docs, _, _ = read([str(path)], encoding="replace")
    assert [d.text for d in docs] == ["ok", "x\ufffdy"]
    docs, stats, warnings = read([str(path)], encoding="skip")
    assert [d.text for d in docs] == ["ok"] and stats.skipped_undecodable == 1
    assert len(warnings) == 1 and "line 2" in warnings[0] and "byte offset 26" in warnings[0]


def test_jsonl_lone_surrogate_under_each_policy(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"text": "a\\ud800b"}\n{"text": "fine \\ud83d\\ude00"}\n')
    with pytest.raises(UserError, match="lone surrogate"):
        read([str(path)], encoding="strict")
    assert [d.text for d in read([str(path)], encoding="replace")[0]] == ["a\ufffdb", "fine 😀"]
    docs, stats, _ = read([str(path)], encoding="skip")
    assert [d.text for d in docs] == ["fine 😀"] and stats.skipped_undecodable == 1


def test_binary_jsonl_is_skipped(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b"\x00" * 10)
    (tmp_path / "a.txt").write_text("a")
    docs, stats, _ = read([str(tmp_path)])
    assert [d.text for d in docs] == ["a"] and stats.skipped_binary == 1


def test_jsonl_long_line_across_chunks(tmp_path):
    text = "x" * (3 << 20)  # longer than the 1 MiB read chunk
    path = tmp_path / "long.jsonl"
    path.write_bytes(jsonl_bytes([{"text": text}, {"text": "after"}]).rstrip(b"\n"))  # no final newline
    docs, _, _ = read([str(path)])
    assert [d.text for d in docs] == [text, "after"]


# -- parquet ---------------------------------------------------------------------------------


def write_parquet(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path, row_group_size=2)


def test_parquet_rows(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(path, pa.table({"text": ["a", None, "  ", "d", "é"], "n": [1, 2, 3, 4, 5]}))
    docs, stats, _ = read([str(path)])
    assert docs == [Document("a", f"{path}:1"), Document("d", f"{path}:4"), Document("é", f"{path}:5")]
    assert stats.dropped_empty == 2


def test_parquet_binary_column_under_each_policy(tmp_path):
    path = tmp_path / "b.parquet"
    write_parquet(path, pa.table({"body": pa.array([b"ok", b"x\xff", b"\xfe"], type=pa.binary())}))
    with pytest.raises(UserError, match=r"b\.parquet:2: invalid UTF-8 at byte offset 1"):
        read([str(path)], text_field="body", encoding="strict")
    assert [d.text for d in read([str(path)], text_field="body", encoding="replace")[0]] == ["ok", "x\ufffd", "\ufffd"]
    docs, stats, warnings = read([str(path)], text_field="body")
    assert [d.text for d in docs] == ["ok"] and stats.skipped_undecodable == 2
    assert warnings == [f"{path}: skipped 2 undecodable row(s); first at row 2: invalid UTF-8 at byte offset 1 of the value"]


def test_parquet_missing_or_non_text_column(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(path, pa.table({"n": [1, 2], "text2": ["a", "b"]}))
    with pytest.raises(UserError, match=r"no column 'text' \(columns: n, text2\)"):
        read([str(path)])
    with pytest.raises(UserError, match="has type int64"):
        read([str(path)], text_field="n")


def test_truncated_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(path, pa.table({"text": [f"row {i}" for i in range(100)]}))
    data = path.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 4, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(UserError, match=r"d\.parquet: not a readable parquet file"):
            read([str(path)])


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
