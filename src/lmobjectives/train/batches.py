"""The micro-batches of an optimizer step; the next step's are prepared in a background thread
while this one computes.

A step's micro-batches are a pure function of where the loader stands. Local micro-batch
``c`` of rank ``r`` of ``W`` is global micro-batch ``g = c*W + r`` (``data/loader.py``): its
rows are ``Loader.batch(g)`` (no state), its objective randomness is ``(seed, g)``
(``batch_rng``); then come the converter, the id check (``check_batch``) and the copy to the
device. So a step prepared while the previous one computes is bit for bit the step the serial
path makes, because:

- The thread never moves the loader. It is given the counter ``c`` of the step it prepares;
  the counter advances only when the main thread *takes* a step. A checkpoint therefore
  saves the position after the last consumed step, and a step prepared but never taken (the
  run ended, was stopped, or died) changes nothing that is persisted: a resumed run makes it
  again from the same counter.
- A prepared step is used only by a take that asks for the same counter; any other (a resume
  or a reshard moved the loader) drops it and makes the step on the spot.
- One thread at a time reads the sources (their per-epoch cache is not thread-safe): a take
  first waits for the preparation in flight, and the training loader is read nowhere else.
- An error raised while preparing (``check_batch``'s ``UserError``, a bug) is kept and raised
  on the main thread by the take of that step: the same exception object, so the CLI prints
  the same ``error:`` line. An error in a step that is never taken is never raised, as
  serially.

The prepared step costs one step's batches of memory. ``data.prefetch: false`` makes every
step on the critical path instead (the same numbers).

When it pays. On CUDA the host only queues kernels while the GPU computes, so host work done
beside it is hidden: ``auto`` prepares in the background there. On CPU the cores compute, and
measured on 2 shared AMD EPYC cores (load 4-7) a step's preparation is < 1% of its time
(0.6-3 ms of 150-600 ms for 8-16 rows of 128 tokens; CLM, FIM, UL2): there is nothing to
hide, and the thread costs more than it saves. Beside one compute thread it made steps
0.84-0.86x as fast (``benchmarks/train_throughput.py --threads 1 --prefetch``: tiny,
d128-l4), beside two 1.2-2.7x slower (three busy threads on two cores, the GIL handed back
and forth). So ``auto`` keeps it off on CPU; asked for there (``true``), it leaves the
preparation a core: compute runs on at most the usable cores minus one (``compute_threads``),
which calibration (``train/calibrate.py``) then measures as the run will train.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lmobjectives.data.loader import Loader
from lmobjectives.objectives.base import Rows
from lmobjectives.runtime import HostToDevice
from lmobjectives.train.preflight import check_batch
from lmobjectives.train.setup import Run


def in_background(prefetch: str | bool, device: torch.device) -> bool:
    """Whether ``data.prefetch`` prepares steps in a background thread on ``device``."""
    return prefetch is True or (prefetch == "auto" and device.type == "cuda")


def compute_threads(threads: int, background: bool, device: torch.device) -> int:
    """Intra-op threads for compute: ``threads``, but on CPU with a preparation thread at
    most the usable cores minus one (at least one), so the two do not oversubscribe."""
    if not background or device.type != "cpu":
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(threads, cores - 1))


def batch_rng(seed: int, global_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, global_index])


def make_batch(run: Run, rows: Rows, global_index: int) -> dict[str, np.ndarray]:
    features = run.objective(rows, batch_rng(run.cfg.train.seed, global_index))
    return run.converter(features, run.specials)


@dataclass
class Micro:
    """One micro-batch: its features (host side: token counts are read there, never from
    the device), their tensors on the device, and the rows with each row's source."""

    batch: dict[str, np.ndarray]
    tensors: dict[str, torch.Tensor]
    copied: Any  # CUDA: the event after the tensors' copy (``HostToDevice.ready``); CPU: None
    rows: Rows
    src: np.ndarray


def make_step(run: Run, loader: Loader, copier: HostToDevice, embedding_rows: int | None,
              counter: int, n: int, step: int) -> list[Micro]:
    """The ``n`` micro-batches of local counters ``[counter, counter + n)``; ``step``
    (1-based) only names the step in an error."""
    micro = []
    for c in range(counter, counter + n):
        g = c * loader.world_size + loader.rank
        rows, src = loader.batch(g)
        batch = make_batch(run, rows, g)
        check_batch(batch, embedding_rows, step)
        tensors, copied = copier.copy(batch)
        micro.append(Micro(batch, tensors, copied, rows, src))
    return micro


class _Job:
    """One step prepared on a daemon thread (a stuck preparation never holds the process)."""

    def __init__(self, counter: int, work: Callable[[], list[Micro]]) -> None:
        self.counter = counter
        self._result: list[Micro] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True,
                                        name="lmobj-next-step")
        self._thread.start()

    def _run(self, work: Callable[[], list[Micro]]) -> None:
        try:
            self._result = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread by result()
            self._error = exc

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> list[Micro]:
        self.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert self._result is not None
        return self._result


class StepBatches:
    """Steps' micro-batches by loader counter; with ``background``, ``prepare`` starts making
    a step on a thread and the ``take`` that asks for it collects it."""

    def __init__(self, make: Callable[[int, int], list[Micro]], background: bool) -> None:
        self._make = make  # (counter, step) -> that step's micro-batches
        self.background = background
        self._job: _Job | None = None

    def take(self, counter: int, step: int) -> list[Micro]:
        """The micro-batches of the step at ``counter``: prepared, else made now."""
        job, self._job = self._job, None
        if job is not None:
            job.wait()  # also when it is dropped: one thread at a time reads the sources
            if job.counter == counter:
                return job.result()
        return self._make(counter, step)

    def prepare(self, counter: int, step: int) -> None:
        """Start making the step at ``counter`` in the background (nothing when not
        ``background``)."""
        if not self.background:
            return
        self.close()
        self._job = _Job(counter, lambda: self._make(counter, step))

    def close(self) -> None:
        """Wait for the preparation in flight and drop it (and any error it raised)."""
        job, self._job = self._job, None
        if job is not None:
            job.wait()
