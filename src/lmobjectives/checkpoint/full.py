"""Full checkpoints (one process or DDP): complete or absent, verified on load.

``checkpoints/step-NNNNNNN/`` holds ``model.safetensors``, ``optimizer.pt`` and
``scheduler.pt`` (plain tensors and numbers: ``torch.load(weights_only=True)`` reads them, and
nothing else is ever unpickled), ``rng.pt``, ``state.json`` (step, tokens, loader state,
config hash, store fingerprint) and ``checksums.json`` (``checkpoint/files.py``). A
checkpoint is written under a temporary name, fsynced, then renamed, so a crash at any moment
leaves either the previous checkpoints or the new one complete; temporary leftovers are
removed on the next start. The newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from lmobjectives.checkpoint.files import (check_required, file_sums, first_bad_file, prune,
                                           read_checksums, read_state, step_dir_name,
                                           write_checksums)
from lmobjectives.errors import UserError
from lmobjectives.util import atomic_write_json, publish_dir

REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


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
        write_checksums(tmp, file_sums(tmp, sorted(tmp.iterdir())))
        publish_dir(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final}: {exc.strerror or exc}; "
                        "the previous checkpoints are intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep)
    return final


def verify_full(path: Path) -> None:
    """Check every file against its recorded SHA-256; a mismatch names the file."""
    sums = read_checksums(path)
    check_required(path, sums, REQUIRED)
    problem = first_bad_file(path, sums)
    if problem:
        raise UserError(problem)


def _load_tensors(f: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers: a pickle that names any
    other class or function is refused before anything in it runs."""
    try:
        return torch.load(f, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if ln.strip().startswith(("Unsupported", "Trying"))),
                      first[0] if first else "")
        raise UserError(f"refusing to load checkpoint file {f}: it holds more than tensors and "
                        f"plain data ({detail})") from None
    except Exception as exc:  # noqa: BLE001 - any other way the file cannot be read
        raise UserError(f"cannot read checkpoint file {f}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Verify, then load weights (and optimizer) in place; returns (state, scheduler, rng)."""
    path = Path(path)
    verify_full(path)
    state = read_state(path)
    optim_state = _load_tensors(path / "optimizer.pt") if optimizer is not None else None
    scheduler = _load_tensors(path / "scheduler.pt")
    rng = _load_tensors(path / "rng.pt")
    try:
        load_model(model, str(path / "model.safetensors"))
        if optimizer is not None:
            optimizer.load_state_dict(optim_state)
    except Exception as exc:  # a shape mismatch, a damaged header: say which checkpoint
        raise UserError(f"cannot load checkpoint {path}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return state, scheduler, rng
