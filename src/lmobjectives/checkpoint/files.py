"""The files of a checkpoint directory, whatever wrote it: names, leftovers of interrupted
writes, and the checksum table every checkpoint ends with.

``checksums.json`` = ``{"files": {"model.safetensors": "9f2c…", ...}, "self": sha256(canonical
JSON of "files")}``: the SHA-256 of every other file, plus that of the table itself, so a
damaged ``checksums.json`` is reported as such and not as a damaged weight file. It is
written last: a step directory with it is complete. One flipped byte in ``model.safetensors``
makes verification raise "checkpoint file …/model.safetensors is corrupt"; one flipped byte in
``checksums.json`` makes it raise "…/checksums.json is corrupt".
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from lmobjectives.errors import UserError
from lmobjectives.util import atomic_write_json, sha256_file, stable_hash

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


def prune(run_dir: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints. Each is first renamed to a
    hidden ``.step-N.old`` (one atomic step), so a process killed half-way through the
    deletion leaves a leftover that the next start removes, never a damaged ``step-N/``."""
    for old in list_checkpoints(run_dir)[:-keep]:
        hidden = old.with_name(f".{old.name}.old")
        os.replace(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)


def file_sums(directory: Path, files: Iterable[Path]) -> dict[str, str]:
    """{name relative to ``directory``: SHA-256} of ``files``."""
    return {str(f.relative_to(directory)): sha256_file(f) for f in files}


def write_checksums(directory: Path, sums: dict[str, str]) -> None:
    sums = dict(sorted(sums.items()))
    atomic_write_json(directory / CHECKSUMS, {"files": sums, "self": stable_hash(sums)})


def read_checksums(directory: Path) -> dict[str, str]:
    """The file -> SHA-256 table, checked against its own digest (any damage: UserError)."""
    sums_file = Path(directory) / CHECKSUMS
    if not sums_file.is_file():
        raise UserError(f"{directory} is not a complete checkpoint (no {CHECKSUMS})")
    try:
        table = json.loads(sums_file.read_bytes())
    except (ValueError, RecursionError):  # bad JSON or bad UTF-8
        raise UserError(f"checkpoint file {sums_file} is corrupt (not valid JSON)") from None
    files = table.get("files") if isinstance(table, dict) else None
    if not (isinstance(files, dict) and table.get("self") == stable_hash(files)
            and all(isinstance(k, str) and _plain_name(k) and isinstance(v, str) for k, v in files.items())):
        raise UserError(f"checkpoint file {sums_file} is corrupt (its own SHA-256 does not match)")
    return files


def _plain_name(name: str) -> bool:
    """A file inside the checkpoint directory (no way out of it)."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def first_bad_file(directory: Path, sums: dict[str, str], names: Iterable[str] | None = None) -> str | None:
    """The first file (of ``names``; default all) missing or not matching its SHA-256, as a
    message naming it; None when all match."""
    for name in sorted(sums) if names is None else names:
        f = Path(directory) / name
        if not f.is_file():
            return f"checkpoint file {f} is missing"
        if sha256_file(f) != sums[name]:
            return f"checkpoint file {f} is corrupt (SHA-256 mismatch)"
    return None


def check_required(directory: Path, sums: dict[str, str], required: Iterable[str]) -> None:
    for name in required:
        if name not in sums:
            raise UserError(f"checkpoint {directory} is incomplete: {CHECKSUMS} does not list {name}")


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / "state.json").read_bytes())
    except (ValueError, RecursionError):
        state = None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint file {path / 'state.json'} is not a JSON object")
    return state


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    """The trainer state of a complete checkpoint, read before its weights (for early checks)."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise UserError(f"{path / 'state.json'} is missing")
    return read_state(path)
