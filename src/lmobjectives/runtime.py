"""Where and how tensors run: device choice, bf16 detection, numpy batches to tensors.

Below both training and evaluation, so that evaluating a run never imports the train loop.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lmobjectives.errors import UserError


def select_device() -> torch.device:
    """The GPU of this process (``LOCAL_RANK`` under torchrun) when there is one, else CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where the hardware computes it fast; fp32 elsewhere (bf16 emulated on a
    CPU without AVX512-BF16/AMX runs ~100× slower than fp32)."""
    if precision == "fp32":
        return False
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision == "bf16" and not supported:
        raise UserError(f"precision bf16 asked for, but this {device.type} has no fast bf16; "
                        "use --set model.precision=auto")
    return supported


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


class HostToDevice:
    """Numpy batches to tensors on ``device``, callable from any thread.

    On CPU the tensors share the arrays' memory (no copy). On CUDA each array is pinned and
    copied with ``non_blocking=True`` on a side stream, so a copy issued from a background
    thread neither blocks that thread nor waits behind the compute stream's kernels; an event
    recorded after the copies is what the compute stream waits on (``ready``) before using
    them — the pattern of NVIDIA Apex's ``data_prefetcher``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], Any]:
        """The tensors of ``batch`` and the event that marks their copy (None on CPU)."""
        host = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        if self.stream is None:
            return {k: t.to(self.device) for k, t in host.items()}, None
        with torch.cuda.stream(self.stream):
            out = {k: t.pin_memory().to(self.device, non_blocking=True) for k, t in host.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def ready(self, tensors: dict[str, torch.Tensor], event: Any) -> None:
        """Make the current (compute) stream wait for the copy of ``tensors``; a GPU-side
        wait, the host goes on. ``record_stream`` keeps the caching allocator from handing
        their memory to another tensor while the compute stream may still read them."""
        if event is None:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors.values():
            t.record_stream(current)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ------------------------------------------------------------------ collectives
# No-ops in a single process, so library code calls them without asking how many there are.
def multi_process() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if multi_process():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not multi_process():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not multi_process():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
