"""The training loop. The trainer owns cadence (log, eval, checkpoint, guards); the step owns
data -> batches -> ``module.forward_backward`` -> optimizer. Neither knows which objective
runs: the objective is a function from rows to features, the converter a function from
features to batches.

One optimizer step: fetch all ``grad_accum`` micro-batches, count their scored tokens (and
all-reduce the count over ranks), then run forward/backward on each with the loss divided by
that global count — so accumulation and data parallelism give the update of one big batch.
Each micro-batch's objective randomness comes from ``(seed, global micro-batch index)``,
which is also what makes resume exact.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lmobjectives.checkpoint import (clean_leftovers, is_sharded_checkpoint, list_checkpoints, load,
                                     read_checkpoint_state, save_checkpoint, save_sharded)
from lmobjectives.errors import UserError
from lmobjectives.train.distributed import agree_on_checkpoint, barrier, reshard_loader_state
from lmobjectives.train.preflight import check_batch, preflight
from lmobjectives.train.guards import GuardState
from lmobjectives.train.schedule import build_optimizer, lr_at
from lmobjectives.rundir import config_hash, parse_metric_lines
from lmobjectives.runtime import to_torch
from lmobjectives.train.setup import Run


def batch_rng(seed: int, global_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, global_index])


def make_batch(run: Run, rows, global_index: int) -> dict[str, np.ndarray]:
    features = run.objective(rows, batch_rng(run.cfg.train.seed, global_index))
    return run.converter(features, run.specials)


class Stop(Exception):
    """Raised inside the loop to end the run early, cleanly (a signal)."""


class Trainer:
    def __init__(self, run: Run, *, progress: bool = True) -> None:
        self.run = run
        self.cfg = run.cfg
        self.embedding_rows = preflight(run)  # vocab/data mismatches end here, before step 1
        self.optimizer = build_optimizer(run.model, self.cfg)
        self.loader = run.train_loader()
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

    # ---------------------------------------------------------------- state
    def lr(self, step: int) -> float:
        t = self.cfg.train
        return lr_at(step, total=t.steps, peak=t.lr, warmup=self.warmup, schedule=t.schedule,
                     min_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction)

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "loader": self.loader.state_dict(),
                "tokens_by_source": self.tokens_by_source, "config_hash": config_hash(self.cfg),
                "store_fingerprints": {s.name: s.store.fingerprint for s in self.run.sources},
                "guard": {"bad_in_row": self.guard.bad_in_row, "recent": list(self.guard.recent)},
                "world_size": self.run.world_size}

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
        if not force:
            if state["config_hash"] != config_hash(self.cfg):
                raise UserError(f"the config of {self.run.dir} changed since {path.name} was written; "
                                "resume with the same config, or pass --force")
            if state["store_fingerprints"] != {s.name: s.store.fingerprint for s in self.run.sources}:
                raise UserError(f"the data of {self.run.dir} changed since {path.name} was written "
                                "(store fingerprint differs); pass --force to continue anyway")
        loader_state = state["loader"]
        saved_world = state.get("world_size", 1)
        if saved_world != self.run.world_size:
            if not allow_reshard:
                raise UserError(
                    f"{path.name} was written by {saved_world} process(es), this run has "
                    f"{self.run.world_size}; resume with {saved_world}, or pass --allow-reshard to "
                    f"continue on {self.run.world_size} (the global batch becomes "
                    f"{self.cfg.train.batch_size * self.cfg.train.grad_accum * self.run.world_size} rows)")
            loader_state, self.reshard_note = reshard_loader_state(loader_state, saved_world,
                                                                   self.run.world_size)
        if is_sharded_checkpoint(path) != self.run.sharded:
            kinds = ("full (ddp or one process)", "sharded (fsdp)")
            raise UserError(f"{path.name} is a {kinds[is_sharded_checkpoint(path)]} checkpoint but this "
                            f"run's strategy is {self.cfg.distributed.strategy}; resume with the "
                            "strategy that wrote it")
        _state, _sched, rng = load(path, self.run.model, self.optimizer)
        step, tokens, by_source = state["step"], state["tokens"], state["tokens_by_source"]
        counter, guard = loader_state["counter"], state["guard"]
        bad, recent = guard["bad_in_row"], guard["recent"]
        count = lambda v: type(v) is int and v >= 0  # noqa: E731 - bool is not a count
        if not (all(count(v) for v in (step, tokens, counter, bad)) and isinstance(by_source, dict)
                and all(count(v) for v in by_source.values()) and isinstance(recent, list)
                and all(type(x) in (int, float) for x in recent)):
            raise ValueError("step, tokens, loader or guard fields of the wrong type")
        self.step, self.tokens = step, tokens
        # sources unchanged by a forced resume keep their counts; new ones start at 0
        self.tokens_by_source.update({k: v for k, v in by_source.items() if k in self.tokens_by_source})
        self.loader.load_state_dict(loader_state)
        self.guard.bad_in_row = bad
        self.guard.recent.extend(recent)
        torch.set_rng_state(rng["torch"])

    def _truncate_metrics(self) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
        if not self.metrics_path.is_file():
            return
        text = self.metrics_path.read_bytes().decode("utf-8", "replace")
        keep = [line for line, rec in parse_metric_lines(text)
                if isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= self.step]
        from lmobjectives.util import atomic_write_bytes

        atomic_write_bytes(self.metrics_path, ("\n".join(keep) + "\n" if keep else "").encode())

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
        lr = self._begin(self.run.cfg.train.steps)
        nll, correct = self._forward_backward(micro, totals)
        nll, correct, real_by_source = self._reduce_stats(nll, correct, micro)
        hook = self._update_hook()
        if hook is not None:
            hook.before_clip()  # pre-update hook: e.g. new embedding rows only
        grad_norm = self._clip()
        record = self._record(nll, correct, totals, lr, grad_norm)
        if hook is not None:
            record["update"] = "new_rows_only"
        skip = self._guard(record)
        if skip is None:
            self.optimizer.step()
            if hook is not None:
                hook.after_step()  # post-update hook
        else:
            record["skipped"] = skip
        self.optimizer.zero_grad(set_to_none=True)
        self._account(micro, real_by_source, totals, record)
        return record

    def _fetch(self) -> list[tuple[dict[str, np.ndarray], Any, Any]]:
        """The step's micro-batches: (batch, rows, source index per row)."""
        micro = []
        for _ in range(self.cfg.train.grad_accum):
            g = self.loader.counter * self.loader.world_size + self.loader.rank
            rows, src = next(self.loader)
            batch = make_batch(self.run, rows, g)
            check_batch(batch, self.embedding_rows, self.step + 1)
            micro.append((batch, rows, src))
        return micro

    def _count(self, micro: list) -> torch.Tensor:
        """Scored tokens per loss term in the whole step, over every rank."""
        counts = sum(self.run.model_with_loss.counts(b) for b, _, _ in micro)
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

    def _forward_backward(self, micro: list, totals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of sum(loss / global count) over the micro-batches; (nll, correct) sums."""
        with_loss = self.run.model_with_loss
        nll = torch.zeros(len(with_loss.terms), dtype=torch.float64, device=self.run.device)
        correct = torch.zeros_like(nll)
        for i, (batch, _, _) in enumerate(micro):
            tensors = to_torch(batch, self.run.device)
            sync = getattr(with_loss, "no_sync", None)  # DDP: all-reduce on the last one only
            with sync() if sync is not None and i < len(micro) - 1 else contextlib.nullcontext():
                out = with_loss.forward_backward(tensors, totals.float())
            nll += out["nll"].double()
            correct += out["correct"].double()
        return nll, correct

    def _reduce_stats(self, nll: torch.Tensor, correct: torch.Tensor,
                      micro: list) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """One all-reduce carries the loss sums, the per-source token counts and the stop flag,
        so that every rank logs the same numbers and stops at the same step."""
        run = self.run
        real_by_source = np.zeros(len(run.sources))
        for _, rows, src in micro:
            np.add.at(real_by_source, np.asarray(src, dtype=np.int64),
                      (rows.tokens != run.specials.pad).sum(axis=1))
        n_terms = len(nll)
        stats = self._all_reduce(torch.cat([
            nll, correct, torch.as_tensor(real_by_source, dtype=torch.float64, device=run.device),
            torch.tensor([float(self.stop_requested)], dtype=torch.float64, device=run.device)]))
        self._stop_agreed = bool(stats[-1] > 0)
        return stats[:n_terms], stats[n_terms:2 * n_terms], stats[2 * n_terms:-1].tolist()

    def _update_hook(self) -> Any:
        """The run's update filter when it acts on this step (None otherwise)."""
        f = self.run.update_filter
        return f if f is not None and f.active(self.step) else None

    def _clip(self) -> float:
        clip = self.cfg.train.grad_clip
        return float(torch.nn.utils.clip_grad_norm_(self.run.model.parameters(),
                                                     clip if clip > 0 else float("inf")))

    def _record(self, nll: torch.Tensor, correct: torch.Tensor, totals: torch.Tensor, lr: float,
                grad_norm: float) -> dict[str, Any]:
        terms = self.run.model_with_loss.terms
        per_term = (nll / totals.clamp(min=1)).tolist()
        record: dict[str, Any] = {"step": self.step + 1, "loss": per_term[0], "lr": lr,
                                  "grad_norm": grad_norm}
        if len(per_term) > 1:
            # The first term is already "loss" / "accuracy".
            record.update({f"{name}": v for name, v in zip(terms[1:], per_term[1:])})
            record.update({f"{name}_acc": float(c / max(n, 1)) for name, c, n in
                           zip(terms[1:], correct.tolist()[1:], totals.tolist()[1:])})
        record["accuracy"] = float(correct[0] / max(float(totals[0]), 1))
        return record

    def _guard(self, record: dict[str, Any]) -> str | None:
        """Why this step's update is skipped (non-finite, spike), or None."""
        t = self.cfg.train
        loss, grad_norm = record["loss"], record["grad_norm"]
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.guard.bad_in_row += 1
            return "non-finite"
        self.guard.bad_in_row = 0
        skip = None
        z = self.guard.spike(loss, t.spike_zscore)
        if z is not None:
            record["spike"] = round(z, 2)
            if t.spike_action == "skip":
                skip = "spike"
        if skip is None:
            self.guard.recent.append(loss)
        return skip

    def _account(self, micro: list, real_by_source: list[float], totals: torch.Tensor,
                 record: dict[str, Any]) -> None:
        """Advance step and token counts; end the run after too many bad steps in a row."""
        run = self.run
        for i, source in enumerate(run.sources):
            self.tokens_by_source[source.name] += int(real_by_source[i])
        self.tokens += sum(rows.tokens.size for _, rows, _ in micro) * run.world_size
        self.step += 1
        record.update({"tokens": self.tokens, "targets": int(totals[0])})
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
        """Train to ``cfg.train.steps``. ``evaluate()`` -> dict of eval metrics."""
        t = self.cfg.train
        bar = self._bar()
        last: dict[str, Any] = {}
        try:
            while self.step < t.steps:
                start, tokens_before = time.perf_counter(), self.tokens
                record = self.train_step()
                dt = time.perf_counter() - start
                record["tokens_per_second"] = (self.tokens - tokens_before) / max(dt, 1e-9)
                record["step_seconds"] = dt
                if self.step % t.log_every == 0 or self.step == t.steps or "skipped" in record:
                    self.log(record)
                last = record
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}",
                                    tok_s=f"{record['tokens_per_second']:.0f}")
                if evaluate is not None and t.eval_every and self.step % t.eval_every == 0 \
                        and self.step < t.steps:
                    ev = evaluate()
                    self.log({"step": self.step, "tokens": self.tokens, "eval": True, **ev})
                    if on_eval:
                        on_eval()
                if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or self.step == t.steps:
                    self.save()
                if self._stop_now():
                    if t.checkpoint_every == 0 or self.step % t.checkpoint_every:
                        self.save()
                    raise Stop()
        finally:
            if bar is not None:
                bar.close()
        return last

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
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.step, desc="train", unit="step",
                    dynamic_ncols=True, mininterval=0.5, file=sys.stderr)
