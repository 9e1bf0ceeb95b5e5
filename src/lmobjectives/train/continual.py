"""Continual pre-training: starting a run from another model's weights.

What differs from a fresh run, decided here once and written into ``config.yaml`` and
``run.json`` so a resumed run rebuilds the same thing:

* weights only: the optimizer, the schedule and the data position start fresh at step 0
  (``--resume`` is the other thing: it restores all of them);
* the peak learning rate: given with ``--lr``, or ``--lr-scale`` × the source run's own peak
  (the source must be one of our runs), or, for one of our runs with neither, its peak
  unchanged (Code Llama §2.6 kept Llama 2's peak; Ibrahim et al. 2024 §6.1 re-warm to the
  pre-training η_max and note that a higher peak forgets more and adapts more);
* the warmup is a re-warm over 1% of the steps unless set (``config.REWARM_FRACTION``);
* a longer context: ``--seq-len`` beyond the source's ``max_position_embeddings`` raises it
  (RoPE models only: learned absolute positions cannot grow), and ``--rope-theta`` sets a
  new RoPE base (Code Llama §2.4: 10,000 -> 1,000,000 for 16k context) that the exported
  ``config.json`` carries, so transformers rebuilds the same rotary frequencies;
* an extended tokenizer (``lmobj tokenizer extend``) grows the embeddings, new rows from
  the mean of their old pieces (``models.resize``), and ``--train-new-embeddings-first K``
  trains only those rows for the first K steps.

Worked example: the source run peaked at 3e-3; ``--lr-scale 0.5`` -> the new run's
``train.lr`` is 1.5e-3 in its ``config.yaml``, and ``run.json`` says
``"init": {"source_peak_lr": 0.003, "lr_scale": 0.5, "peak_lr": 0.0015, ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from lmobjectives.config import RunConfig
from lmobjectives.errors import UserError
from lmobjectives.rundir import init_dir


# ------------------------------------------------------------------------------ sources
def source_run(init_from: str) -> Path | None:
    """The run directory behind ``--init-from`` when it is one of our runs (or its final/)."""
    p = Path(init_from)
    run = p.parent if p.name == "final" else p
    if (run / "run.json").is_file() and (run / "config.yaml").is_file() \
            and (run / "final" / "config.json").is_file():
        return run
    return None


def source_peak_lr(run_dir: Path) -> float:
    tree = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return float(tree.get("train", {}).get("lr"))


def resolve_init(cfg: RunConfig) -> tuple[RunConfig, dict[str, Any]]:
    """Fill in the peak learning rate of an initialised run; returns (config, record).

    After this, ``train.lr`` is the peak and ``train.lr_scale`` is None, so the written
    config is fully resolved and a resume does not resolve again."""
    t = cfg.train
    if not cfg.model.init_from:
        if t.lr_scale is not None:
            raise UserError("--lr-scale scales the peak of the run you start from; it needs --init-from")
        return cfg, {}
    precheck_context(cfg)
    src = source_run(cfg.model.init_from)
    record: dict[str, Any] = {"from": cfg.model.init_from,
                              "source_run": str(src.resolve()) if src else None}
    lr_given = "lr" in t.model_fields_set
    if t.lr_scale is not None:
        if lr_given:
            raise UserError("give either --lr or --lr-scale, not both")
        if src is None:
            raise UserError(f"--lr-scale needs a source run of ours (with config.yaml); "
                            f"{cfg.model.init_from} is not one: give the peak with --lr")
        peak = source_peak_lr(src)
        lr = peak * t.lr_scale
        record.update({"source_peak_lr": peak, "lr_scale": t.lr_scale})
    elif not lr_given and src is not None:
        lr = source_peak_lr(src)  # re-warm to the source's own peak
        record.update({"source_peak_lr": lr, "lr_scale": 1.0})
    else:
        lr = t.lr
    record["peak_lr"] = lr
    record["warmup_fraction"] = t.warmup_fraction
    # model_copy marks "lr" as given, so resolving the result again changes nothing
    train = t.model_copy(update={"lr": lr, "lr_scale": None})
    return cfg.model_copy(update={"train": train}), record


def describe_source(model_dir: Path) -> dict[str, Any]:
    """What ``run.json`` says about the weights a run started from."""
    from lmobjectives.tokenizer import load_tokenizer, tokenizer_fingerprint

    conf = json.loads((model_dir / "config.json").read_text())
    out: dict[str, Any] = {"model_dir": str(model_dir.resolve()), "model_type": conf.get("model_type"),
                           "vocab_size": conf.get("vocab_size")}
    if (model_dir / "tokenizer.json").is_file():
        out["tokenizer_fingerprint"] = tokenizer_fingerprint(load_tokenizer(str(model_dir)))
    run = model_dir.parent
    if model_dir.name == "final" and (run / "eval.json").is_file():
        out["source_step"] = json.loads((run / "eval.json").read_text()).get("step")
    return out


def has_rope(config) -> bool:  # noqa: ANN001 - transformers config
    params = getattr(config, "rope_parameters", None)
    return isinstance(params, dict) and "rope_theta" in params


def set_rope_theta(config, theta: float) -> None:  # noqa: ANN001
    if not has_rope(config):
        raise UserError(f"--rope-theta: model type '{config.model_type}' has no rotary position "
                        "embeddings")
    config.rope_parameters = {**config.rope_parameters, "rope_theta": float(theta)}


def fit_context(config, positions: int, rope_theta: float | None) -> None:  # noqa: ANN001
    """Let a loaded config serve ``positions`` positions, with a new RoPE base if given."""
    if rope_theta is not None:
        set_rope_theta(config, rope_theta)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and positions > limit:
        if not has_rope(config):
            raise UserError(f"model type '{config.model_type}' learned {limit} absolute positions; "
                            f"--seq-len needs {positions}: choose --seq-len <= {limit}")
        config.max_position_embeddings = positions


def precheck_context(cfg: RunConfig) -> None:
    """Refuse a context the source model cannot take before anything is written."""
    import transformers as tf

    src = init_dir(cfg.model.init_from)
    try:
        config = tf.AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read the model config in {src}: {str(exc).splitlines()[0]}") from None
    fit_context(config, cfg.data.seq_len, cfg.model.rope_theta)


def rope_overrides(cfg: RunConfig) -> dict[str, Any]:
    """transformers config overrides that set a fresh preset's RoPE base."""
    if cfg.model.rope_theta is None:
        return {}
    return {"rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.model.rope_theta)}}


def extend_vocab(model: torch.nn.Module, model_dir: Path, tokenizer_dir: str | None,
                 tokenizer_vocab: int) -> list[int]:
    """Grow and mean-initialise the rows of an extended tokenizer's new tokens, when the
    model was trained with that extension's base tokenizer. Returns the ids initialised.

    Decided by fingerprint when the model directory has a tokenizer (so a model already
    trained with the extended tokenizer is left alone), else by size: a model with fewer
    rows than the extended vocabulary cannot have learned the new tokens."""
    from lmobjectives.models.resize import add_token_rows
    from lmobjectives.tokenizer import load_tokenizer, tokenizer_fingerprint
    from lmobjectives.tokenizer.extend import load_extension

    ext = load_extension(tokenizer_dir) if tokenizer_dir not in (None, "default") else None
    if ext is None:
        return []
    rows = model.get_input_embeddings().num_embeddings
    if (model_dir / "tokenizer.json").is_file():
        own = tokenizer_fingerprint(load_tokenizer(str(model_dir)))
        if own != ext.base_fingerprint:
            return []
    elif rows >= tokenizer_vocab:
        return []
    if rows < ext.base_vocab_size:
        raise UserError(f"model {model_dir} has {rows} embeddings, fewer than the {ext.base_vocab_size} "
                        f"tokens of the tokenizer that {tokenizer_dir} extends")
    return add_token_rows(model, ext.pieces())
