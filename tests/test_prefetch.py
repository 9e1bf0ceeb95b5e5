"""The next step's micro-batches prepared in a background thread (``data.prefetch``,
``train/batches.py``): the same losses and weights as the serial path, bit for bit; a
checkpoint holds the consumed loader position, so a stop with a step prepared resumes
exactly; an error raised while preparing reaches the user as the same ``error:`` line; the
micro-batch loop reads nothing back from the device."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

import runs_util as ru
from conftest import tiny_tree
from lmobjectives.config import build_config
from lmobjectives.errors import UserError
from lmobjectives.train import loop
from lmobjectives.train.batches import StepBatches, compute_threads, in_background
from lmobjectives.train.job import train

QUIET = {"progress": False, "say": lambda m: None}


def tree(store: str, out: Path, prefetch: bool, objective: str = "clm") -> dict:
    t = tiny_tree(store, str(out), grad_accum=2)
    t["objective"] = objective
    t["data"]["prefetch"] = prefetch
    return t


@pytest.fixture(scope="module")
def reference(small_store, tmp_path_factory) -> Path:
    """An uninterrupted run with prefetch on."""
    out = tmp_path_factory.mktemp("prefetch") / "ref"
    train(build_config(tree(small_store, out, True)), **QUIET)
    return out


@pytest.mark.parametrize("objective", ["clm", "ul2"])
def test_prefetch_on_and_off_train_the_same(objective, small_store, reference, tmp_path):
    on = reference
    if objective != "clm":
        on = tmp_path / "on"
        train(build_config(tree(small_store, on, True, objective)), **QUIET)
    off = tmp_path / "off"
    train(build_config(tree(small_store, off, False, objective)), **QUIET)
    assert ru.metrics(on) == ru.metrics(off) and len(ru.metrics(off)) == 6
    assert ru.same_weights(ru.final_weights(on), ru.final_weights(off))


def test_a_stop_with_a_step_prepared_resumes_bit_exact(small_store, reference, tmp_path, monkeypatch):
    """SIGTERM after step 4: step 5 is being prepared when the checkpoint is written; the
    checkpoint holds the loader after 4 steps x 2 micro-batches, and the resume redoes 5-6."""
    real = loop.Trainer.train_step
    prepared = []

    def stepped(self: loop.Trainer) -> dict:
        record = real(self)
        if self.step == 4:
            prepared.append(self.batches._job is not None and self.batches._job.counter)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the stop flag
        return record

    monkeypatch.setattr(loop.Trainer, "train_step", stepped)
    out = tmp_path / "cut"
    assert train(build_config(tree(small_store, out, True)), **QUIET).stopped
    assert prepared == [8]  # step 5's micro-batches: local counters 8 and 9
    state = json.loads((out / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["loader"]["counter"] == 8
    monkeypatch.undo()
    again = train(build_config(tree(small_store, out, True)), resume=out, **QUIET)
    assert again.started == "resumed from step-0000004"
    assert ru.metrics(out) == ru.metrics(reference)
    assert ru.same_weights(ru.final_weights(out), ru.final_weights(reference))
    for run in (out, reference):  # the end: no step prepared past the last one is counted
        last = json.loads((run / "checkpoints" / "step-0000006" / "state.json").read_text())
        assert last["loader"]["counter"] == 12


def test_an_error_while_preparing_is_the_users_error_line(small_store, tmp_path):
    """The id check of step 3 fails in the background thread: exit 2, the check's own
    ``error:`` line, no traceback, and the run's checkpoint of step 2 is kept."""
    where = tmp_path / "where"

    def hook() -> None:
        import lmobjectives.train.batches as batches

        real = batches.check_batch

        def check(batch, rows, step):  # noqa: ANN001,ANN202
            if step == 3:
                where.write_text(threading.current_thread().name)
                return real(batch, 1, step)  # a table of one row: every id is outside it
            return real(batch, rows, step)

        batches.check_batch = check

    out, log = tmp_path / "run", tmp_path / "log"
    args = ru.tiny_args(Path(small_store), out, 6, "--set", "data.prefetch=true", every=2)
    p = ru.start_child(args, log, hook)
    p.join(180)
    said = log.read_text()
    assert p.exitcode == 2, said[-3000:]
    assert where.read_text() == "lmobj-next-step"  # raised in the background thread
    assert "error: step 3: the batch's input_ids holds token id" in said and "Traceback" not in said
    assert (out / "checkpoints" / "step-0000002" / "state.json").is_file()


def test_a_prepared_step_is_taken_only_by_its_counter():
    made: list[tuple[int, int]] = []

    def make(counter: int, step: int) -> list:
        made.append((counter, step))
        if step == 99:
            raise UserError("step 99: bad")
        return [counter]

    batches = StepBatches(make, background=True)
    batches.prepare(4, 3)
    assert batches.take(4, 3) == [4] and made == [(4, 3)]  # prepared, not made again
    batches.prepare(6, 4)
    assert batches.take(0, 1) == [0]  # the loader moved (a resume): made on the spot
    batches.prepare(8, 99)
    assert batches.take(2, 2) == [2]  # an error in a step never taken is never raised
    batches.prepare(8, 99)
    with pytest.raises(UserError, match="step 99: bad"):
        batches.take(8, 99)
    batches.prepare(9, 5)
    batches.close()
    assert batches.take(9, 5) == [9] and made[-1] == (9, 5) and made.count((9, 5)) == 2


def test_prefetch_runs_where_it_pays_and_leaves_it_a_core():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not in_background("auto", cpu) and in_background("auto", gpu)
    assert in_background(True, cpu) and not in_background(False, gpu)
    cores = len(os.sched_getaffinity(0))
    assert compute_threads(cores, True, cpu) == max(1, cores - 1)
    assert compute_threads(cores, False, cpu) == cores == compute_threads(cores, True, gpu)
    assert compute_threads(1, True, cpu) == 1


def test_the_loop_reads_the_device_once_a_step(small_store, tmp_path, monkeypatch):
    """No ``.item()``, ``.tolist()``, ``float()``, ``int()`` or ``bool()`` of a tensor by the
    loop (``train/``) while the micro-batches run forward and backward (on a GPU each would
    wait for the device); the step reads once, in ``_read_back``. (Reads inside the loss or
    the model are theirs: ``loss.token_nll_sum``'s ``int(keep.sum())`` and transformers'
    packed-sequence check read once per micro-batch today.)"""
    import traceback

    from lmobjectives.train.setup import open_run

    t = tiny_tree(small_store, str(tmp_path / "r"), grad_accum=3)
    trainer = loop.Trainer(open_run(build_config(t), tmp_path / "r", progress=False), progress=False)
    train_dir = str(Path(loop.__file__).parent)
    reads: list[str] = []
    where: dict[str, str | None] = {"in": None}
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):  # noqa: ANN001,ANN002,ANN003,ANN202
            caller = traceback.extract_stack(limit=2)[0]
            if where["in"] is not None and caller.filename.startswith(train_dir):
                reads.append(f"{where['in']}: {_name} at {Path(caller.filename).name}:{caller.lineno}")
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for method in ("_forward_backward", "_read_back"):
        real_method = getattr(loop.Trainer, method)

        def traced(self, *a, _real=real_method, _name=method):  # noqa: ANN001,ANN002,ANN202
            where["in"] = _name
            try:
                return _real(self, *a)
            finally:
                where["in"] = None

        monkeypatch.setattr(loop.Trainer, method, traced)
    trainer.train_step()
    assert [r.split(" at ")[0] for r in reads] == ["_read_back: tolist"], reads
