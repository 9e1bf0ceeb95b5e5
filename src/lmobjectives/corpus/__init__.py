"""Corpus stage: paths (files, directories, globs, the embedded default corpus) -> documents."""

from __future__ import annotations

from lmobjectives.corpus.default import (
    DEFAULT_CORPUS,
    default_corpus_info,
    default_corpus_paths,
    is_default_spec,
)
from lmobjectives.corpus.paths import file_fingerprints, resolve_files
from lmobjectives.corpus.readers import (
    ENCODING_POLICIES,
    CorpusStats,
    Document,
    EncodingPolicy,
    iter_documents,
    iter_texts,
)

__all__ = [
    "DEFAULT_CORPUS", "ENCODING_POLICIES", "CorpusStats", "Document", "EncodingPolicy",
    "default_corpus_info", "default_corpus_paths", "file_fingerprints", "is_default_spec",
    "iter_documents", "iter_texts", "resolve_files",
]
