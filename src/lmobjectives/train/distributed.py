"""Several processes, one model: process group, DDP / FSDP2 wrapping, failures.

``torchrun`` starts one process per device and gives each its ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_world` joins them in a process group (``nccl`` on CUDA, ``gloo``
on CPU). The data side needs nothing more: the loader serves rank ``r`` of ``W`` the global
micro-batches ``g = c*W + r`` (``data/loader.py``), and the trainer all-reduces the number of
scored tokens before any backward, so every rank divides its loss sum by the *global* count.

Gradients must then be **summed** over ranks, not averaged as DDP and FSDP do by default:
each rank's gradient is already its share of the global mean. Worked example, 2 ranks; rank 0
scores 3 tokens with an nll sum of 6.0, rank 1 scores one token with an nll sum of 2.0::

    global count              = 3 + 1 = 4             (all-reduced before backward)
    rank 0 loss               = 6.0 / 4 = 1.5
    rank 1 loss               = 2.0 / 4 = 0.5
    sum over ranks            = 2.0 = (6.0 + 2.0) / 4  (one process, both micro-batches)
    DDP's default, the mean   = 1.0                    (half the single-process update)

So DDP gets a comm hook that all-reduces with SUM, and FSDP2 a gradient divide factor of 1
with sum-only collectives (gloo has no pre-multiplied sum). ``W`` processes with ``A``
accumulation steps then make the update of one process with ``A*W`` accumulation steps, up to
the order of float additions.

Trade-offs: DDP keeps whole weights and optimizer state on every rank (simple; its checkpoint
is the single-process one, written by rank 0), and skips gradient sync on the micro-batches
before the last of a step. FSDP2 shards weights, gradients and optimizer state (memory per
rank falls as 1/W) for an all-gather per block in forward and backward, a reduce-scatter per
micro-batch (gradients stay sharded), and sharded DCP checkpoints (``checkpoint/sharded.py``).
Under FSDP the model is built on the meta device and each block is initialised and sharded in
turn (``shard_model``), so no rank ever holds the whole model.

Failures: a rank that fails posts ``rank R: message`` in the rendezvous store and in the
error file torchrun reads, then exits; the other ranks' next collective fails, they find the
posted message and end with it, and torchrun names the failing rank as the root cause.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmobjectives.errors import UserError
from lmobjectives.runtime import barrier, broadcast_object, gather_objects

if TYPE_CHECKING:
    from lmobjectives.step import TrainModule
    from lmobjectives.train.setup import Run

FAILURE_KEY = "lmobj/failure"
COLLECTIVE_TIMEOUT_MINUTES = 30


# ------------------------------------------------------------------------------ the group
@dataclass
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process created the process group, so it destroys it
    store: Any = None  # the rendezvous key-value store, where failures are posted

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _restart_store(timeout: timedelta):  # noqa: ANN202 - dist.Store | None
    """The store of a group restarted by ``torchrun --max-restarts``, under a prefix of its own.
    The agent keeps one store across restarts, so a restarted group would otherwise find the
    addresses its dead predecessors published there and connect to closed ports (gloo fails
    its connection mesh now and then)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"lmobj/attempt{restart}", base)


def init_world() -> World:
    """Join the process group that ``torchrun``'s environment describes (reusing one the caller
    already made); one process without that environment is a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return World()
    if "RANK" not in os.environ and not dist.is_initialized():
        raise UserError(f"WORLD_SIZE is {world_size} but RANK is not set: start several processes "
                        "with torchrun (or `lmobj train --nproc N` on one machine)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        # Ranks wait at the next collective while rank 0 writes a full (DDP) checkpoint or the
        # final export: allow that much longer than NCCL's 10-minute default.
        timeout = timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES)
        store = _restart_store(timeout)
        where = {} if store is None else {"store": store, "rank": int(os.environ["RANK"]),
                                          "world_size": world_size}
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout, **where)
        else:
            dist.init_process_group("gloo", timeout=timeout, **where)
        owns = True
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
    except (ImportError, RuntimeError, ValueError):
        store = None  # failures are then reported by each rank alone
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                 owns_group=owns, store=store)


def agree_on_checkpoint(path: Path | None) -> Path | None:
    """Rank 0's choice of checkpoint, checked to be visible on every rank."""
    path = broadcast_object(path)
    seen = gather_objects(path is None or path.is_dir())
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise UserError(f"rank {blind[0]} does not see checkpoint {path} that rank 0 found: put the "
                        "run directory on a filesystem that every machine shares")
    return path


def open_in_turn(open_fn, world: World):  # noqa: ANN001, ANN201 - () -> Run
    """Call ``open_fn`` on rank 0 first, then on the first rank of each other machine, then on
    the rest: the first opener of a run directory prepares its tokenizer and token store, the
    others find them ready (or, on a machine without the shared filesystem, make their own)."""
    run = None
    for turn in (world.rank == 0, world.rank != 0 and world.local_rank == 0, world.local_rank != 0):
        if turn:
            run = open_fn()
        barrier()
    return run


# ------------------------------------------------------------------------------ wrapping
def parallelize(run: "Run", world: World) -> None:
    """Prepare ``run``'s model for its strategy, in place; build the optimizer after this."""
    if run.cfg.model.activation_checkpointing:
        enable_activation_checkpointing(run.model)
    if not world.distributed:
        return
    if run.cfg.distributed.strategy == "fsdp":
        # A train module that calls its model's parts gathers the root's parameters itself
        # (``step/mtp.py``); the blocks' own FSDP hooks do the rest.
        shard_model(run.model, bf16=run.bf16, seed=run.cfg.train.seed)
    elif getattr(run.model_with_loss, "calls_model_parts", False):
        from lmobjectives.train.summed_gradients import SummedGradientsModule

        run.model_with_loss = SummedGradientsModule(run.model_with_loss)
    else:
        run.model_with_loss = DataParallelModule(run.model_with_loss, run.device)


def eval_share(run: "Run") -> tuple[tuple[int, int], Callable[[np.ndarray], np.ndarray]]:
    """(share, reduce) for ``evaluate.metrics``: under DDP each rank scores every world-th
    evaluation batch and the sums are all-reduced, so evaluation costs 1/world of a pass per
    rank and gives the numbers of one process. Under FSDP every forward is a collective that
    all ranks must join, so each rank scores every batch."""
    if run.world_size == 1 or run.cfg.distributed.strategy != "ddp":
        return (0, 1), lambda sums: sums

    def reduce(sums: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(sums, dtype=torch.float64, device=run.device)
        dist.all_reduce(t)
        return t.cpu().numpy()

    return (run.rank, run.world_size), reduce


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations during backward: memory per block falls from all its
    activations to its input, for about one more forward pass of compute."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support activation checkpointing; "
                        "set model.activation_checkpointing=false")
    kwargs = {"use_reentrant": False}  # the form that works under DDP and FSDP
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _sum_allreduce(group, bucket):  # noqa: ANN001, ANN202 - DDP comm hook
    """SUM instead of DDP's mean: each rank's loss is already divided by the global count."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class DataParallelModule:
    """A ``TrainModule`` whose forward runs through DDP, so that backward all-reduces the
    gradients; ``no_sync`` lets the micro-batches before a step's last one skip that."""

    def __init__(self, inner: "TrainModule", device: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are computed identically on every rank; syncing them at every
        # forward would also make evaluation a collective.
        params = inspect.signature(DistributedDataParallel).parameters
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                          else {"broadcast_buffers": False})  # the name before torch 2.13
        self.ddp = DistributedDataParallel(
            inner.model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
        self.ddp.register_comm_hook(None, _sum_allreduce)
        inner.model = self.ddp
        self.inner = inner
        self.model = self.ddp
        self.terms = inner.terms

    def counts(self, batch):  # noqa: ANN001, ANN201
        return self.inner.counts(batch)

    def forward_backward(self, batch, totals, backward: bool = True):  # noqa: ANN001, ANN201
        return self.inner.forward_backward(batch, totals, backward)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync()


def shard_model(model: nn.Module, bf16: bool, seed: int = 0) -> None:
    """FSDP2: one unit per block, then the root. Parameters are computed in bf16 when the run
    uses bf16, gradients are reduced in fp32; blocks reshard after forward (least memory).

    A model built on the meta device (``models.presets.build_model(meta=True)``) is
    materialised here one unit at a time (``models.init.materialise``): a block is given its
    initial values on the CPU, in full, from ``seed`` and its modules' names, and sharded at
    once, so a rank holds at most one unit in full (the largest block, or the root's
    embeddings, final norm and rotary tables) plus its 1/W share of the units before it —
    never the whole model — and the gathered weights equal a one-process build of the same
    seed. A model that already holds its weights (``--init-from``) is only sharded."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from lmobjectives.models.init import materialise

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32,
                                  reduce_dtype=torch.float32)
    # On the CPU whatever the device: its generator gives the values a one-process build gets.
    materialise(model, seed, torch.device("cpu"), after_unit=lambda unit: fully_shard(unit, mp_policy=policy))
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # a sum, see the module docstring
            m.set_force_sum_reduction_for_comms(True)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _plain_class(module: nn.Module) -> type:
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) model of ``model``'s own class holding the full ``state``."""
    from lmobjectives.models.mtp import MTPModel

    with torch.device("meta"):
        if isinstance(model, MTPModel):
            plain = MTPModel(_plain_class(model.lm)(copy.deepcopy(model.config)), model.spec)
        else:
            plain = _plain_class(model)(copy.deepcopy(model.config))
    plain.load_state_dict(state, assign=True)
    lm = plain.lm if isinstance(plain, MTPModel) else plain
    if hasattr(lm, "tie_weights"):
        lm.tie_weights()
    return plain


def export_final(run: "Run", out: Path) -> None:
    """``final/``: the HF export, written by rank 0; FSDP gathers the full weights first."""
    from lmobjectives.export import export_model

    if is_sharded(run.model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True,
                                                                        cpu_offload=True))
        if run.rank == 0:
            export_model(unsharded_copy(run.model, full), run.tokenizer, out)
    elif run.rank == 0:
        export_model(run.model, run.tokenizer, out)
    barrier()


def reshard_loader_state(state: dict[str, int], old_world: int, new_world: int) -> tuple[dict[str, int], str]:
    """Loader position for a new world size. ``W`` ranks at local counter ``c`` have served
    global micro-batches ``[0, c*W)``; ``W'`` ranks continue at the first counter ``c'`` with
    ``c'*W' >= c*W``, so none is served twice and fewer than ``W'`` are skipped."""
    consumed = int(state["counter"]) * old_world
    counter = -(-consumed // new_world)
    skipped = counter * new_world - consumed
    note = (f"resharded from {old_world} to {new_world} processes at global micro-batch {consumed}"
            + (f" ({skipped} micro-batch(es) skipped so every rank starts aligned)" if skipped else ""))
    return {**state, "counter": counter, "world_size": new_world}, note


# ------------------------------------------------------------------------------ failures
class RankFailed(UserError):
    """This rank stopped because another rank failed; the message is that rank's."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _post_failure(world: World, message: str) -> dict[str, Any]:
    """Post this rank's failure unless one was posted first; return the first one."""
    # One second early: torchrun names the earliest failure (in whole seconds) the root cause,
    # and must not name a rank that merely stopped because of this one.
    mine = {"rank": world.rank, "message": message, "time": int(time.time()) - 1}
    if world.store is None:
        return mine
    key = f"{FAILURE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        return json.loads(world.store.compare_set(key, "", json.dumps(mine)))
    except Exception:  # noqa: BLE001 - the store may have gone with the failing rank
        return mine


def _write_error_file(message: str, timestamp: int) -> None:
    """The file torchrun reads to report a worker's failure (its own JSON format)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(
            {"message": {"message": message, "extraInfo": {"timestamp": str(timestamp)}}}))


@contextlib.contextmanager
def failures_end_every_rank(world: World) -> Iterator[None]:
    """A failure on one rank ends every rank, each with the failing rank's message."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        if not world.distributed:
            raise
        first = _post_failure(world, _describe(exc))
        if first["rank"] != world.rank and not isinstance(exc, UserError):
            # Our own error is the broken collective that the other rank's exit caused.
            msg = f"rank {world.rank} stopped because rank {first['rank']} failed: {first['message']}"
            _write_error_file(msg, first["time"] + 1)
            raise RankFailed(msg) from None
        msg = f"rank {world.rank}: {_describe(exc)}"
        _write_error_file(msg, first["time"] if first["rank"] == world.rank else int(time.time()))
        if isinstance(exc, UserError):
            raise type(exc)(msg) from None
        raise
