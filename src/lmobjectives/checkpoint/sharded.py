"""Sharded checkpoints of FSDP runs, through ``torch.distributed.checkpoint`` (DCP).

``checkpoints/step-NNNNNNN/`` follows the rules of full checkpoints (complete or absent,
every file checksummed in ``checksums.json``: ``checkpoint/files.py``) and holds DCP's
files — one ``__R_0.distcp`` per writing rank with its shards of weights and optimizer
state, and ``.metadata`` with the global shapes — plus ``scheduler.pt``, ``rng.pt``,
``state.json`` and ``checksums.json``.

Write: every rank writes its shards into ``.step-NNNNNNN.tmp``; DCP's save returns once all
shards are on disk (fsynced; its last step is a collective). Rank ``r`` of ``W`` then hashes
every ``W``-th file, so hashing a large checkpoint runs in parallel; rank 0 writes
``checksums.json`` last and renames the directory. A crash leaves a dot-directory that the
next start removes. Every rank must see the directory (a shared filesystem), as DCP needs.

Read: the same split verifies the checksums (a mismatch stops every rank with the file's
name), then DCP reads each rank's slices of the global tensors — whatever the number of
ranks that wrote them, which is how ``--allow-reshard`` continues on a different count.

Trade-off: no rank ever holds the full state (1/W of the memory, W writers in parallel), but
the directory is not an HF model: ``final/`` is a separate, gathered safetensors export.
DCP keeps its metadata as a pickle; it is read here with an unpickler that admits only
DCP's metadata classes and torch's size, dtype and layout, so a crafted file runs no code.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from lmobjectives.checkpoint.files import (CHECKSUMS, check_required, file_sums, first_bad_file,
                                           prune, read_checksums, step_dir_name, write_checksums)
from lmobjectives.errors import UserError
from lmobjectives.runtime import barrier, gather_objects
from lmobjectives.util import atomic_write_json, publish_dir

METADATA = ".metadata"
REQUIRED = (METADATA, "scheduler.pt", "rng.pt", "state.json")

_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib", "Path"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name) if self._allowed(module, name) else None
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return obj

    @staticmethod
    def _allowed(module: str, name: str) -> bool:
        if (module, name) in _SAFE_GLOBALS:
            return True
        if module == "torch":
            return isinstance(getattr(torch, name, None), torch.dtype)
        if module == "torch.distributed.checkpoint.metadata":
            import torch.distributed.checkpoint.metadata as meta

            return isinstance(getattr(meta, name, None), type)  # its dataclasses and enums
        return False


def _reader(path: Path):  # noqa: ANN202 - a dcp FileSystemReader
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):  # noqa: ANN202
            data = (Path(self.path) / METADATA).read_bytes()
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / METADATA).is_file()


def _my_files(root: Path) -> list[Path]:
    """This rank's share of the files to hash: every W-th of the sorted listing."""
    import torch.distributed as dist

    files = sorted(f for f in root.rglob("*") if f.is_file() and f.name != CHECKSUMS)
    if dist.is_available() and dist.is_initialized():
        return files[dist.get_rank()::dist.get_world_size()]
    return files


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns when it runs without a process group; for a one-process run that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler_state: dict[str, Any], state: dict[str, Any], rng: dict[str, torch.Tensor],
                 *, rank: int, keep: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    try:
        with _quiet_single_process():
            dcp.save(_state_dict(model, optimizer),
                     storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
        if rank == 0:
            torch.save(scheduler_state, tmp / "scheduler.pt")
            torch.save(rng, tmp / "rng.pt")
            atomic_write_json(tmp / "state.json", {**state, "checkpoint_format": "dcp"})
        barrier()
        sums: dict[str, str] = {}
        for part in gather_objects(file_sums(tmp, _my_files(tmp))):
            sums.update(part)
        if rank == 0:
            write_checksums(tmp, sums)
            publish_dir(tmp, final)
            prune(run_dir, keep)
    except OSError as exc:
        raise UserError(f"could not write checkpoint {final}: {exc.strerror or exc}; "
                        "the previous checkpoints are intact") from None
    barrier()
    return final


def verify_sharded(path: Path) -> None:
    """Every rank checks its share of the files (all of them in one process); any mismatch
    stops every rank with the file's name."""
    import torch.distributed as dist

    path = Path(path)
    try:
        sums = read_checksums(path)
        check_required(path, sums, REQUIRED)
        names = sorted(sums)
        if dist.is_available() and dist.is_initialized():
            names = names[dist.get_rank()::dist.get_world_size()]
        problem = first_bad_file(path, sums, names)
    except UserError as exc:
        problem = str(exc)
    found = [p for p in gather_objects(problem) if p]
    if found:
        raise UserError(found[0])


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """Collective: verify, then load weights (and optimizer) in place, resharding as needed;
    returns (state, scheduler, rng) like ``checkpoint.load_checkpoint``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise UserError(f"{path} is not a sharded (fsdp) checkpoint (no {METADATA})")
    verify_sharded(path)
    try:
        sd = _state_dict(model, optimizer)
        with _quiet_single_process():
            dcp.load(sd, storage_reader=_reader(path))
        if optimizer is None:
            set_model_state_dict(model, sd["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        scheduler = torch.load(path / "scheduler.pt", weights_only=True)
        rng = torch.load(path / "rng.pt", weights_only=True)
    except dist.DistError:
        raise  # another rank is gone: the failure handling names it
    except (Exception, CheckpointException) as exc:  # a refused pickle, a shape mismatch
        lines = str(exc).strip().splitlines() or [""]
        # DCP wraps each rank's error with its traceback (in a BaseException): the cause is last.
        reason = lines[-1] if isinstance(exc, CheckpointException) else f"{type(exc).__name__}: {lines[0]}"
        raise UserError(f"cannot load checkpoint {path}: {reason}") from None
    state = json.loads((path / "state.json").read_text())
    return state, scheduler, rng
