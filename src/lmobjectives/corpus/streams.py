"""Byte streams under the JSONL reader: gzip/zstd decompression and line splitting that
keeps the byte offset of every line (warnings name where a bad row starts)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import BinaryIO, Iterator

import zstandard

_CHUNK_BYTES = 1 << 20


def first_bad_utf8(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    return len(data)


class _ZstdReader:
    """Minimal binary reader over a .zst file that, unlike zstandard's stream reader, reports
    truncation: every frame must reach its end marker. Frames may follow one another."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False
        self._buffer = b""

    def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            compressed = self._file.read(_CHUNK_BYTES)
            if not compressed:
                if self._in_frame:
                    raise EOFError("zstd stream ends in the middle of a frame (truncated file)")
                break
            while compressed:
                if self._obj.eof:
                    self._obj = self._dctx.decompressobj()
                self._in_frame = True
                self._buffer += self._obj.decompress(compressed)
                compressed = self._obj.unused_data if self._obj.eof else b""
                self._in_frame = not self._obj.eof
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "_ZstdReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_jsonl(path: Path) -> BinaryIO:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if name.endswith(".zst"):
        return _ZstdReader(path)  # type: ignore[return-value]
    return open(path, "rb")


class OversizeLine(bytes):
    """Stands for a line longer than the reader's bound: its content was dropped while read,
    only its length (``size``) is kept, so the offsets of the lines after it stay right."""

    size: int

    def __new__(cls, size: int) -> "OversizeLine":
        line = super().__new__(cls, b"")
        line.size = size
        return line


def split_lines(head: bytes, f: BinaryIO, max_line: int | None = None) -> Iterator[bytes]:
    """Lines (with their b"\\n") of `head` followed by the rest of `f`, read in 1 MiB chunks.

    Pieces of an unfinished line are joined once, when it ends, so a huge line costs O(n).
    A line longer than ``max_line`` bytes is not kept: memory stays O(max_line + chunk)
    whatever the input (a 100 MB line without a newline), and an ``OversizeLine`` takes its place.
    """
    pending: list[bytes] = []
    held, dropped = 0, 0  # bytes in ``pending``; bytes of the current line already let go
    chunk = head
    while chunk:
        parts = chunk.split(b"\n")
        for part in parts[:-1]:
            if dropped or (max_line is not None and held + len(part) + 1 > max_line):
                yield OversizeLine(dropped + held + len(part) + 1)
            else:
                pending.append(part + b"\n")
                yield b"".join(pending)
            pending, held, dropped = [], 0, 0
        if parts[-1]:
            if dropped or (max_line is not None and held + len(parts[-1]) > max_line):
                dropped, pending, held = dropped + held + len(parts[-1]), [], 0
            else:
                pending.append(parts[-1])
                held += len(parts[-1])
        chunk = f.read(_CHUNK_BYTES)
    if dropped:
        yield OversizeLine(dropped)
    elif pending:
        yield b"".join(pending)
