"""Rebuild the shipped default tokenizer: byte-level BPE, vocab 8192, on the default corpus.

    PYTHONPATH=src python scripts/build_default_tokenizer.py            # rewrite the asset
    PYTHONPATH=src python scripts/build_default_tokenizer.py --check    # compare, write nothing

The default corpus is the running interpreter's standard library, so the result depends on
the Python version; build_info.json records the version and corpus fingerprint it came from.
Training is deterministic: the same interpreter and `tokenizers` version give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import tokenizers

from lmobjectives.corpus import CorpusStats, default_corpus_info, iter_documents, iter_texts
from lmobjectives.tokenizer import default_tokenizer_dir, tokenizer_fingerprint, train_tokenizer

VOCAB_SIZE = 8192


def build(out_dir: Path) -> dict:
    stats = CorpusStats()
    start = time.perf_counter()
    tok = train_tokenizer(iter_texts(iter_documents(["default"], stats=stats)), VOCAB_SIZE, out_dir)
    seconds = time.perf_counter() - start
    info = default_corpus_info()
    build_info = {
        "vocab_size": tok.get_vocab_size(),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "tokenizers_version": tokenizers.__version__,
        "python_version": info["python_version"],
        "corpus_fingerprint": info["fingerprint"],
        "corpus_documents": stats.documents,
        "corpus_bytes": stats.text_bytes,
        "selection_rule": info["selection_rule"],
        "train_seconds": round(seconds, 1),
    }
    (out_dir / "build_info.json").write_text(json.dumps(build_info, indent=2) + "\n", encoding="utf-8")
    return build_info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_tokenizer_dir(), help="output directory")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in a temporary directory and compare with the shipped tokenizer")
    args = parser.parse_args()
    if not args.check:
        print(json.dumps(build(args.out), indent=2))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp))
    shipped = json.loads((default_tokenizer_dir() / "build_info.json").read_text(encoding="utf-8"))
    same = fresh["tokenizer_fingerprint"] == shipped["tokenizer_fingerprint"]
    print(json.dumps({"same": same, "shipped": shipped, "rebuilt": fresh}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
