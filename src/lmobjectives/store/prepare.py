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
        extra=lambda: {"corpus": [str(c) for c in corpus], "reader": stats.as_dict()},
        populate=lambda tmp: save_hf_tokenizer(tokenizer, tmp / "tokenizer"),
    )
    return TokenStore(out)
