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


def split_lines(head: bytes, f: BinaryIO) -> Iterator[bytes]:
    """Lines (with their b"\\n") of `head` followed by the rest of `f`, read in 1 MiB chunks.

    Pieces of an unfinished line are joined once, when it ends, so a huge line costs O(n).
    """
    pending: list[bytes] = []
    chunk = head
    while chunk:
        parts = chunk.split(b"\n")
        for part in parts[:-1]:
            pending.append(part + b"\n")
            yield b"".join(pending)
            pending = []
        if parts[-1]:
            pending.append(parts[-1])
        chunk = f.read(_CHUNK_BYTES)
    if pending:
        yield b"".join(pending)
