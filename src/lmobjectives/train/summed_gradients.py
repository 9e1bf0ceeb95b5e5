"""Data parallelism for a train module that runs its model's parts one by one.

Multi-token prediction's low-memory backward (``step/mtp.py``) calls the trunk and
each head separately and runs one backward per head. DDP only reduces gradients of a
backward that followed ``DDP.forward``, so wrapping such a model in DDP would leave every
rank with its own gradients (each rank would step on its half of the batch). Here the
gradients are instead summed over ranks explicitly, once per optimizer step, after the
step's last micro-batch — the same SUM rule as the DDP comm hook in ``train/distributed.py``
(each rank's loss is already divided by the global count of scored tokens).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from lmobjectives.step import TrainModule

BUCKET_ELEMENTS = 2**22  # 16 MB of fp32 per all-reduce: few calls, bounded extra memory


class SummedGradientsModule:
    """A ``TrainModule`` around ``inner`` whose gradients are all-reduced (SUM) after the last
    micro-batch of a step; ``no_sync`` marks the micro-batches before it."""

    def __init__(self, inner: "TrainModule") -> None:
        self.inner = inner
        self.model = inner.model
        self.terms = inner.terms
        self._syncing = True

    def counts(self, batch):  # noqa: ANN001, ANN201
        return self.inner.counts(batch)

    def begin_step(self, step: int, total_steps: int) -> None:
        begin = getattr(self.inner, "begin_step", None)
        if begin is not None:
            begin(step, total_steps)

    def forward_backward(self, batch, totals, backward: bool = True):  # noqa: ANN001, ANN201
        out = self.inner.forward_backward(batch, totals, backward)
        if backward and self._syncing:
            sum_gradients(self.model)
        return out

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self._syncing = False
        try:
            yield
        finally:
            self._syncing = True


def sum_gradients(model: torch.nn.Module) -> None:
    """All-reduce (SUM) every gradient of ``model``, a bucket of same-dtype tensors at a time.
    Every rank ran the same code, so the same parameters hold gradients in the same order."""
    for bucket in _buckets([p.grad for p in model.parameters() if p.grad is not None]):
        flat = torch.cat([g.reshape(-1) for g in bucket])  # (n,)
        dist.all_reduce(flat)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


def _buckets(grads: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or sum(t.numel() for t in bucket) >= BUCKET_ELEMENTS):
            yield bucket
            bucket = []
        bucket.append(g)
    if bucket:
        yield bucket
