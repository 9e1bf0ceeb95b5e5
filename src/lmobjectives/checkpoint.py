"""Checkpoints: complete or absent, verified on load.

``checkpoints/step-NNNNNNN/`` holds ``model.safetensors``, ``optimizer.pt`` and
``scheduler.pt`` (plain tensors and numbers: ``torch.load(weights_only=True)`` reads them, and
nothing else is ever unpickled), ``state.json`` (step, tokens, loader state, RNG states,
config hash, store fingerprint) and ``checksums.json`` (SHA-256 of every other file).
A checkpoint is written under a temporary name, fsynced, then renamed, so a crash at any
moment leaves either the previous checkpoints or the new one complete; temporary leftovers
are removed on the next start. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from lmobjectives.errors import UserError
from lmobjectives.util import atomic_write_json, publish_dir, sha256_file

STEP_DIR = re.compile(r"^step-(\d{7,})$")
CHECKSUMS = "checksums.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory is complete once it has its checksums)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / CHECKSUMS).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove temporary directories left by a crash during a checkpoint write."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler_state: dict[str, Any], state: dict[str, Any], rng: dict[str, torch.Tensor],
                    keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        atomic_write_json(tmp / "state.json", state)
        sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        atomic_write_json(tmp / CHECKSUMS, sums)
        publish_dir(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final}: {exc.strerror or exc}; "
                        "the previous checkpoints are intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> None:
    """Check every file against its recorded SHA-256; a mismatch names the file."""
    path = Path(path)
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {CHECKSUMS})")
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{sums_file} is corrupt") from None
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            raise UserError(f"checkpoint file {f} is missing")
        if sha256_file(f) != digest:
            raise UserError(f"checkpoint file {f} is corrupt (SHA-256 mismatch)")


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint, read before its weights (for early checks)."""
    path = Path(path)
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path / 'state.json'} is missing or corrupt") from None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Verify, then load weights (and optimizer) in place; returns (state, scheduler, rng)."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        load_model(model, str(path / "model.safetensors"))
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler = torch.load(path / "scheduler.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
    except Exception as exc:  # an unpickling refusal or a shape mismatch: say which checkpoint
        raise UserError(f"cannot load checkpoint {path}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    state = json.loads((path / "state.json").read_text())
    return state, scheduler, rng
