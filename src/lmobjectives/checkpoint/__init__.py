"""Checkpoints in one place: full ones (one process, DDP: ``full.py``) and sharded ones (FSDP,
through torch.distributed.checkpoint: ``sharded.py``) share the directory rules and the
checksum table (``files.py``). ``verify_checkpoint`` and ``load_weights`` look at what is on
disk (a DCP ``.metadata`` file or not) and dispatch; so ``lmobj verify`` checks both kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmobjectives.checkpoint.files import (CHECKSUMS, STEP_DIR, clean_leftovers, file_sums,
                                           first_bad_file, list_checkpoints, read_checkpoint_state,
                                           read_checksums, read_state, step_dir_name, write_checksums)
from lmobjectives.checkpoint.full import load_checkpoint, save_checkpoint, verify_full
from lmobjectives.checkpoint.sharded import (is_sharded_checkpoint, load_sharded, save_sharded,
                                             verify_sharded)
from lmobjectives.errors import UserError

__all__ = ["CHECKSUMS", "clean_leftovers", "file_sums", "verify_export", "write_checksums", "is_sharded_checkpoint", "list_checkpoints", "load",
           "load_weights", "read_checkpoint_state", "save_checkpoint", "save_sharded",
           "step_dir_name", "verify_checkpoint", "verify_run"]


def verify_checkpoint(path: Path) -> None:
    """Check every file of a full or sharded checkpoint against its SHA-256; a mismatch names
    the file. In a group of processes, sharded checks are collective."""
    (verify_sharded if is_sharded_checkpoint(path) else verify_full)(Path(path))


def is_exported_model(path: Path) -> bool:
    """An HF directory we exported (a run's ``final/`` or ``lmobj export --out``)."""
    return (Path(path) / "config.json").is_file() and not (Path(path) / "state.json").exists()


def verify_export(path: Path) -> None:
    """Check an exported model directory against the ``checksums.json`` its export wrote."""
    path = Path(path)
    if not (path / CHECKSUMS).is_file():
        raise UserError(f"{path} has no {CHECKSUMS} (exported before exports carried one, or not by "
                        "lmobj); nothing to verify it against")
    sums = read_checksums(path)
    if not any(name.endswith(".safetensors") for name in sums):
        raise UserError(f"model {path} is incomplete: {CHECKSUMS} lists no .safetensors weights")
    problem = first_bad_file(path, sums)
    if problem:
        raise UserError(problem.replace("checkpoint file", "model file", 1))


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
         ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Verify, then load weights (and optimizer) in place, whatever kind is on disk; returns
    (state, scheduler, rng)."""
    return (load_sharded if is_sharded_checkpoint(path) else load_checkpoint)(Path(path), model, optimizer)


def load_weights(path: Path, model: torch.nn.Module) -> None:
    load(path, model, None)


def verify_run(run_dir: Path) -> list[dict[str, Any]]:
    """Verify every checkpoint of a run and its ``final/`` model (or one checkpoint directory,
    or one exported model directory).

    Returns one record per checkpoint, oldest first, then one for ``final/``:
    ``{"checkpoint", "step", "kind", "ok", "error"}`` (kind ``checkpoint`` or ``model``);
    a checkpoint is ok when every file matches its SHA-256 and ``state.json`` records the
    step its name says. Step directories without ``checksums.json`` (never produced by our
    writer, e.g. a partial copy) are reported as not ok; temporary leftovers of an
    interrupted write are not checkpoints and are listed as ``{"leftover": path}``.
    """
    run_dir = Path(run_dir)
    if is_exported_model(run_dir):
        return [_verify_model(run_dir)]
    models: list[Path] = []
    if (run_dir / CHECKSUMS).is_file() or STEP_DIR.match(run_dir.name):
        dirs, leftovers = [run_dir], []
    else:
        root = run_dir / "checkpoints"
        final = run_dir / "final"
        if not root.is_dir() and not final.is_dir():
            what = "no checkpoints/ directory" if run_dir.is_dir() else "it does not exist"
            raise UserError(f"{run_dir} is not a run with checkpoints ({what})")
        dirs = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()),
                      key=lambda p: int(STEP_DIR.match(p.name).group(1))) if root.is_dir() else []
        leftovers = sorted(p for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []
        if not dirs and not final.is_dir():
            raise UserError(f"{run_dir} holds no checkpoint yet")
        models = [final] if final.is_dir() else []
    return (_verify_checkpoints(dirs) + [_verify_model(m) for m in models]
            + [{"leftover": str(p)} for p in leftovers])


def _verify_model(d: Path) -> dict[str, Any]:
    try:
        verify_export(d)
        error = None
    except UserError as exc:
        error = str(exc)
    return {"checkpoint": str(d), "step": None, "kind": "model", "ok": error is None, "error": error}


def _verify_checkpoints(dirs: list[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for d in dirs:
        m = STEP_DIR.match(d.name)
        step = int(m.group(1)) if m else None
        try:
            verify_checkpoint(d)
            state = read_state(d)
            if step is not None and state.get("step") != step:
                raise UserError(f"checkpoint {d}: state.json records step {state.get('step')}, "
                                f"the directory name says {step}")
            error = None
        except UserError as exc:
            error = str(exc)
        out.append({"checkpoint": str(d), "step": step, "kind": "checkpoint", "ok": error is None,
                    "error": error})
    return out
