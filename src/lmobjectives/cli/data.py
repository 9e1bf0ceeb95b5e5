"""``lmobj prepare``, ``lmobj tokenizer ...`` and ``lmobj corpus ...``: corpora, stores and tokenizers."""

from __future__ import annotations

from typing import List, Optional

import typer

from lmobjectives.cli.common import _print_json, _say, app, corpus_app, tokenizer_app
from lmobjectives.errors import UserError


# ------------------------------------------------------------------------------------ data
@app.command()
def prepare(
    corpus: List[str] = typer.Option(..., help="Corpus path (repeatable); 'default' = the embedded corpus."),
    tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer directory (default: the shipped one)."),
    out: str = typer.Option(..., help="Store directory to write."),
    val_fraction: float = typer.Option(0.01, help="Share of documents held out (by document hash)."),
    seed: int = typer.Option(0, help="Seed of the split."),
    encoding: str = typer.Option("skip", help="strict | replace | skip undecodable files."),
    text_field: str = typer.Option("text", help="JSONL field / parquet, Arrow or HF datasets column with the text."),
    split: str = typer.Option("train", help="Split of an HF DatasetDict directory."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Tokenize a corpus into a token store (memmap shards + manifest)."""
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    if encoding not in ("strict", "replace", "skip"):
        raise UserError(f"--encoding must be strict, replace or skip, not '{encoding}'")
    store = prepare_store(corpus, load_tokenizer(tokenizer), out, val_fraction=val_fraction, seed=seed,
                          encoding=encoding, text_field=text_field, split=split,
                          progress=not json_out)
    m = store.manifest
    if json_out:
        _print_json(m)
    else:
        _say(f"store {out}: {m['documents']} documents, {m['tokens']} tokens "
             f"(train {m['splits']['train']['tokens']}, val {m['splits']['val']['tokens']}); "
             f"fingerprint {m['fingerprint'][:16]}")


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: List[str] = typer.Option(..., help="Corpus path (repeatable)."),
    vocab_size: int = typer.Option(8192, help="Vocabulary size, special tokens included."),
    out: str = typer.Option(..., help="Directory for the HF tokenizer."),
    encoding: str = typer.Option("skip", help="strict | replace | skip undecodable files."),
    text_field: str = typer.Option("text", help="JSONL field / parquet, Arrow or HF datasets column with the text."),
    split: str = typer.Option("train", help="Split of an HF DatasetDict directory."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Train a byte-level BPE tokenizer with the reserved special tokens."""
    from lmobjectives.corpus import iter_documents
    from lmobjectives.tokenizer import save_hf_tokenizer, tokenizer_fingerprint, train_tokenizer

    tok = train_tokenizer((d.text for d in iter_documents(corpus, encoding=encoding, text_field=text_field,
                                                                 split=split)), vocab_size, None)
    save_hf_tokenizer(tok, out)
    info = {"out": out, "vocab_size": tok.get_vocab_size(), "fingerprint": tokenizer_fingerprint(tok)}
    _print_json(info) if json_out else _say(f"tokenizer {out}: {info['vocab_size']} tokens")


@tokenizer_app.command("extend")
def tokenizer_extend(
    corpus: List[str] = typer.Option(..., help="Domain corpus path (repeatable)."),
    add: int = typer.Option(..., help="How many tokens to add."),
    out: str = typer.Option(..., help="Directory for the extended HF tokenizer."),
    tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer directory to extend (default: the shipped one)."),
    min_frequency: int = typer.Option(2, help="Add no token that saves fewer tokens than this."),
    encoding: str = typer.Option("skip", help="strict | replace | skip undecodable files."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Add the N strings that shorten a domain corpus most (continued BPE); old ids unchanged."""
    from lmobjectives.tokenizer.extend import extend_tokenizer_dir

    ext = extend_tokenizer_dir(tokenizer, corpus, add, out, min_frequency=min_frequency, encoding=encoding)
    st = ext.stats
    if json_out:
        _print_json({"out": out, "added": len(ext.added), "vocab_size": ext.vocab_size, **st})
        return
    _say(f"tokenizer {out}: {len(ext.added)} tokens added ({ext.base_vocab_size} -> {ext.vocab_size}); "
         f"e.g. {', '.join(repr(a.text) for a in ext.added[:8])}")
    _say(f"corpus: {st['tokens_before']} -> {st['tokens_after']} tokens "
         f"({100 * st['token_reduction']:.2f}% fewer); bytes per token "
         f"{st['bytes_per_token_before']:.3f} -> {st['bytes_per_token_after']:.3f}")


@corpus_app.command("default")
def corpus_default(json_out: bool = typer.Option(False, "--json")) -> None:
    """Show what the embedded default corpus is, and its fingerprint."""
    from lmobjectives.corpus import default_corpus_info

    info = default_corpus_info()
    if json_out:
        _print_json(info)
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
