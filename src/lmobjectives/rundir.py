"""A run directory on disk: where its model is, what ``run.json`` and ``config.yaml`` say,
the hash that decides whether a checkpoint may be resumed, and its ``metrics.jsonl``.

Training writes these files; evaluation, inference and reports only read them. Both sides
import this module, so none of them needs the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lmobjectives.config import RunConfig, build_config, set_key
from lmobjectives.errors import UserError
from lmobjectives.util import stable_hash

METRICS = "metrics.jsonl"
# Keys that change cadence or length, not the trajectory: a resume may change them.
CADENCE_KEYS = ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                "keep_checkpoints")


def init_dir(path: str) -> Path:
    """``init_from`` may name an HF model directory or one of our runs (its ``final/``)."""
    p = Path(path)
    if (p / "final" / "config.json").is_file():
        return p / "final"
    if (p / "config.json").is_file():
        return p
    raise UserError(f"--init-from {path}: not a model directory (no config.json) nor a finished run")


def model_dir(path: str | Path) -> tuple[Path, Path | None]:
    """(model directory, run directory or None) for a run or a plain HF model directory."""
    p = Path(path)
    if (p / "final" / "config.json").is_file():
        return p / "final", p
    if (p / "config.json").is_file():
        return p, None
    if (p / "run.json").is_file():
        raise UserError(f"run {p} has no final/ model yet; finish it (lmobj train --resume {p}) "
                        "or export a checkpoint with `lmobj export`")
    raise UserError(f"{p} is neither a run directory nor an HF model directory")


def read_run_info(run_dir: Path) -> dict[str, Any]:
    f = Path(run_dir) / "run.json"
    if not f.is_file():
        raise UserError(f"{run_dir} is not an lmobj run directory (no run.json)")
    return json.loads(f.read_text())


def recorded_path(run_dir: Path, out: str | None, path: str) -> Path:
    """A path from ``run.json``; recorded relative to where training ran (``out``), it is
    re-anchored on the run directory when the run has moved."""
    p = Path(path)
    if not p.exists() and out and not p.is_absolute():
        try:
            return Path(run_dir) / p.relative_to(out)
        except ValueError:
            pass
    return p


def load_run_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The run's ``config.yaml`` with dotted-key ``overrides`` (e.g. ``train.steps``)."""
    f = Path(run_dir) / "config.yaml"
    if not f.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); nothing to resume")
    tree = yaml.safe_load(f.read_text())
    for key, value in (overrides or {}).items():
        set_key(tree, key, value)
    return build_config(tree)


def config_hash(cfg: RunConfig) -> str:
    """Hash of what decides the training trajectory (not ``steps`` or cadence keys)."""
    tree = cfg.model_dump(mode="json")
    for key in CADENCE_KEYS:
        tree["train"].pop(key, None)
    if tree["train"].get("loss_chunks") == 1:
        del tree["train"]["loss_chunks"]  # the one-piece loss of runs written before the key existed
    tree.pop("out", None)
    tree.pop("log", None)  # trackers watch the run; they do not change it
    if tree["data"].get("split") == "train":
        tree["data"].pop("split")  # runs from before the key existed keep their hash
    tree["data"].pop("prefetch", None)  # when batches are made does not change them
    return stable_hash(tree)


def parse_metric_lines(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every readable record; a line cut by a crash (or damaged) is skipped."""
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict):
            out.append((line, rec))
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable record of a run's ``metrics.jsonl`` (none when it has none yet)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [rec for _, rec in parse_metric_lines(path.read_bytes().decode("utf-8", "replace"))]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` logged after ``last_step`` (a resumed run redoes
    them), and lines cut by a crash."""
    path = Path(path)
    if not path.is_file():
        return
    from lmobjectives.util import atomic_write_bytes

    text = path.read_bytes().decode("utf-8", "replace")
    keep = [line for line, rec in parse_metric_lines(text)
            if isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= last_step]
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode())
