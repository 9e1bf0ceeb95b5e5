"""HF ``datasets`` on disk as corpora: ``save_to_disk`` directories and ``.arrow`` files.

* A directory written by ``Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``) is one
  dataset; one written by ``DatasetDict.save_to_disk`` (``dataset_dict.json`` + one folder per
  split) gives the split named by ``split`` (``data.split``, default ``train``). Loaded with
  ``datasets.load_from_disk``: the optional extra ``lmobjectives[datasets]``.
* A ``.arrow`` file (what ``datasets`` writes: the Arrow IPC stream format; the IPC file
  format is read too) needs only ``pyarrow``.

One row = one document, the text in column ``text_field``; source ``PATH[SPLIT]:ROW``
(1-based). Rows are read ``BATCH_ROWS`` at a time from the Arrow memory map, so only one
batch of Python strings exists at once, never the whole column, and the mapped pages of
batches already read are handed back: reading a 2 GB dataset keeps the process near its
baseline size (``benchmarks/hf_datasets_memory.py``).

Fingerprint: a directory's is the dataset's own (``_fingerprint`` in the split's
``state.json``, which ``datasets`` derives from the data and every transform that made it),
so a multi-GB dataset is not hashed again; without one, and for ``.arrow`` files, the
SHA-256 of the Arrow files' bytes, as for any other corpus file.

Worked example: ``DatasetDict({"train": Dataset.from_dict({"text": ["a", ""]})})`` saved to
``d/`` yields ``Document("a", "d[train]:1")``; the empty row is dropped and counted, as in
every other format. ``--split test`` on it ends with
``error: d has no split 'test' (splits: train (2 rows)); set data.split``.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from lmobjectives.errors import UserError

BATCH_ROWS = 1024
DATASET_STATE = "state.json"
DATASET_DICT = "dataset_dict.json"
INSTALL_HINT = "pip install 'lmobjectives[datasets]'"


class RowReader(Protocol):
    """What these readers need of ``corpus.readers``' reader: its policy and counters."""

    text_field: str
    stats: Any  # CorpusStats
    warn: Callable[[str], None]

    def decode(self, data: bytes, where: str, base_offset: int = 0) -> str | None: ...
    def emit(self, text: str, source: str) -> Iterator[Any]: ...


def is_datasets_dir(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / DATASET_DICT).is_file() or (path / DATASET_STATE).is_file())


def is_arrow_file(path: Path) -> bool:
    return path.name.lower().endswith(".arrow")


def _split_dir(path: Path, split: str) -> Path:
    """The folder holding the rows to read: ``path`` itself for a plain Dataset."""
    if not (path / DATASET_DICT).is_file():
        return path
    splits = _dict_splits(path)
    if split not in splits:
        raise UserError(f"{path} has no split {split!r} (splits: {_describe_splits(path, splits)}); "
                        "set data.split (--split)")
    return path / split


def _dict_splits(path: Path) -> list[str]:
    try:
        return list(json.loads((path / DATASET_DICT).read_text())["splits"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path / DATASET_DICT} is not a readable dataset_dict.json ({exc})") from None


def _rows_in(split_dir: Path) -> int | None:
    """Rows of a saved split, from its Arrow files' batch headers (memory-mapped, the text is
    not read); None when the folder is not readable as one."""
    import pyarrow as pa

    try:
        state = json.loads((split_dir / DATASET_STATE).read_text())
        files = [split_dir / f["filename"] for f in state.get("_data_files", [])]
        total = 0
        for f in files:
            with pa.memory_map(str(f)) as source:
                total += sum(b.num_rows for b in pa.ipc.open_stream(source))
        return total
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException):
        return None


def _describe_splits(path: Path, splits: list[str]) -> str:
    out = []
    for name in splits:
        n = _rows_in(path / name)
        out.append(name if n is None else f"{name} ({n} rows)")
    return ", ".join(out) or "none"


def _load(path: Path, split: str) -> Any:
    """The ``datasets.Dataset`` of one split, memory-mapped (nothing is read yet)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} is an HF datasets directory; reading it needs the datasets "
                        f"package: {INSTALL_HINT}") from None
    split_dir = _split_dir(path, split)
    if _rows_in(split_dir) == 0:  # datasets itself cannot load a split with no Arrow data
        _empty(path, split)
    try:
        ds = datasets.load_from_disk(str(split_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{split_dir}: not a readable datasets directory ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):  # a nested dict: should not happen, but name it
        raise UserError(f"{split_dir} holds several splits ({', '.join(ds)}); set data.split")
    return ds


def _check_column(schema: Any, where: str, field: str) -> None:
    names = list(schema.names)
    texts = [n for n in names if _is_text(schema.field(n).type)]
    if field not in names:
        raise UserError(f"{where}: no column {field!r} (columns: {', '.join(names) or 'none'}; "
                        f"text columns: {', '.join(texts) or 'none'}); set data.text_field (--text-field)")
    kind = schema.field(field).type
    if not _is_text(kind):
        raise UserError(f"{where}: column {field!r} has type {kind}, not string (text columns: "
                        f"{', '.join(texts) or 'none'}); set data.text_field (--text-field)")


def _is_text(kind: Any) -> bool:
    import pyarrow as pa

    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or getattr(pa.types, "is_string_view", lambda k: False)(kind))


def _emit_column(column: Any, reader: RowReader, where: str, first_row: int,
                 bad: list[int]) -> Iterator[Any]:
    """Documents of one batch (an Arrow array); ``bad`` collects undecodable row numbers."""
    import pyarrow as pa

    # Bytes, not str: an Arrow string column is not promised to hold valid UTF-8.
    for i, value in enumerate(column.cast(pa.large_binary()).to_pylist()):
        row = first_row + i
        if value is None:
            reader.stats.dropped_empty += 1
            continue
        text = reader.decode(value, f"{where}:{row}")
        if text is None:
            bad.append(row)
            continue
        yield from reader.emit(text, f"{where}:{row}")


def _finish(reader: RowReader, where: str, rows: int, bad: list[int]) -> None:
    if rows == 0:
        raise UserError(f"{where} is empty (0 rows)")
    if bad:
        reader.stats.skipped_undecodable += len(bad)
        reader.warn(f"{where}: skipped {len(bad)} undecodable row(s); first at row {bad[0]}")


def _empty(path: Path, split: str) -> None:
    if not (path / DATASET_DICT).is_file():
        raise UserError(f"{path} is empty (0 rows)")
    raise UserError(f"split {split!r} of {path} is empty (0 rows); splits: "
                    f"{_describe_splits(path, _dict_splits(path))}; set data.split (--split)")


def read_datasets_dir(path: Path, reader: RowReader, split: str) -> Iterator[Any]:
    """Documents of a ``save_to_disk`` directory: its split's Arrow files in order (what
    ``load_from_disk`` maps; ``save_to_disk`` never leaves an indices mapping behind)."""
    ds = _load(path, split)
    where = f"{path}[{split}]" if (path / DATASET_DICT).is_file() else str(path)
    _check_column(ds.data.schema, where, reader.text_field)
    if len(ds) == 0:
        _empty(path, split)
    split_dir = _split_dir(path, split)
    files = [split_dir / f["filename"] for f in json.loads((split_dir / DATASET_STATE).read_text())["_data_files"]]
    del ds  # the documents come from our own map of the same files (see _arrow_pieces)
    yield from _read_pieces(files, reader, where)


def read_arrow_file(path: Path, reader: RowReader) -> Iterator[Any]:
    """Documents of one ``.arrow`` file."""
    yield from _read_pieces([path], reader, str(path))


def _read_pieces(files: list[Path], reader: RowReader, where: str) -> Iterator[Any]:
    import pyarrow as pa

    rows, bad = 0, []
    for path in files:
        try:
            for piece in _arrow_pieces(path, reader.text_field, where):
                yield from _emit_column(piece, reader, where, rows + 1, bad)
                rows += len(piece)
        except pa.ArrowException as exc:
            raise UserError(f"{path}: corrupt Arrow data after row {rows} ({exc})") from None
    _finish(reader, where, rows, bad)


def _arrow_pieces(path: Path, field: str, where: str) -> Iterator[Any]:
    """Column ``field`` of an Arrow file in zero-copy pieces of at most ``BATCH_ROWS`` rows.

    The file is memory-mapped here rather than by pyarrow so that the pages of a record batch
    already turned into documents can be dropped from the process (``MADV_DONTNEED``): they
    are only page cache, but they would otherwise count in its resident size until the kernel
    needs them, i.e. a 2 GB dataset would "use" 2 GB."""
    import pyarrow as pa

    mapped = _map(path)
    source = pa.BufferReader(pa.py_buffer(mapped))
    try:
        batches, seekable = pa.ipc.open_stream(source), True
    except pa.ArrowException:
        source.seek(0)
        try:
            batches, seekable = _FileBatches(pa.ipc.open_file(source)), False
        except pa.ArrowException as exc:
            raise UserError(f"{path}: not an Arrow IPC stream or file, or truncated ({exc})") from None
    _check_column(batches.schema, where, field)
    index = batches.schema.get_field_index(field)
    for batch in batches:
        column = batch.column(index)
        for start in range(0, len(column), BATCH_ROWS):
            yield column.slice(start, BATCH_ROWS)
        if seekable:  # a stream reader has read exactly up to the end of this batch
            _drop_pages(mapped, source.tell())


def _map(path: Path) -> mmap.mmap:
    try:
        with open(path, "rb") as fh:
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:  # an empty file cannot be mapped
        raise UserError(f"{path}: empty file, not an Arrow IPC stream or file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read file ({exc.strerror or exc})") from None


def _drop_pages(mapped: mmap.mmap, upto: int) -> None:
    length = upto - upto % mmap.PAGESIZE
    if length > 0 and hasattr(mmap, "MADV_DONTNEED"):  # Linux; elsewhere the kernel decides
        mapped.madvise(mmap.MADV_DONTNEED, 0, length)


class _FileBatches:
    """The IPC file format read batch by batch, like a stream reader."""

    def __init__(self, file_reader: Any) -> None:
        self.schema = file_reader.schema
        self._reader = file_reader

    def __iter__(self) -> Iterator[Any]:
        for i in range(self._reader.num_record_batches):
            yield self._reader.get_batch(i)


def datasets_fingerprint(path: Path, split: str) -> tuple[str, str]:
    """(key, fingerprint) of a datasets directory's split for a store's ``sources``."""
    split_dir = _split_dir(path, split)
    key = f"{path}[{split}]" if split_dir != path else str(path)
    try:
        state = json.loads((split_dir / DATASET_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{split_dir}: no readable {DATASET_STATE} ({exc})") from None
    own = state.get("_fingerprint") if isinstance(state, dict) else None
    if isinstance(own, str) and own:
        return key, f"datasets:{own}"
    h = hashlib.sha256()
    for entry in state.get("_data_files", []) if isinstance(state, dict) else []:
        with open(split_dir / entry["filename"], "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return key, h.hexdigest()
