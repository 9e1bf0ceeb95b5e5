"""Reading a corpus in tests: documents, statistics and warnings in one call."""

from __future__ import annotations

import json

from lmobjectives.corpus import CorpusStats, iter_documents


def read(paths, **kw):  # noqa: ANN001, ANN003, ANN201
    warnings: list[str] = []
    stats = CorpusStats()
    docs = list(iter_documents(paths, warn=warnings.append, stats=stats, **kw))
    return docs, stats, warnings


def jsonl_bytes(rows) -> bytes:  # noqa: ANN001
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)
