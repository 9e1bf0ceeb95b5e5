"""A run without its model: config, tokenizer, special ids, data sources, objective and
converter — everything evaluation, export and comparison need from a run directory, opened
without building (and initialising, and throwing away) a model.

Training builds its ``Run`` on top of the same spec (``train/setup.py``).

Tokenizer of a new run, in order: ``data.tokenizer``; the tokenizer inside ``data.store``;
the one next to ``model.init_from``; the one inside the first store of ``data.mix``; the
shipped default for the default corpus; else one trained on the corpus inside the run
(``RUN/tokenizer``). A written run is reopened from its own files: the tokenizer of its
``final/`` model (or ``RUN/tokenizer``) and the stores ``run.json`` names, so it opens after
its ``--init-from`` source has moved.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmobjectives.config import RunConfig
from lmobjectives.corpus import DEFAULT_CORPUS, iter_documents
from lmobjectives.data.converters import convert_for_loss
from lmobjectives.data.loader import PackedSource
from lmobjectives.errors import UserError
from lmobjectives.objectives import Objective, build_objective
from lmobjectives.rundir import init_dir, load_run_config, read_run_info, recorded_path
from lmobjectives.store.prepare import prepare_store
from lmobjectives.store.store import TokenStore
from lmobjectives.tokenizer import (load_tokenizer, save_hf_tokenizer, tokenizer_fingerprint,
                                    train_tokenizer)
from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds
from lmobjectives.util import publish_dir

DEFAULT_VOCAB = 8192


@dataclass
class Source:
    name: str
    store: TokenStore
    weight: float


@dataclass
class RunSpec:
    cfg: RunConfig
    dir: Path
    tokenizer: Any  # tokenizers.Tokenizer
    specials: SpecialIds
    sources: list[Source]
    objective: Objective
    architecture: str

    @property
    def converter(self):  # noqa: ANN201 - a function from features to a batch
        """The architecture's converter, plus the loss's gather index (``scored_index``)."""
        return functools.partial(convert_for_loss, self.architecture)

    @property
    def row_length(self) -> int:
        return self.objective.row_length(self.cfg.data.seq_len)

    def val_source(self, index: int = 0) -> PackedSource | None:
        table = self.sources[index].store.split("val")
        if len(table.docs) == 0:
            return None
        return PackedSource(table, self.row_length, seed=0, pad=self.specials.pad, shuffle=False)


def specials_of(tokenizer: Any) -> SpecialIds:
    return SpecialIds.from_vocab(tokenizer.get_vocab(with_added_tokens=True), tokenizer.get_vocab_size())


def new_spec(cfg: RunConfig, run_dir: Path, *, progress: bool = True) -> tuple[RunSpec, str]:
    """The spec of ``cfg`` in ``run_dir``: tokenizer resolved (trained if needed), stores
    prepared. Returns (spec, where the tokenizer came from)."""
    tokenizer, tok_from = resolve_tokenizer(cfg, run_dir)
    specials = specials_of(tokenizer)
    sources = resolve_sources(cfg, run_dir, tokenizer, progress, tokenizer_from=tok_from)
    objective = build_objective(cfg.objective, dict(cfg.objective_params), specials, tokenizer=tokenizer)
    return RunSpec(cfg=cfg, dir=run_dir, tokenizer=tokenizer, specials=specials, sources=sources,
                   objective=objective, architecture=cfg.resolved_architecture), tok_from


def open_spec(run_dir: str | Path) -> RunSpec:
    """The spec of a written run, from its own files (``config.yaml``, ``run.json``, its
    tokenizer and stores); never reads ``--init-from`` or a corpus again."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    info = read_run_info(run_dir)
    tok_dir = _written_tokenizer(cfg, run_dir)
    tokenizer = load_tokenizer(None if tok_dir is None else str(tok_dir))
    specials = specials_of(tokenizer)
    sources = [Source(name, TokenStore(recorded_path(run_dir, cfg.out, s["path"])), s["weight"])
               for name, s in info.get("sources", {}).items()]
    if not sources:
        raise UserError(f"run {run_dir}: run.json names no data source")
    objective = build_objective(cfg.objective, dict(cfg.objective_params), specials, tokenizer=tokenizer)
    return RunSpec(cfg=cfg, dir=run_dir, tokenizer=tokenizer, specials=specials, sources=sources,
                   objective=objective, architecture=info.get("architecture") or cfg.resolved_architecture)


def _written_tokenizer(cfg: RunConfig, run_dir: Path) -> Path | None:
    """Where a written run's tokenizer is (None: the shipped default)."""
    for d in (run_dir / "final", run_dir / "tokenizer"):
        if (d / "tokenizer.json").is_file():
            return d
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.data.store:
        return Path(cfg.data.store) / "tokenizer"
    stores = [m.path for m in cfg.data.mix if (Path(m.path) / "manifest.json").is_file()]
    if stores:
        return Path(stores[0]) / "tokenizer"
    if cfg.model.init_from:
        return init_dir(cfg.model.init_from)
    return None


def resolve_tokenizer(cfg: RunConfig, run_dir: Path) -> tuple[Any, str]:
    d = cfg.data
    if d.tokenizer:
        return load_tokenizer(d.tokenizer), d.tokenizer
    if d.store:
        return load_tokenizer(str(Path(d.store) / "tokenizer")), f"{d.store}/tokenizer"
    if cfg.model.init_from:
        src = init_dir(cfg.model.init_from)
        if (src / "tokenizer.json").is_file():
            return with_reserved_tokens(load_tokenizer(str(src)), str(src), run_dir)
    mixed_stores = [m.path for m in d.mix if (Path(m.path) / "manifest.json").is_file()]
    if mixed_stores:  # the first store's tokenizer; the others are checked against it
        return load_tokenizer(str(Path(mixed_stores[0]) / "tokenizer")), f"{mixed_stores[0]}/tokenizer"
    corpus = [m.path for m in cfg.data.mix] or d.corpus
    if all(c.split(":")[0] == DEFAULT_CORPUS for c in corpus):
        return load_tokenizer(None), "default"
    own = run_dir / "tokenizer"
    if (own / "tokenizer.json").is_file():
        return load_tokenizer(str(own)), str(own)
    texts = (doc.text for doc in iter_documents(corpus, encoding=d.encoding, text_field=d.text_field,
                                                    split=d.split))
    tok = train_tokenizer(texts, DEFAULT_VOCAB, None)
    publish_tokenizer(tok, own)
    return tok, str(own)


def publish_tokenizer(tok: Any, out: Path) -> None:
    """Save ``tok`` into a hidden temporary directory next to ``out`` and rename it: a run
    killed half-way leaves a leftover (removed at the next start), never a ``tokenizer/``
    that a resume would take for complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_hf_tokenizer(tok, tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def with_reserved_tokens(tok: Any, tok_from: str, run_dir: Path) -> tuple[Any, str]:
    """A foreign model's tokenizer (GPT-2, Llama, Qwen, ...) lacks some of our reserved tokens:
    append the missing ones as special tokens (old ids unchanged) and keep the result in the
    run; ``load_init_model`` then grows the embeddings (HF's mean-resizing) to match."""
    vocab = tok.get_vocab(with_added_tokens=True)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if not missing:
        return tok, tok_from
    own = run_dir / "tokenizer"
    if (own / "tokenizer.json").is_file():
        return load_tokenizer(str(own)), str(own)
    tok.add_special_tokens(missing)
    publish_tokenizer(tok, own)
    return tok, f"{tok_from} + {len(missing)} reserved tokens ({own})"


def _source_name(path: str, used: set[str]) -> str:
    base = Path(path.rstrip("/")).name or path
    base = base.replace(":", "-")
    name, i = base, 1
    while name in used:
        i += 1
        name = f"{base}-{i}"
    used.add(name)
    return name


def resolve_sources(cfg: RunConfig, run_dir: Path, tokenizer: Any, progress: bool,
                    tokenizer_from: str = "default") -> list[Source]:
    d = cfg.data
    fp = tokenizer_fingerprint(tokenizer)
    entries = [(m.path, m.weight) for m in d.mix] or [(d.store or None, 1.0)]
    sources, used = [], set()
    for path, weight in entries:
        if path is None:  # the corpus list, prepared as one store inside the run
            name, store_dir = "corpus", run_dir / "data"
            corpus = d.corpus
        elif (Path(path) / "manifest.json").is_file():
            sources.append(Source(_source_name(path, used), TokenStore(path), weight))
            check_store_tokenizer(sources[-1].store, fp, tokenizer_from)
            continue
        else:
            name = _source_name(path, used)
            store_dir, corpus = run_dir / "data" / name, [path]
        if not (store_dir / "manifest.json").is_file():
            prepare_store(corpus, tokenizer, store_dir, val_fraction=d.val_fraction,
                          seed=cfg.train.seed, encoding=d.encoding, text_field=d.text_field,
                          split=d.split, progress=progress)
        store = TokenStore(store_dir)
        store.check_tokenizer(fp)
        sources.append(Source(name, store, weight))
    return sources


def check_store_tokenizer(store: TokenStore, fingerprint: str, tokenizer_from: str) -> None:
    """Refuse a store made with another tokenizer, saying how to fix it."""
    if store.tokenizer_fingerprint == fingerprint:
        return
    corpus = store.manifest.get("corpus") or ["CORPUS"]
    tok_arg = "" if tokenizer_from == "default" else f" --tokenizer {tokenizer_from}"
    redo = " ".join(f"--corpus {c}" for c in corpus)
    raise UserError(
        f"store {store.path} was made with a different tokenizer (fingerprint "
        f"{store.tokenizer_fingerprint[:12]}) than this run's ({fingerprint[:12]}, from "
        f"{tokenizer_from}). Fix: re-tokenize it with `lmobj prepare {redo}{tok_arg} "
        f"--out {str(store.path).rstrip('/')}-retok`, or give the corpus itself instead of the "
        f"store; if the store's tokenizer is the one you mean to train with, pass "
        f"--tokenizer {store.path / 'tokenizer'}")
