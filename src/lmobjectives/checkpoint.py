"""Checkpoints: complete or absent, verified on load.

``checkpoints/step-NNNNNNN/`` holds ``model.safetensors``, ``optimizer.pt`` and
``scheduler.pt`` (plain tensors and numbers: ``torch.load(weights_only=True)`` reads them, and
nothing else is ever unpickled), ``state.json`` (step, tokens, loader state, RNG states,
config hash, store fingerprint) and ``checksums.json`` (SHA-256 of every other file, plus
the SHA-256 of that table itself, so a damaged ``checksums.json`` is reported as such and
not as a damaged weight file). A checkpoint is written under a temporary name, fsynced,
then renamed, so a crash at any moment leaves either the previous checkpoints or the new one
complete; temporary leftovers are removed on the next start. The newest ``keep``
checkpoints are kept.

Worked example: ``checksums.json`` = ``{"files": {"model.safetensors": "9f2c…", ...},
"self": sha256(canonical JSON of "files")}``; one flipped byte in ``model.safetensors``
makes ``verify_checkpoint`` raise "checkpoint file …/model.safetensors is corrupt"; one
flipped byte in ``checksums.json`` makes it raise "…/checksums.json is corrupt".
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from lmobjectives.errors import UserError
from lmobjectives.util import atomic_write_json, publish_dir, sha256_file, stable_hash

STEP_DIR = re.compile(r"^step-(\d{7,})$")
CHECKSUMS = "checksums.json"
REQUIRED = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory is complete once it has its checksums)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / CHECKSUMS).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


# What our atomic writers leave behind when killed: ``.NAME.tmp-XXXXXXXX`` directories
# (checkpoints, stores, exports: mkdtemp), ``.NAME.XXXXXXXX.tmp`` / ``.NAME.XXXXXXXX.png``
# files (atomic_write_bytes, plots: mkstemp's 8 random characters) and ``.NAME.old``
# directories (publish_dir replacing an existing one).
LEFTOVER = re.compile(r"^\..+(\.tmp-[^/]+|\.[a-z0-9_]{8}\.[a-z]+|\.old)$")


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove temporary files and directories left by a crash during a write: everything
    hidden under ``checkpoints/`` and our writers' temporary names in the run directory and
    its ``data/``. Nothing a user made matches these names."""
    run_dir = Path(run_dir)
    removed = []
    root = run_dir / "checkpoints"
    candidates = [p for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []
    for d in (run_dir, run_dir / "data"):
        if d.is_dir():
            candidates += [p for p in d.iterdir() if LEFTOVER.match(p.name)]
    for p in candidates:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
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
        atomic_write_json(tmp / CHECKSUMS, {"files": sums, "self": stable_hash(sums)})
        publish_dir(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final}: {exc.strerror or exc}; "
                        "the previous checkpoints are intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints. Each is first renamed to a hidden
    ``.step-N.old`` (one atomic step), so a process killed half-way through the deletion
    leaves a leftover that the next start removes, never a damaged ``step-N/``."""
    for old in list_checkpoints(run_dir)[:-keep]:
        hidden = old.with_name(f".{old.name}.old")
        os.replace(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def verify_checkpoint(path: Path) -> None:
    """Check every file against its recorded SHA-256; a mismatch names the file."""
    path = Path(path)
    sums_file = path / CHECKSUMS
    if not sums_file.is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {CHECKSUMS})")
    sums = _read_checksums(sums_file)
    for name in REQUIRED:
        if name not in sums:
            raise UserError(f"checkpoint {path} is incomplete: {CHECKSUMS} does not list {name}")
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            raise UserError(f"checkpoint file {f} is missing")
        if sha256_file(f) != digest:
            raise UserError(f"checkpoint file {f} is corrupt (SHA-256 mismatch)")


def verify_run(run_dir: Path) -> list[dict[str, Any]]:
    """Verify every checkpoint of a run (or one checkpoint directory).

    Returns one record per checkpoint, oldest first: ``{"checkpoint", "step", "ok", "error"}``;
    a checkpoint is ok when every file matches its SHA-256 and ``state.json`` records the
    step its name says. Step directories without ``checksums.json`` (never produced by our
    writer, e.g. a partial copy) are reported as not ok; temporary leftovers of an
    interrupted write are not checkpoints and are listed as ``{"leftover": path}``.
    """
    run_dir = Path(run_dir)
    if (run_dir / CHECKSUMS).is_file() or STEP_DIR.match(run_dir.name):
        dirs, leftovers = [run_dir], []
    else:
        root = run_dir / "checkpoints"
        if not root.is_dir():
            what = "no checkpoints/ directory" if run_dir.is_dir() else "it does not exist"
            raise UserError(f"{run_dir} is not a run with checkpoints ({what})")
        dirs = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()),
                      key=lambda p: int(STEP_DIR.match(p.name).group(1)))
        leftovers = sorted(p for p in root.iterdir() if p.name.startswith("."))
        if not dirs:
            raise UserError(f"{run_dir} holds no checkpoint yet")
    out: list[dict[str, Any]] = []
    for d in dirs:
        m = STEP_DIR.match(d.name)
        step = int(m.group(1)) if m else None
        try:
            verify_checkpoint(d)
            state = _read_state(d)
            if step is not None and state.get("step") != step:
                raise UserError(f"checkpoint {d}: state.json records step {state.get('step')}, "
                                f"the directory name says {step}")
            error = None
        except UserError as exc:
            error = str(exc)
        out.append({"checkpoint": str(d), "step": step, "ok": error is None, "error": error})
    out.extend({"leftover": str(p)} for p in leftovers)
    return out


def _read_checksums(sums_file: Path) -> dict[str, str]:
    """The file -> SHA-256 table, checked against its own digest (any damage: UserError)."""
    try:
        table = json.loads(sums_file.read_bytes())
    except (ValueError, RecursionError):  # bad JSON or bad UTF-8
        raise UserError(f"checkpoint file {sums_file} is corrupt (not valid JSON)") from None
    files = table.get("files") if isinstance(table, dict) else None
    if not (isinstance(files, dict) and table.get("self") == stable_hash(files)
            and all(isinstance(k, str) and "/" not in k and k not in ("", ".", "..") and isinstance(v, str)
                    for k, v in files.items())):
        raise UserError(f"checkpoint file {sums_file} is corrupt (its own SHA-256 does not match)")
    return files


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_bytes())
    except (ValueError, RecursionError):
        state = None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint file {path / 'state.json'} is not a JSON object")
    return state


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

def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint, read before its weights (for early checks)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise UserError(f"{path / 'state.json'} is missing")
    return _read_state(path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Verify, then load weights (and optimizer) in place; returns (state, scheduler, rng)."""
    path = Path(path)
    verify_checkpoint(path)
    state = _read_state(path)
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
