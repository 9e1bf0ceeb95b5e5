"""Corpus readers: paths in, `Document`s out, with one policy for every kind of bad input.

Formats, chosen by file name (case-insensitive):

* `*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst`: one JSON object per line, text in `text_field`;
  one row = one document, source `PATH:LINE` (1-based). Blank lines are ignored.
* `*.parquet`: column `text_field` (string or binary); one row = one document, source
  `PATH:ROW` (1-based).
* an HF `datasets` directory (`save_to_disk`) and `*.arrow` files: column `text_field`, the
  split `split` of a `DatasetDict`; one row = one document (see `corpus.hf_datasets`).
* anything else: plain text or source code, one file = one document, source `PATH`.
  A leading UTF-8 byte-order mark is dropped; nothing else is changed (line endings kept).
* `"default"`, `"default:code"`, `"default:prose"`: the embedded default corpus
  (see `corpus.default`); prose documents have source `pydoc_data.topics:NAME`.

Directories are walked recursively (hidden entries and `__pycache__` skipped; symlinks that
lead outside the directory skipped); glob patterns (`*`, `?`, `[`, `**`) are expanded. Each
argument's files are sorted; arguments keep their order; a file named twice is read once.

Bad input, and what happens (policy = the `encoding` argument):

| input                                   | strict      | replace                | skip (default) |
|-----------------------------------------|-------------|------------------------|----------------|
| missing path / glob matching nothing    | UserError   | UserError              | UserError      |
| invalid UTF-8 (file, row, or \\uD800)   | UserError   | U+FFFD substituted     | file/row skipped, one warning per file |
| malformed JSONL row (not JSON, not an object, field missing or not a string) | UserError | one warning per file, rows skipped | same as replace |
| NUL byte in the first 8 KiB (binary)    | one warning, file skipped (all policies)                  |
| empty / whitespace-only document        | dropped and counted (all policies)                        |
| corrupt gzip/zstd/parquet container     | UserError (all policies: the file cannot be read)         |
| no documents at all                     | UserError saying why (all policies)                       |

Strict fails on the first problem so that a pipeline can insist on clean data; the other
policies warn once per file (naming the file, line and byte offset of the first problem) so
a large corpus with a few bad rows still trains, and counts land in `CorpusStats`.

Worked example: a directory holding `a.txt` = b"hi\\n", `b.txt` = b"  \\n", `c.bin` =
b"\\x00\\x01" yields one Document(text="hi\\n", source=".../a.txt"); stats: documents=1,
dropped_empty=1, skipped_binary=1, plus one warning line for c.bin.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import zstandard

from lmobjectives.corpus import default as default_corpus
from lmobjectives.corpus import hf_datasets
from lmobjectives.corpus.paths import as_list, reading_plan
from lmobjectives.corpus.streams import first_bad_utf8, open_jsonl, split_lines
from lmobjectives.errors import UserError

EncodingPolicy = Literal["strict", "replace", "skip"]
ENCODING_POLICIES: tuple[str, ...] = ("strict", "replace", "skip")
# A NUL byte in the first 8 KiB marks a file as binary (the heuristic git uses, on 8000 bytes).
BINARY_SNIFF_BYTES = 8192
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # file path; `PATH:LINE` for JSONL rows, `PATH:ROW` for parquet rows


@dataclass
class CorpusStats:
    """Counts filled in by `iter_documents(..., stats=CorpusStats())` as it reads."""

    files: int = 0
    documents: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents yielded (for bits-per-byte)
    dropped_empty: int = 0
    skipped_binary: int = 0
    skipped_undecodable: int = 0
    skipped_malformed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class _Reader:
    """Shared state for one `iter_documents` call: policy, counters, warning sink."""

    def __init__(self, policy: str, text_field: str, warn: Callable[[str], None], stats: CorpusStats):
        self.policy = policy
        self.text_field = text_field
        self.warn = warn
        self.stats = stats

    def emit(self, text: str, source: str) -> Iterator[Document]:
        if not text.strip():
            self.stats.dropped_empty += 1
            return
        self.stats.documents += 1
        self.stats.text_bytes += len(text.encode("utf-8"))
        yield Document(text=text, source=source)

    def decode(self, data: bytes, where: str, base_offset: int = 0) -> str | None:
        """UTF-8 under the policy; None means "skip it" (the caller counts and warns)."""
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.policy == "replace":
                return data.decode("utf-8", errors="replace")
            offset = base_offset + exc.start
            if self.policy == "strict":
                raise UserError(
                    f"{where}: invalid UTF-8 at byte offset {offset} ({exc.reason}); "
                    "fix the file or use encoding policy 'replace' or 'skip'"
                ) from None
            return None

    def clean_surrogates(self, text: str, where: str) -> str | None:
        """JSON may spell lone surrogates (\\ud800) that no UTF-8 text can hold."""
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError as exc:
            if self.policy == "replace":
                return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            if self.policy == "strict":
                raise UserError(
                    f"{where}: field {self.text_field!r} holds a lone surrogate at character "
                    f"{exc.start}, which is not valid Unicode text; use encoding policy 'replace' or 'skip'"
                ) from None
            return None

    # -- plain text ----------------------------------------------------------------------

    def read_plain(self, path: Path) -> Iterator[Document]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"{path}: cannot read file ({exc.strerror or exc})") from None
        if b"\0" in data[:BINARY_SNIFF_BYTES]:
            self.stats.skipped_binary += 1
            self.warn(f"{path}: looks binary (NUL byte in the first {BINARY_SNIFF_BYTES} bytes); skipped")
            return
        bom = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
        text = self.decode(data[bom:], str(path), base_offset=bom)
        if text is None:
            self.stats.skipped_undecodable += 1
            offset = bom + first_bad_utf8(data[bom:])
            self.warn(f"{path}: invalid UTF-8 at byte offset {offset}; skipped (encoding policy 'skip')")
            return
        yield from self.emit(text, str(path))

    # -- JSONL -----------------------------------------------------------------------------

    def read_jsonl(self, path: Path) -> Iterator[Document]:
        try:
            with open_jsonl(path) as f:
                yield from self._jsonl_rows(path, f)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise UserError(f"{path}: cannot read file: unreadable, truncated or corrupt ({exc})") from None

    def _jsonl_rows(self, path: Path, f: BinaryIO) -> Iterator[Document]:
        head = f.read(BINARY_SNIFF_BYTES)
        if b"\0" in head:
            self.stats.skipped_binary += 1
            self.warn(f"{path}: looks binary (NUL byte in the first {BINARY_SNIFF_BYTES} bytes); skipped")
            return
        first_bad: dict[str, tuple[int, str]] = {}
        counts = {"undecodable": 0, "malformed": 0}
        offset = 0
        for lineno, raw in enumerate(split_lines(head, f), start=1):
            line_offset, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            text, problem = self._jsonl_text(raw, where, line_offset)
            if problem is not None:
                counts[problem[0]] += 1
                first_bad.setdefault(problem[0], (lineno, problem[1]))
                continue
            yield from self.emit(text, where)
        self.stats.skipped_undecodable += counts["undecodable"]
        self.stats.skipped_malformed += counts["malformed"]
        for kind, (lineno, detail) in first_bad.items():
            self.warn(f"{path}: skipped {counts[kind]} {kind} line(s); first at line {lineno}: {detail}")

    def _jsonl_text(self, raw: bytes, where: str, line_offset: int) -> tuple[str, tuple[str, str] | None]:
        """(text, None) for a good row, ("", (kind, detail)) for a row to skip."""
        line = self.decode(raw, where, base_offset=line_offset)
        if line is None:
            return "", ("undecodable", f"invalid UTF-8 at byte offset {line_offset + first_bad_utf8(raw)}")
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            return "", self._malformed(where, f"not valid JSON ({exc})")
        if not isinstance(row, dict):
            return "", self._malformed(where, f"expected a JSON object, got {type(row).__name__}")
        if self.text_field not in row:
            keys = ", ".join(sorted(row)[:8]) or "none"
            return "", self._malformed(where, f"no field {self.text_field!r} (fields: {keys}); set text_field")
        text = row[self.text_field]
        if not isinstance(text, str):
            return "", self._malformed(where, f"field {self.text_field!r} is {type(text).__name__}, not a string")
        text = self.clean_surrogates(text, where)
        if text is None:
            return "", ("undecodable", "lone surrogate escape in the text")
        return text, None

    def _malformed(self, where: str, detail: str) -> tuple[str, str]:
        if self.policy == "strict":
            raise UserError(f"{where}: malformed JSONL row: {detail}")
        return ("malformed", detail)

    # -- parquet ---------------------------------------------------------------------------

    def read_parquet(self, path: Path) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: not a readable parquet file, truncated or corrupt ({exc})") from None
        if self.text_field not in schema.names:
            raise UserError(
                f"{path}: no column {self.text_field!r} (columns: {', '.join(schema.names[:8])}); set text_field"
            )
        kind = schema.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise UserError(f"{path}: column {self.text_field!r} has type {kind}, not string")
        row = skipped = 0
        first_bad: tuple[int, int] | None = None
        batches = pf.iter_batches(columns=[self.text_field], batch_size=1024)
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    break
                # Bytes, not str: pyarrow does not promise the strings it reads are valid UTF-8.
                values = batch.column(0).cast(pa.large_binary()).to_pylist()
            except (pa.ArrowException, OSError) as exc:
                raise UserError(f"{path}: corrupt parquet data after row {row} ({exc})") from None
            for value in values:
                row += 1
                where = f"{path}:{row}"
                if value is None:
                    self.stats.dropped_empty += 1
                    continue
                text = self.decode(value, where)
                if text is None:
                    skipped += 1
                    first_bad = first_bad or (row, first_bad_utf8(value))
                    continue
                yield from self.emit(text, where)
        self.stats.skipped_undecodable += skipped
        if first_bad:
            self.warn(f"{path}: skipped {skipped} undecodable row(s); first at row {first_bad[0]}: "
                      f"invalid UTF-8 at byte offset {first_bad[1]} of the value")


def _file_format(path: Path) -> str:
    if hf_datasets.is_datasets_dir(path):
        return "datasets"
    if hf_datasets.is_arrow_file(path):
        return "arrow"
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "plain"


def iter_documents(
    paths: Sequence[str | os.PathLike[str]] | str,
    *,
    encoding: EncodingPolicy = "skip",
    text_field: str = "text",
    split: str = "train",
    warn: Callable[[str], None] = _print_warning,
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Documents from files, directories, globs and default-corpus specs, in a fixed order.

    Raises UserError for a missing path, a corrupt container, any problem under
    `encoding="strict"`, and when the whole corpus yields no document (saying why).
    """
    if encoding not in ENCODING_POLICIES:
        raise UserError(f"encoding policy must be one of {', '.join(ENCODING_POLICIES)}, not {encoding!r}")
    stats = stats if stats is not None else CorpusStats()
    reader = _Reader(encoding, text_field, warn, stats)
    for kind, path in reading_plan(as_list(paths)):
        if kind == "prose":
            for name, text in default_corpus.default_prose_topics():
                yield from reader.emit(text, default_corpus.PROSE_SOURCE_PREFIX + name)
            continue
        stats.files += 1
        fmt = _file_format(path)
        if fmt == "jsonl":
            yield from reader.read_jsonl(path)
        elif fmt == "parquet":
            yield from reader.read_parquet(path)
        elif fmt == "datasets":
            yield from hf_datasets.read_datasets_dir(path, reader, split)
        elif fmt == "arrow":
            yield from hf_datasets.read_arrow_file(path, reader)
        else:
            yield from reader.read_plain(path)
    if stats.documents == 0:
        raise UserError(_why_empty(stats))


def _why_empty(stats: CorpusStats) -> str:
    reasons = [
        f"{n} {what}" for n, what in (
            (stats.dropped_empty, "empty or whitespace-only document(s)"),
            (stats.skipped_binary, "binary file(s)"),
            (stats.skipped_undecodable, "undecodable file(s)/row(s) (try encoding policy 'replace')"),
            (stats.skipped_malformed, "malformed JSONL row(s) (check text_field)"),
        ) if n
    ]
    detail = "; ".join(reasons) if reasons else "the files hold no rows"
    return f"the corpus yielded no documents from {stats.files} file(s): {detail}"


def iter_texts(documents: Iterable[Document]) -> Iterator[str]:
    """Just the text of each document (what tokenizer training consumes)."""
    for doc in documents:
        yield doc.text
