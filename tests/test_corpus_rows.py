"""Corpus readers on row formats: JSONL (plain, gzip, zstd, malformed, undecodable, long
lines) and parquet (text and binary columns, missing columns, truncated files)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmobjectives.corpus import Document
from lmobjectives.errors import UserError
from corpus_util import jsonl_bytes, read


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
