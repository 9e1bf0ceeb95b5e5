"""The training loop. The trainer owns cadence (log, eval, checkpoint, guards); the step owns
data -> batches -> ``module.forward_backward`` -> optimizer. Neither knows which objective
runs: the objective is a function from rows to features, the converter a function from
features to batches.

One optimizer step: take all ``grad_accum`` micro-batches, count their scored tokens (and
all-reduce the count over ranks), then run forward/backward on each with the loss divided by
that global count — so accumulation and data parallelism give the update of one big batch.
Each micro-batch's objective randomness comes from ``(seed, global micro-batch index)``,
which is also what makes resume exact, and what lets the next step's micro-batches be
prepared in a background thread while this step computes (``train/batches.py``).
The host reads the device once per step (``_read_back``: what logging and the guards need
before the update); nothing in the micro-batch loop does.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from lmobjectives.checkpoint import (clean_leftovers, list_checkpoints, load,
                                     read_checkpoint_state, save_checkpoint, save_sharded)
from lmobjectives.errors import UserError
from lmobjectives.train.batches import Micro, StepBatches, in_background, make_step
from lmobjectives.train.budget import StepPlan
from lmobjectives.train.distributed import agree_on_checkpoint, barrier
from lmobjectives.train.preflight import preflight
from lmobjectives.train.guards import GuardState
from lmobjectives.train.resume_rules import check_progress, check_resumable
from lmobjectives.train.schedule import build_optimizer, lr_at
from lmobjectives.rundir import config_hash, truncate_metrics
from lmobjectives.runtime import HostToDevice
from lmobjectives.train.setup import Run


class Stop(Exception):
    """Raised inside the loop to end the run early, cleanly (a signal)."""


class Trainer:
    def __init__(self, run: Run, *, progress: bool = True) -> None:
        self.run = run
        self.cfg = run.cfg
        self.embedding_rows = preflight(run)  # vocab/data mismatches end here, before step 1
        self.optimizer = build_optimizer(run.model, self.cfg)
        self.loader = run.train_loader()
        self.copier = HostToDevice(run.device)
        self.batches = StepBatches(lambda counter, step: make_step(
            run, self.loader, self.copier, self.embedding_rows, counter, self.cfg.train.grad_accum,
            step), background=in_background(self.cfg.data.prefetch, run.device))
        self.step = 0
        self.tokens = 0
        self.tokens_by_source = {s.name: 0 for s in run.sources}
        self.guard = GuardState(recent=deque(maxlen=self.cfg.train.spike_window))
        self.progress = progress and run.rank == 0
        self.metrics_path = run.dir / "metrics.jsonl"
        self.stop_requested = False
        self._stop_agreed = False  # the stop flag as all ranks saw it in the last step
        self.reshard_note: str | None = None
        self.warmup = round(self.cfg.train.warmup_fraction * self.cfg.train.steps)
        self.on_log: Callable[[dict[str, Any]], None] | None = None  # e.g. experiment trackers
        # A timed run (``train.time``) plans its steps against a deadline (train/budget.py);
        # ``started_at`` is when its command started, the origin a resumed plan counts from.
        self.plan: StepPlan | None = None
        self.started_at = time.time()

    # ---------------------------------------------------------------- state
    @property
    def total_steps(self) -> int:
        return self.plan.total if self.plan is not None else self.cfg.train.steps

    def lr(self, step: int) -> float:
        t = self.cfg.train
        if self.plan is not None:
            return self.plan.lr(step, t.lr, t.min_lr_ratio)
        return lr_at(step, total=t.steps, peak=t.lr, warmup=self.warmup, schedule=t.schedule,
                     min_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict(),
                "tokens_by_source": self.tokens_by_source, "config_hash": config_hash(self.cfg),
                "store_fingerprints": {s.name: s.store.fingerprint for s in self.run.sources},
                "guard": {"bad_in_row": self.guard.bad_in_row, "recent": list(self.guard.recent)},
                "world_size": self.run.world_size,
                **({"plan": self.plan.state()} if self.plan is not None else {})}

    def save(self) -> Path | None:
        """Write a checkpoint: rank 0 alone for full weights (one process, DDP), every rank its
        shards for FSDP (``checkpoint/sharded.py``)."""
        rng = {"torch": torch.get_rng_state()}
        sched = {"step": self.step, "schedule": self.cfg.train.schedule,
                 "peak_lr": self.cfg.train.lr, "warmup": self.warmup}
        if self.run.sharded:
            return save_sharded(self.run.dir, self.step, self.run.model, self.optimizer, sched,
                                self.state(), rng, rank=self.run.rank, keep=self.cfg.train.keep_checkpoints)
        if self.run.rank != 0:
            return None
        return save_checkpoint(self.run.dir, self.step, self.run.model, self.optimizer, sched,
                               self.state(), rng, keep=self.cfg.train.keep_checkpoints)

    def resume(self, force: bool = False, allow_reshard: bool = False) -> Path | None:
        """Restore the newest complete checkpoint; returns its path (None: nothing to resume).
        A checkpoint written by another number of processes is refused unless
        ``allow_reshard``: then the loader continues at the same global position."""
        if self.run.rank == 0:
            clean_leftovers(self.run.dir)
        barrier()
        ckpts = list_checkpoints(self.run.dir)
        path = agree_on_checkpoint(ckpts[-1] if ckpts else None)
        if path is None:
            if self.run.rank == 0:
                self._truncate_metrics()  # killed before the first checkpoint: redo from step 0
            return None
        state = read_checkpoint_state(path)
        try:
            self._restore(state, path, force, allow_reshard)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"checkpoint {path} has a state.json or rng.pt this version cannot "
                            f"restore ({type(exc).__name__}: {exc})") from None
        if self.run.rank == 0:
            self._truncate_metrics()
        return path

    def _restore(self, state: dict[str, Any], path: Path, force: bool, allow_reshard: bool) -> None:
        loader_state, note = check_resumable(self.run, state, path, force, allow_reshard)
        if note is not None:
            self.reshard_note = note
        _state, _sched, rng = load(path, self.run.model, self.optimizer)
        step, tokens, by_source = state["step"], state["tokens"], state["tokens_by_source"]
        bad, recent = state["guard"]["bad_in_row"], state["guard"]["recent"]
        check_progress(state, loader_state)
        self.step, self.tokens = step, tokens
        # sources unchanged by a forced resume keep their counts; new ones start at 0
        self.tokens_by_source.update({k: v for k, v in by_source.items() if k in self.tokens_by_source})
        self.loader.load_state_dict(loader_state)
        self.guard.bad_in_row = bad
        self.guard.recent.extend(recent)
        torch.set_rng_state(rng["torch"])
        if state.get("plan") is not None and self.cfg.train.time is not None:
            self.plan = StepPlan.restore(state["plan"], self.started_at)

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
        truncate_metrics(self.metrics_path, self.step)

    # ---------------------------------------------------------------- logging
    def log(self, record: dict[str, Any]) -> None:
        if self.run.rank != 0:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.on_log is not None:
            self.on_log(record)

    # ---------------------------------------------------------------- the step
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.run.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        return t

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its train record."""
        micro = self._fetch()
        totals = self._count(micro)
        lr = self._begin(self.total_steps)
        sums = self._forward_backward(micro, totals)
        hook = self._update_hook()
        if hook is not None:
            hook.before_clip()  # pre-update hook: e.g. new embedding rows only
        host = self._read_back(sums, micro, self._clip(), totals)
        record = self._record(host, lr)
        if hook is not None:
            record["update"] = "new_rows_only"
        # why this update is skipped (non-finite, spike), or None
        skip = self.guard.verdict(record, self.cfg.train.spike_zscore, self.cfg.train.spike_action)
        if skip is None:
            self.optimizer.step()
            if hook is not None:
                hook.after_step()  # post-update hook
        else:
            record["skipped"] = skip
        self.optimizer.zero_grad(set_to_none=True)
        self._account(micro, host, record)
        return record

    def _fetch(self) -> list[Micro]:
        """This step's micro-batches (prepared while the last step computed, or made now);
        then the next step's are started in the background. The loader's counter moves past
        the micro-batches taken here only: a checkpoint saves what was consumed."""
        counter = self.loader.counter
        micro = self.batches.take(counter, self.step + 1)
        self.loader.counter = counter + len(micro)
        if self.step + 1 < self.total_steps:  # a timed run's re-plan may still drop it: harmless
            self.batches.prepare(self.loader.counter, self.step + 2)
        return micro

    def close(self) -> None:
        """Wait for (and drop) a step prepared in the background that no step will take."""
        self.batches.close()

    def _count(self, micro: list[Micro]) -> torch.Tensor:
        """Scored tokens per loss term in the whole step, over every rank."""
        counts = sum(self.run.model_with_loss.counts(m.batch) for m in micro)
        return self._all_reduce(torch.as_tensor(counts, dtype=torch.float64, device=self.run.device))

    def _begin(self, total_steps: int) -> float:
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        begin = getattr(self.run.model_with_loss, "begin_step", None)  # a scheduled loss weight
        if begin is not None:
            begin(self.step, total_steps)
        return lr

    def _forward_backward(self, micro: list[Micro], totals: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Gradients of sum(loss / global count) over the micro-batches; (nll, correct) sums
        and the tokens the first term's accuracy is over: what the module reports as
        ``predicted`` (a weighted loss predicts only its tokens of non-zero weight), else the
        scored tokens. Device tensors only: nothing here waits for the device."""
        with_loss = self.run.model_with_loss
        nll = torch.zeros(len(with_loss.terms), dtype=torch.float64, device=self.run.device)
        correct = torch.zeros_like(nll)
        predicted = torch.zeros(1, dtype=torch.float64, device=self.run.device)
        counts = totals.float()
        for i, m in enumerate(micro):
            self.copier.ready(m.tensors, m.copied)
            sync = getattr(with_loss, "no_sync", None)  # DDP: all-reduce on the last one only
            with sync() if sync is not None and i < len(micro) - 1 else contextlib.nullcontext():
                out = with_loss.forward_backward(m.tensors, counts)
            nll += out["nll"].double()
            correct += out["correct"].double()
            predicted += out["predicted"].double()[:1] if "predicted" in out else \
                float(with_loss.counts(m.batch)[0])
        return nll, correct, predicted

    def _read_back(self, sums: tuple[torch.Tensor, ...], micro: list[Micro], grad_norm: torch.Tensor,
                   totals: torch.Tensor) -> dict[str, Any]:
        """The step's one read of the device. One all-reduce carries the (nll, correct,
        predicted) sums, the per-source token counts and the stop flag, so that every rank
        logs the same numbers and stops at the same step; the gradient norm and the token
        counts (already reduced) come back in the same transfer."""
        run = self.run
        by_source = np.zeros(len(run.sources))
        for m in micro:
            np.add.at(by_source, np.asarray(m.src, dtype=np.int64),
                      (m.rows.tokens != run.specials.pad).sum(axis=1))
        stats = self._all_reduce(torch.cat([
            *sums, torch.as_tensor(by_source, dtype=torch.float64, device=run.device),
            torch.tensor([float(self.stop_requested)], dtype=torch.float64, device=run.device)]))
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every shard
            grad_norm = grad_norm.full_tensor()
        values = torch.cat([stats, grad_norm.detach().double().reshape(1), totals]).tolist()
        n, k = len(run.model_with_loss.terms), len(run.sources)
        stop = 2 * n + 1 + k  # after nll, correct (n each), predicted (1), tokens by source (k)
        self._stop_agreed = values[stop] > 0
        return {"nll": values[:n], "correct": values[n:2 * n], "predicted": values[2 * n],
                "by_source": values[2 * n + 1:stop], "grad_norm": values[stop + 1],
                "totals": values[stop + 2:]}

    def _update_hook(self) -> Any:
        """The run's update filter when it acts on this step (None otherwise)."""
        f = self.run.update_filter
        return f if f is not None and f.active(self.step) else None

    def _clip(self) -> torch.Tensor:
        """Clip the gradients; their norm, on the device (read back with the other stats)."""
        clip = self.cfg.train.grad_clip
        return torch.nn.utils.clip_grad_norm_(self.run.model.parameters(),
                                              clip if clip > 0 else float("inf"))

    def _record(self, host: dict[str, Any], lr: float) -> dict[str, Any]:
        terms, totals = self.run.model_with_loss.terms, host["totals"]
        per_term = [v / max(t, 1.0) for v, t in zip(host["nll"], totals)]
        record: dict[str, Any] = {"step": self.step + 1, "loss": per_term[0], "lr": lr,
                                  "grad_norm": host["grad_norm"]}
        if len(per_term) > 1:
            # The first term is already "loss" / "accuracy".
            record.update({f"{name}": v for name, v in zip(terms[1:], per_term[1:])})
            record.update({f"{name}_acc": c / max(n, 1) for name, c, n in
                           zip(terms[1:], host["correct"][1:], totals[1:])})
        record["accuracy"] = host["correct"][0] / max(host["predicted"], 1)
        return record

    def _account(self, micro: list[Micro], host: dict[str, Any], record: dict[str, Any]) -> None:
        """Advance step and token counts; end the run after too many bad steps in a row."""
        run = self.run
        for i, source in enumerate(run.sources):
            self.tokens_by_source[source.name] += int(host["by_source"][i])
        self.tokens += sum(m.rows.tokens.size for m in micro) * run.world_size
        self.step += 1
        record.update({"tokens": self.tokens, "targets": int(host["totals"][0])})
        if len(run.sources) > 1:
            record["tokens_by_source"] = dict(self.tokens_by_source)
        if self.guard.bad_in_row >= self.cfg.train.max_bad_steps:
            self.log(record)
            raise UserError(f"stopped: non-finite loss or gradient {self.guard.bad_in_row} steps in a "
                            f"row (last at step {self.step}); lower --lr or check the data")

    # ---------------------------------------------------------------- the loop
    def _handle_signal(self, signum, frame) -> None:  # noqa: ANN001
        self.stop_requested = True

    def fit(self, evaluate=None, on_eval=None) -> dict[str, Any]:  # noqa: ANN001
        """Train to ``cfg.train.steps`` (a timed run: to its plan's re-planned total).
        ``evaluate()`` -> dict of eval metrics."""
        t = self.cfg.train
        bar = self._bar()
        last: dict[str, Any] = {}
        try:
            while self.step < self.total_steps:
                start, tokens_before = time.perf_counter(), self.tokens
                record = self.train_step()
                dt = time.perf_counter() - start
                record["tokens_per_second"] = (self.tokens - tokens_before) / max(dt, 1e-9)
                record["step_seconds"] = dt
                if self.plan is not None:
                    self._replan(bar)
                if self.step % t.log_every == 0 or self.step == self.total_steps or "skipped" in record:
                    self.log(record)
                last = record
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}",
                                    tok_s=f"{record['tokens_per_second']:.0f}")
                aside = self._periodic(evaluate, on_eval)
                if self.plan is not None:  # the whole iteration counts: logging, bar, re-planning
                    self.plan.end_iteration(aside)
                if self._stop_now():
                    if t.checkpoint_every == 0 or self.step % t.checkpoint_every:
                        self.save()
                    raise Stop()
        finally:
            self.close()  # a step prepared for a step that will not run
            if bar is not None:
                bar.close()
        return last

    def _periodic(self, evaluate, on_eval) -> float:  # noqa: ANN001
        """Evaluation and checkpoint when their cadence says so; returns the seconds spent
        (a timed run's plan measures both)."""
        t, plan = self.cfg.train, self.plan
        began = time.perf_counter()
        if evaluate is not None and t.eval_every and self.step % t.eval_every == 0 \
                and self.step < self.total_steps \
                and (plan is None or plan.worth_evaluating(self.step, t.eval_every)):
            self.log({"step": self.step, "tokens": self.tokens, "eval": True, **evaluate()})
            if on_eval:
                on_eval()
            if plan is not None:
                plan.observe_eval(time.perf_counter() - began)
        saving = time.perf_counter()
        if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == self.total_steps:
            self.save()
            if plan is not None:
                plan.observe_save(time.perf_counter() - saving)
        return time.perf_counter() - began

    def _replan(self, bar) -> None:  # noqa: ANN001 - a tqdm bar or None
        total = self.plan.replan_agreed(self.step, self.cfg.train, self.run.world_size)
        if bar is not None and bar.total != total:
            bar.total = total
            bar.refresh()

    def _stop_now(self) -> bool:
        """Several processes stop at the same step: the flag all-reduced in that step decides."""
        return self._stop_agreed if self.run.world_size > 1 else self.stop_requested

    @contextlib.contextmanager
    def stop_on_sigterm(self) -> Iterator[None]:
        """The one SIGTERM handler: inside, a SIGTERM only sets the stop flag (``fit`` saves
        at the next step boundary, the final export is never cut half-way)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = signal.signal(signal.SIGTERM, self._handle_signal)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, old)

    def _bar(self):  # noqa: ANN202
        if not self.progress:
            return None
        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
