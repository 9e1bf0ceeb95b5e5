"""From a resolved config to everything a run needs: run directory, tokenizer, stores,
objective, model. Decisions that depend on what the user gave are made here, once, and
written down (``config.yaml``, ``run.json``), so a resumed run rebuilds the same thing.

Tokenizer, in order: ``data.tokenizer``; the tokenizer inside ``data.store``; the one next
to ``model.init_from``; the one inside the first store of ``data.mix``; the shipped default
for the default corpus; else one trained on the corpus inside the run (``RUN/tokenizer``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmobjectives.config import RunConfig, config_to_yaml
from lmobjectives.corpus import DEFAULT_CORPUS, iter_documents
from lmobjectives.data.converters import CONVERTERS
from lmobjectives.data.loader import Loader, PackedSource
from lmobjectives.errors import UserError
from lmobjectives.models.presets import auto_class, build_model
from lmobjectives.objectives import Objective, build_objective
from lmobjectives.store.prepare import prepare_store
from lmobjectives.store.store import TokenStore
from lmobjectives.tokenizer import (load_tokenizer, save_hf_tokenizer, tokenizer_fingerprint,
                                    train_tokenizer)
from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds
from lmobjectives.models.resize import NewRowsOnly
from lmobjectives.train.continual import (check_store_tokenizer, describe_source, extend_vocab,
                                          fit_context, resolve_init, rope_overrides)
from lmobjectives.train.module import StandardModule, TrainModule
from lmobjectives.util import atomic_write_bytes, atomic_write_json, stable_hash

DEFAULT_VOCAB = 8192


@dataclass
class Source:
    name: str
    store: TokenStore
    weight: float


@dataclass
class Run:
    cfg: RunConfig
    dir: Path
    tokenizer: Any  # tokenizers.Tokenizer
    specials: SpecialIds
    sources: list[Source]
    objective: Objective
    architecture: str
    model: torch.nn.Module
    module: TrainModule
    device: torch.device
    bf16: bool
    rank: int = 0
    world_size: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    update_filter: Any = None  # e.g. models.resize.NewRowsOnly: which parameters a step may change

    @property
    def converter(self):
        return CONVERTERS[self.architecture]

    @property
    def sharded(self) -> bool:
        """FSDP runs keep sharded (DCP) checkpoints, whatever their number of processes."""
        return self.cfg.distributed.strategy == "fsdp"

    @property
    def row_length(self) -> int:
        return self.objective.row_length(self.cfg.data.seq_len)

    def train_loader(self) -> Loader:
        seed = self.cfg.train.seed
        srcs = [PackedSource(s.store.split("train"), self.row_length, seed=seed + 1000 * i,
                             pad=self.specials.pad) for i, s in enumerate(self.sources)]
        return Loader(srcs, [s.weight for s in self.sources], batch_size=self.cfg.train.batch_size,
                      rank=self.rank, world_size=self.world_size)

    def val_source(self, index: int = 0) -> PackedSource | None:
        table = self.sources[index].store.split("val")
        if len(table.docs) == 0:
            return None
        return PackedSource(table, self.row_length, seed=0, pad=self.specials.pad, shuffle=False)


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.objective}-{time.strftime('%Y%m%d-%H%M%S')}"


def select_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware computes it fast; fp32 elsewhere (bf16 emulated on a
    CPU without AVX512-BF16/AMX runs ~100× slower than fp32)."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision == "bf16" and not supported:
        raise UserError(f"precision bf16 asked for, but this {device.type} has no fast bf16; "
                        "use --set model.precision=auto")
    return supported


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
    texts = (doc.text for doc in iter_documents(corpus, encoding=d.encoding, text_field=d.text_field))
    tok = train_tokenizer(texts, DEFAULT_VOCAB, None)
    save_hf_tokenizer(tok, own)
    return tok, str(own)


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
    save_hf_tokenizer(tok, own)
    return tok, f"{tok_from} + {len(missing)} reserved tokens ({own})"


def init_dir(path: str) -> Path:
    """``init_from`` may name an HF model directory or one of our runs (its ``final/``)."""
    p = Path(path)
    if (p / "final" / "config.json").is_file():
        return p / "final"
    if (p / "config.json").is_file():
        return p
    raise UserError(f"--init-from {path}: not a model directory (no config.json) nor a finished run")


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
                          progress=progress)
        store = TokenStore(store_dir)
        store.check_tokenizer(fp)
        sources.append(Source(name, store, weight))
    return sources


def load_init_model(cfg: RunConfig, architecture: str, specials: SpecialIds, *,
                    tokenizer_dir: str | None = None, positions: int = 0,
                    report: dict[str, Any] | None = None) -> torch.nn.Module:
    """The weights of ``model.init_from``, fitted to ``positions`` positions (and a new RoPE
    base), with rows for an extended tokenizer's new tokens (see ``train.continual``)."""
    import transformers as tf

    src = init_dir(cfg.model.init_from)
    auto = auto_class(architecture)
    try:
        config = tf.AutoConfig.from_pretrained(str(src), trust_remote_code=False)
        fit_context(config, positions, cfg.model.rope_theta)
        model = auto.from_pretrained(str(src), config=config, trust_remote_code=False,
                                     attn_implementation="sdpa", dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load a model from {src}: {str(exc).splitlines()[0]}") from None
    added = extend_vocab(model, src, tokenizer_dir, specials.vocab_size)
    n_rows = model.get_input_embeddings().num_embeddings
    if n_rows < specials.vocab_size and set(range(n_rows, specials.vocab_size)) <= set(specials.all_ids()):
        # Only reserved tokens appended by with_reserved_tokens lie past the model's rows.
        model.resize_token_embeddings(specials.vocab_size, mean_resizing=True)
    if report is not None:
        report.update(describe_source(src))
        report["new_token_ids"] = len(added)
        report["_added"] = added
    if model.get_input_embeddings().num_embeddings < specials.vocab_size:
        raise UserError(
            f"model {src} has {model.get_input_embeddings().num_embeddings} embeddings but the "
            f"tokenizer has {specials.vocab_size} tokens; use the model's own tokenizer "
            "(--tokenizer) or extend the model with `lmobj tokenizer extend`")
    return model


def open_run(cfg: RunConfig, run_dir: Path, *, progress: bool = True, rank: int = 0,
             world_size: int = 1) -> Run:
    """Build everything for ``cfg`` in ``run_dir`` (created if needed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg, init_info = resolve_init(cfg)
    tokenizer, tok_from = resolve_tokenizer(cfg, run_dir)
    specials = SpecialIds.from_vocab(tokenizer.get_vocab(with_added_tokens=True),
                                     tokenizer.get_vocab_size())
    sources = resolve_sources(cfg, run_dir, tokenizer, progress, tokenizer_from=tok_from)
    objective = build_objective(cfg.objective, dict(cfg.objective_params), specials, tokenizer=tokenizer)
    architecture = cfg.resolved_architecture
    device = select_device()
    positions = max(objective.row_length(cfg.data.seq_len), cfg.data.seq_len)
    # Objectives that need their own model shape say so (MTP: extra heads, per-head loss terms).
    mtp = getattr(objective, "model_kind", None) == "mtp"
    overrides = {**cfg.model.config, **rope_overrides(cfg)}
    if mtp and not cfg.model.init_from:
        from lmobjectives.train.mtp_module import base_overrides

        overrides = base_overrides(objective, cfg.model.preset, overrides)
    if cfg.model.init_from:
        model = load_init_model(cfg, architecture, specials, tokenizer_dir=tok_from,
                                positions=positions, report=init_info)
    else:
        model = build_model(cfg.model.preset, architecture, specials, max_positions=positions * 2,
                            seed=cfg.train.seed, overrides=overrides)
    if mtp:
        from lmobjectives.train.mtp_module import wrap_model

        model = wrap_model(model, objective, cfg.train.seed, cfg.model.init_from)
    added = init_info.pop("_added", [])
    update_filter = None
    if cfg.train.new_embeddings_first:
        update_filter = NewRowsOnly(model, added, cfg.train.new_embeddings_first)
    model.config.use_cache = False
    model.to(device)
    bf16 = use_bf16(cfg.model.precision, device)
    if mtp:
        from lmobjectives.train.mtp_module import MTPModule

        module: TrainModule = MTPModule(model, objective, bf16=bf16)
    else:
        # torch.compile wraps the same parameters: checkpoints and export use the plain model.
        forward_model = torch.compile(model) if cfg.model.compile else model
        module = StandardModule(forward_model, architecture, bf16=bf16,
                                suppressed=objective.suppressed_ids())
    info = {"tokenizer": tok_from, "init_from": cfg.model.init_from, "init": init_info or None,
            "sources": {s.name: {"path": str(s.store.path), "fingerprint": s.store.fingerprint,
                                 "weight": s.weight} for s in sources}}
    return Run(cfg=cfg, dir=run_dir, tokenizer=tokenizer, specials=specials, sources=sources,
               objective=objective, architecture=architecture, model=model, module=module,
               device=device, bf16=bf16, rank=rank, world_size=world_size, info=info,
               update_filter=update_filter)


def config_hash(cfg: RunConfig) -> str:
    """Hash of what decides the training trajectory (not ``steps`` or cadence keys)."""
    tree = cfg.model_dump(mode="json")
    for key in ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
        tree["train"].pop(key, None)
    tree.pop("out", None)
    return stable_hash(tree)


def write_run_files(run: Run) -> None:
    atomic_write_bytes(run.dir / "config.yaml", config_to_yaml(run.cfg).encode())
    atomic_write_json(run.dir / "run.json", {**run.info, "objective": run.cfg.objective,
                                              "architecture": run.architecture,
                                              "config_hash": config_hash(run.cfg)})


def read_run_info(run_dir: Path) -> dict[str, Any]:
    f = Path(run_dir) / "run.json"
    if not f.is_file():
        raise UserError(f"{run_dir} is not an lmobj run directory (no run.json)")
    return json.loads(f.read_text())


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
