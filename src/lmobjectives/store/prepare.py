"""``lmobj prepare``: corpus files -> token store, tokenized on all cores.

HF ``tokenizers`` encodes each chunk of documents in parallel (its Rust thread pool), while
this thread reads the next files; special-token strings inside the data are encoded as plain
text (``encode_special_tokens``), so no document can forge an EOS or a sentinel. The store
carries a copy of its tokenizer, so a run needs nothing but the store.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from lmobjectives.corpus import CorpusStats, file_fingerprints, iter_documents
from lmobjectives.corpus.default import is_default_spec
from lmobjectives.corpus.paths import resolve_files
from lmobjectives.errors import UserError
from lmobjectives.store.store import TokenStore, encode_documents, write_store
from lmobjectives.tokenizer import encode_data, save_hf_tokenizer, tokenizer_fingerprint
from lmobjectives.tokenizer.special import EOS


def prepare_store(
    corpus: Sequence[str],
    tokenizer,  # tokenizers.Tokenizer
    out: str | Path,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    encoding: str = "skip",
    text_field: str = "text",
    split: str = "train",
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> TokenStore:
    if not corpus:
        raise UserError("no corpus given: pass --corpus PATH (or 'default')")
    out = Path(out)
    before = _file_stats(corpus)  # before hashing: the hash must describe what was read
    stats = CorpusStats()
    kwargs = {"warn": warn} if warn else {}
    texts = (d.text for d in iter_documents(list(corpus), encoding=encoding, text_field=text_field,
                                            split=split, stats=stats, **kwargs))
    pairs = encode_documents(texts, lambda batch: encode_data(tokenizer, batch))
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        pairs = tqdm(pairs, desc="prepare", unit=" docs", mininterval=0.5)
    write_store(
        out, pairs, vocab_size=tokenizer.get_vocab_size(), eos=tokenizer.token_to_id(EOS),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        sources=file_fingerprints(list(corpus), split=split), val_fraction=val_fraction, seed=seed,
        # read once the documents are consumed, so the counts are final
        extra=lambda: _check_unchanged(before, corpus) or {"corpus": [str(c) for c in corpus],
                                                             "reader": stats.as_dict()},
        populate=lambda tmp: save_hf_tokenizer(tokenizer, tmp / "tokenizer"),
    )
    return TokenStore(out)


def _file_stats(corpus: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every corpus file (the embedded corpus is part of the package)."""
    plain = [c for c in corpus if not is_default_spec(str(c))]
    out = {}
    for p in resolve_files(plain) if plain else []:
        st = p.stat()
        out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def _check_unchanged(before: dict[str, tuple[int, int]], corpus: Sequence[str]) -> None:
    """Raise if a corpus file changed (size or mtime) while the store was being written: its
    documents and its recorded fingerprint would not describe one version of it."""
    after = _file_stats(corpus)
    for path, (size, mtime) in before.items():
        now = after.get(path)
        if now != (size, mtime):
            what = "disappeared" if now is None else (f"changed from {size} to {now[0]} bytes" if now[0] != size
                                                      else "was modified (its mtime changed)")
            raise UserError(f"{path} {what} while it was read; the store was not written. "
                            "Prepare it again once the corpus is no longer being written")
