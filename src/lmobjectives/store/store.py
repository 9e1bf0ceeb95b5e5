"""The token store: documents tokenized once, kept as numpy-memmap shards.

Layout of a store directory::

    manifest.json                 documents, tokens, bytes per split, dtype, fingerprints
    train/tokens-00000.bin ...    flat token shards (uint16 when the vocab fits, else uint32)
    train/docs.npy                (n_docs, 3) int64: shard, start, length (length counts the EOS)
    val/...

Every document is stored followed by ``<|endoftext|>``, so a packed row is a plain slice
copy. The split is decided per document from a hash of its text (and the seed), so it does
not depend on the order or number of files. The store's fingerprint hashes the manifest's
content; a run records it and refuses a store whose fingerprint or tokenizer changed
(the habit of OLMo-core's token sources).
"""

from __future__ import annotations

import glob
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lmobjectives.errors import UserError
from lmobjectives.util import atomic_write_json, publish_dir, stable_hash

SPLITS = ("train", "val")
SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard: well under any filesystem's limits.
FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def is_val(text: str, val_fraction: float, seed: int) -> bool:
    """Deterministic per-document split: a keyed hash of the text, compared with the fraction."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


class _SplitWriter:
    def __init__(self, root: Path, dtype: np.dtype, eos: int) -> None:
        self.root, self.dtype, self.eos = root, dtype, eos
        root.mkdir(parents=True)
        self.docs: list[tuple[int, int, int]] = []
        self.shard, self.pos, self.fh = -1, SHARD_TOKENS, None
        self.tokens = self.bytes = 0

    def add(self, ids: np.ndarray, n_bytes: int) -> None:
        n = len(ids) + 1
        if self.pos + n > SHARD_TOKENS and self.pos > 0:
            self._next_shard()
        buf = np.empty(n, dtype=self.dtype)
        buf[:-1] = ids
        buf[-1] = self.eos
        self.fh.write(buf.tobytes())
        self.docs.append((self.shard, self.pos, n))
        self.pos += n
        self.tokens += n
        self.bytes += n_bytes

    def _next_shard(self) -> None:
        if self.fh:
            self.fh.close()
        self.shard += 1
        self.pos = 0
        self.fh = open(self.root / f"tokens-{self.shard:05d}.bin", "wb")

    def close(self) -> dict[str, int]:
        if self.fh is None:
            self._next_shard()
        self.fh.close()
        np.save(self.root / "docs.npy", np.asarray(self.docs, dtype=np.int64).reshape(-1, 3))
        return {"documents": len(self.docs), "tokens": self.tokens, "bytes": self.bytes}


def write_store(
    out: str | Path,
    documents: Iterable[tuple[str, np.ndarray]],
    *,
    vocab_size: int,
    eos: int,
    tokenizer_fingerprint: str,
    sources: dict[str, str],
    val_fraction: float = 0.0,
    seed: int = 0,
    extra: Callable[[], dict] | None = None,
    populate: Callable[[Path], None] | None = None,
) -> dict:
    """Write (text, token ids) pairs as a store; visible under ``out`` only once complete."""
    out = Path(out)
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a token store; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):  # of a writer killed before
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        dtype = token_dtype(vocab_size)
        writers = {s: _SplitWriter(tmp / s, dtype, eos) for s in SPLITS}
        for text, ids in documents:
            split = "val" if is_val(text, val_fraction, seed) else "train"
            writers[split].add(ids, len(text.encode("utf-8", "surrogatepass")))
        counts = {s: w.close() for s, w in writers.items()}
        if counts["train"]["documents"] == 0:
            raise UserError("the corpus yields no training documents "
                            "(empty, or every document went to the validation split)")
        content = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab_size,
            "eos": eos,
            "documents": sum(c["documents"] for c in counts.values()),
            "tokens": sum(c["tokens"] for c in counts.values()),
            "splits": counts,
            "val_fraction": val_fraction,
            "seed": seed,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "sources": sources,
            **(extra() if extra else {}),
        }
        manifest = {**content, "fingerprint": stable_hash(content)}
        if populate is not None:  # e.g. a copy of the tokenizer, inside the same atomic publish
            populate(tmp)
        atomic_write_json(tmp / "manifest.json", manifest)
        publish_dir(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class DocTable:
    """One split of a store: shards and, per document, (shard, start, length incl. EOS)."""

    shards: tuple[np.ndarray, ...]
    docs: np.ndarray  # (n_docs, 3) int64

    @property
    def lengths(self) -> np.ndarray:
        return self.docs[:, 2]

    def document(self, i: int) -> np.ndarray:
        shard, start, n = self.docs[i]
        return np.asarray(self.shards[shard][start:start + n])

    @classmethod
    def from_documents(cls, docs: list[np.ndarray], eos: int, dtype=np.uint16) -> "DocTable":
        """An in-memory table (tests, small corpora): each document gets its EOS appended."""
        parts = [np.append(np.asarray(d, dtype=dtype), np.asarray([eos], dtype=dtype)) for d in docs]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        lengths = np.array([len(p) for p in parts], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        table = np.stack([np.zeros_like(lengths), starts, lengths], axis=1) if parts else np.zeros((0, 3), np.int64)
        return cls(shards=(flat,), docs=table)


class TokenStore:
    """A prepared store opened read-only (memmap)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise UserError(f"{self.path} is not a token store (no manifest.json); "
                            "make one with `lmobj prepare`")
        try:
            self.manifest = json.loads(manifest.read_bytes())
        except (ValueError, RecursionError) as exc:  # bad JSON or bad UTF-8
            raise UserError(f"{manifest} is corrupt: {exc}") from None
        _check_manifest(self.manifest, manifest)
        self.fingerprint: str = self.manifest["fingerprint"]
        self._tables: dict[str, DocTable] = {}

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    def check_tokenizer(self, fingerprint: str, tokenizer_name: str = "the tokenizer") -> None:
        if fingerprint != self.tokenizer_fingerprint:
            raise UserError(
                f"store {self.path} was made with a different tokenizer than {tokenizer_name} "
                f"(fingerprint {self.tokenizer_fingerprint[:12]} vs {fingerprint[:12]}); "
                "re-run `lmobj prepare` with this tokenizer, or pass the store's tokenizer")

    def split(self, name: str) -> DocTable:
        if name not in self._tables:
            table = _open_table(self.path / name, np.dtype(self.manifest["dtype"]))
            want = self.manifest["splits"].get(name, {})
            got = {"documents": len(table.docs), "tokens": int(table.lengths.sum())}
            if any(want.get(k) != v for k, v in got.items()):
                raise UserError(f"store {self.path}: the {name} split holds {got['documents']} documents "
                                f"/ {got['tokens']} tokens, its manifest says {want.get('documents')} / "
                                f"{want.get('tokens')}; the store is damaged: re-run `lmobj prepare`")
            self._tables[name] = table
        return self._tables[name]

    def bytes(self, split: str) -> int:
        return int(self.manifest["splits"][split]["bytes"])


def _check_manifest(m: object, where: Path) -> None:
    """The keys and types the readers rely on; anything else is a damaged manifest."""
    ok = (isinstance(m, dict) and isinstance(m.get("fingerprint"), str)
          and isinstance(m.get("tokenizer_fingerprint"), str)
          and m.get("dtype") in ("uint16", "uint32") and isinstance(m.get("vocab_size"), int)
          and isinstance(m.get("splits"), dict)
          and all(isinstance(m["splits"].get(s), dict)
                  and all(isinstance(m["splits"][s].get(k), int) for k in ("documents", "tokens", "bytes"))
                  for s in SPLITS))
    if not ok:
        raise UserError(f"{where} is corrupt or not a token store manifest; re-run `lmobj prepare`")


def _open_table(root: Path, dtype: np.dtype) -> DocTable:
    """One split's shards (memmapped) and document table, checked to be consistent: every
    document lies inside its shard, so a damaged store fails here, not in the loader."""
    try:
        docs = np.load(root / "docs.npy")  # allow_pickle stays False
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"{root / 'docs.npy'} is damaged or missing ({exc}); re-run `lmobj prepare`") from None
    if docs.dtype != np.int64 or docs.ndim != 2 or docs.shape[1] != 3:
        raise UserError(f"{root / 'docs.npy'} is not an (n, 3) int64 document table; re-run `lmobj prepare`")
    n_shards = int(docs[:, 0].max()) + 1 if len(docs) else 0
    shards = []
    for i in range(n_shards):
        f = root / f"tokens-{i:05d}.bin"
        try:  # an empty file cannot be memmapped; an empty shard is a plain empty array
            shards.append(np.memmap(f, dtype=dtype, mode="r") if f.stat().st_size else np.zeros(0, dtype))
        except (OSError, ValueError) as exc:
            raise UserError(f"{f} is missing or unreadable ({exc}); re-run `lmobj prepare`") from None
    sizes = np.array([len(sh) for sh in shards] or [0], dtype=np.int64)
    shard, start, length = docs[:, 0], docs[:, 1], docs[:, 2]
    bad = (shard < 0) | (start < 0) | (length < 1)
    bad |= start > sizes[np.clip(shard, 0, len(sizes) - 1)] - length  # (no int64 overflow)
    if bad.any():
        i = int(np.argmax(bad))
        raise UserError(f"{root / 'docs.npy'}: document {i} {tuple(int(v) for v in docs[i])} lies outside "
                        "its token shard; the store is damaged: re-run `lmobj prepare`")
    return DocTable(shards=tuple(shards), docs=docs)


def encode_documents(
    texts: Iterator[str], encode_batch: Callable[[list[str]], list[list[int]]], chunk: int = 256,
) -> Iterator[tuple[str, np.ndarray]]:
    """Encode texts in chunks; ``encode_batch`` (HF tokenizers) runs on all cores."""
    buf: list[str] = []
    for text in texts:
        buf.append(text)
        if len(buf) >= chunk:
            yield from zip(buf, (np.asarray(ids, dtype=np.int64) for ids in encode_batch(buf)))
            buf = []
    if buf:
        yield from zip(buf, (np.asarray(ids, dtype=np.int64) for ids in encode_batch(buf)))
