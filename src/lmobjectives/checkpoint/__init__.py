"""Checkpoints in one place: full ones (one process, DDP: ``full.py``) and sharded ones (FSDP,
through torch.distributed.checkpoint: ``sharded.py``) share the directory rules and the
checksum table (``files.py``). ``verify_checkpoint`` and ``load_weights`` look at what is on
disk (a DCP ``.metadata`` file or not) and dispatch; so ``lmobj verify`` checks both kinds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmobjectives.checkpoint.files import (CHECKSUMS, STEP_DIR, clean_leftovers, list_checkpoints,
                                           read_checkpoint_state, read_state, step_dir_name)
from lmobjectives.checkpoint.full import load_checkpoint, save_checkpoint, verify_full
from lmobjectives.checkpoint.sharded import (is_sharded_checkpoint, load_sharded, save_sharded,
                                             verify_sharded)
from lmobjectives.errors import UserError

__all__ = ["CHECKSUMS", "clean_leftovers", "is_sharded_checkpoint", "list_checkpoints", "load",
           "load_weights", "read_checkpoint_state", "save_checkpoint", "save_sharded",
           "step_dir_name", "verify_checkpoint", "verify_run"]


def verify_checkpoint(path: Path) -> None:
    """Check every file of a full or sharded checkpoint against its SHA-256; a mismatch names
    the file. In a group of processes, sharded checks are collective."""
    (verify_sharded if is_sharded_checkpoint(path) else verify_full)(Path(path))


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
         ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Verify, then load weights (and optimizer) in place, whatever kind is on disk; returns
    (state, scheduler, rng)."""
    return (load_sharded if is_sharded_checkpoint(path) else load_checkpoint)(Path(path), model, optimizer)


def load_weights(path: Path, model: torch.nn.Module) -> None:
    load(path, model, None)


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
            state = read_state(d)
            if step is not None and state.get("step") != step:
                raise UserError(f"checkpoint {d}: state.json records step {state.get('step')}, "
                                f"the directory name says {step}")
            error = None
        except UserError as exc:
            error = str(exc)
        out.append({"checkpoint": str(d), "step": step, "ok": error is None, "error": error})
    out.extend({"leftover": str(p)} for p in leftovers)
    return out
