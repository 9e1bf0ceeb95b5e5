"""From a resolved config to everything a run trains with: the run's spec (``spec.py``:
tokenizer, stores, objective) plus its model, the model's loss (``step/``), device and
precision. Decisions that depend on what the user gave are made here, once, and written down
(``config.yaml``, ``run.json``), so a resumed run rebuilds the same thing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmobjectives.config import RunConfig, config_to_yaml
from lmobjectives.data.loader import Loader, PackedSource
from lmobjectives.errors import UserError
from lmobjectives.models.presets import auto_class, build_model
from lmobjectives.models.resize import NewRowsOnly
from lmobjectives.rundir import config_hash, init_dir
from lmobjectives.runtime import select_device, use_bf16
from lmobjectives.spec import RunSpec, new_spec
from lmobjectives.step import TrainModule, model_kind
from lmobjectives.tokenizer.special import SpecialIds
from lmobjectives.train.continual import describe_source, extend_vocab, fit_context, resolve_init, rope_overrides
from lmobjectives.util import atomic_write_bytes, atomic_write_json


@dataclass(kw_only=True)
class Run(RunSpec):
    """A spec with its model: ``model`` is the module whose weights train and are saved;
    ``model_with_loss`` runs it on a batch and computes the loss terms (``step/``)."""

    model: torch.nn.Module
    model_with_loss: TrainModule
    device: torch.device
    bf16: bool
    rank: int = 0
    world_size: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    update_filter: Any = None  # e.g. models.resize.NewRowsOnly: which parameters a step may change

    @property
    def sharded(self) -> bool:
        """FSDP runs keep sharded (DCP) checkpoints, whatever their number of processes."""
        return self.cfg.distributed.strategy == "fsdp"

    def train_loader(self) -> Loader:
        seed = self.cfg.train.seed
        srcs = [PackedSource(s.store.split("train"), self.row_length, seed=seed + 1000 * i,
                             pad=self.specials.pad) for i, s in enumerate(self.sources)]
        return Loader(srcs, [s.weight for s in self.sources], batch_size=self.cfg.train.batch_size,
                      rank=self.rank, world_size=self.world_size)


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.objective}-{time.strftime('%Y%m%d-%H%M%S')}"


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
    spec, tok_from = new_spec(cfg, run_dir, progress=progress)
    device = select_device()
    # FSDP on several processes: shapes only here; parallelize materialises and shards the
    # model one block at a time, so no rank ever holds all of it (train/distributed.py).
    meta = cfg.distributed.strategy == "fsdp" and world_size > 1 and not cfg.model.init_from
    model = build_run_model(spec, tok_from, init_info, meta=meta)
    added = init_info.pop("_added", [])
    update_filter = None
    if cfg.train.new_embeddings_first:
        update_filter = NewRowsOnly(model, added, cfg.train.new_embeddings_first)
    model.config.use_cache = False
    if not meta:
        model.to(device)
    bf16 = use_bf16(cfg.model.precision, device)
    with_loss = model_kind(spec.objective).step(model, spec.objective, spec.architecture, bf16,
                                                cfg.model.compile, cfg.train.loss_chunks)
    info = {"tokenizer": tok_from, "init_from": cfg.model.init_from, "init": init_info or None,
            "sources": {s.name: {"path": str(s.store.path), "fingerprint": s.store.fingerprint,
                                 "weight": s.weight} for s in spec.sources}}
    return Run(**vars(spec), model=model, model_with_loss=with_loss, device=device, bf16=bf16,
               rank=rank, world_size=world_size, info=info, update_filter=update_filter)


def build_run_model(spec: RunSpec, tok_from: str, init_info: dict[str, Any], *,
                    meta: bool = False) -> torch.nn.Module:
    """The model that trains: a preset built from scratch or ``init_from``'s weights, then
    wrapped as the objective's model kind asks (e.g. MTP: extra heads, a shorter trunk).
    ``meta``: a preset's shapes only, for ``models.init.materialise`` to fill in."""
    cfg = spec.cfg
    kind = model_kind(spec.objective)
    positions = max(spec.row_length, cfg.data.seq_len)
    if cfg.model.init_from:
        model = load_init_model(cfg, spec.architecture, spec.specials, tokenizer_dir=tok_from,
                                positions=positions, report=init_info)
    else:
        overrides = kind.overrides(spec.objective, cfg.model.preset,
                                   {**cfg.model.config, **rope_overrides(cfg)})
        model = build_model(cfg.model.preset, spec.architecture, spec.specials,
                            max_positions=positions * 2, seed=cfg.train.seed, overrides=overrides,
                            meta=meta)
    return kind.wrap(model, spec.objective, cfg.train.seed, cfg.model.init_from)


def write_config_first(cfg: RunConfig, run_dir: Path) -> None:
    """``config.yaml`` of a new run, written (atomically) before any setup work: a run killed
    while its tokenizer or store is prepared, or while a timed run calibrates, can then be
    resumed, and the setup redoes what is missing. Only the keys given are written, so that
    the resume decides what the start would have (a timed run without a preset calibrates
    and sizes its model); ``write_run_files`` rewrites it, resolved, once the run is open."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = config_to_yaml(resolve_init(cfg)[0], given_only=True)
        atomic_write_bytes(run_dir / "config.yaml", text.encode())
    except OSError as exc:  # forbidden, read-only, under a file: the user's to fix
        raise UserError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}") from None


def write_run_files(run: Run) -> None:
    atomic_write_bytes(run.dir / "config.yaml", config_to_yaml(run.cfg).encode())
    atomic_write_json(run.dir / "run.json", {**run.info, "objective": run.cfg.objective,
                                              "architecture": run.architecture,
                                              "config_hash": config_hash(run.cfg)})
