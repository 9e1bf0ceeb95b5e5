"""Time budgets (``--time 5m``): the duration, and the step plan that ends a run at its
deadline.

A timed run has a wall-clock budget that counts everything from the moment the command
started: setup, calibration (``train/calibrate.py``), training, periodic evaluation and
checkpoints, the final evaluation and the export. The number of optimizer steps is not known
in advance, so the ``StepPlan`` re-plans it after every step:

    steps left = (deadline - now - reserve) / (step time + eval time / eval_every
                                                + checkpoint time / checkpoint_every)

where step time is a running mean of the measured steps (seeded by calibration) and
``reserve`` is the measured cost of what follows the last step (final evaluation,
checkpoint, export). With WSD (MiniCPM §4, the natural schedule for an unknown length) the
learning rate stays at its peak until the steps left equal ``decay_fraction`` of the planned
total; that step is then fixed as the decay start and the decay runs linearly to the
re-planned end. Warmup is fixed at the first plan.

Worked example: budget 240 s, 20 s of setup and calibration, 0.4 s a step, evaluation 2 s
every 100 steps, checkpoint 0.5 s every 100, reserve 3 s ⇒ steps left = 217 / 0.425 = 510;
with ``decay_fraction`` 0.2 the decay starts when 102 steps are left.

Wall time is not reproducible, the plan is saved: every checkpoint holds the plan's state
(total, warmup, decay start, time spent), and a resumed run continues it with the time the
budget has left.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from lmobjectives.errors import UserError
from lmobjectives.train.schedule import lr_at

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
STEP_TIME_SMOOTHING = 0.1  # weight of the newest step in the running mean of step time
# What follows the last step and is not yet measured: a second for writing, plotting and
# closing files, on top of the measured evaluation, checkpoint and export; one more for
# several processes (final barrier, closing the process group, torchrun's shutdown).
FIXED_RESERVE_S = 1.0
DISTRIBUTED_RESERVE_S = 3.0  # measured: 1-2 s idle, up to 8 s at load 12 on 2 cores


def parse_duration(text: str) -> float:
    """``90s``, ``5m``, ``2h``, ``1d`` or a sum such as ``1h30m`` -> seconds (> 0)."""
    s = str(text).strip().lower().replace(" ", "")
    parts = _DURATION.findall(s)
    if not s or not parts or "".join(n + u for n, u in parts) != s:
        raise UserError(f"--time takes a duration such as 90s, 5m, 2h or 1d, not '{text}'")
    seconds = sum(float(n) * UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"--time must be longer than zero, got '{text}'")
    return seconds


@dataclass
class StepPlan:
    """How many optimizer steps fit before ``deadline`` (a ``clock()`` time)."""

    budget_s: float  # the whole budget (``--time``)
    deadline: float
    step_s: float  # running mean of one optimizer step
    warmup: int = 0
    total: int = 0
    decay_start: int | None = None
    eval_s: float = 0.0  # one evaluation (with its plot), measured
    save_s: float = 0.0  # one checkpoint, measured
    schedule: str = "wsd"
    warmup_fraction: float = 0.05
    decay_fraction: float = 0.2
    replans: int = 0
    processes: int = 1
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)
    _tick: float | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ planning
    def reserve(self) -> float:
        """Seconds the end of the run needs after its last step: final evaluation, final
        checkpoint, export (about one checkpoint's weights) and a fixed margin."""
        return (self.eval_s + 2 * self.save_s + FIXED_RESERVE_S
                + (DISTRIBUTED_RESERVE_S if self.processes > 1 else 0.0))

    def seconds_left(self) -> float:
        return self.deadline - self.clock()

    def start(self, step: int, eval_every: int, checkpoint_every: int) -> int:
        """The first plan (warmup fixed from it); refuses a budget too short for one step."""
        self.replan(step, eval_every, checkpoint_every)
        if self.total <= step and step == 0:
            raise UserError(
                f"--time {format_seconds(self.budget_s)} is too short: after setup "
                f"{max(self.seconds_left(), 0):.1f} s are left, and one optimizer step takes "
                f"{self.step_s:.2f} s plus {self.reserve():.1f} s to evaluate and save; "
                f"give at least {format_seconds(self.budget_s - self.seconds_left() + self.step_s + self.reserve())}")
        if step == 0:
            self.warmup = round(self.warmup_fraction * self.total)
        return self.total

    def worth_evaluating(self, step: int, eval_every: int) -> bool:
        """A periodic evaluation is skipped when the final one is less than half a period
        away: it would cost its time and show nothing new."""
        return self.total - step >= eval_every / 2

    def observe_step(self, seconds: float) -> None:
        self.step_s += STEP_TIME_SMOOTHING * (seconds - self.step_s)

    def end_iteration(self, aside: float) -> None:
        """One loop iteration ended: its time since the last one, less ``aside`` (evaluation
        and checkpoint, measured apart), is one step's."""
        now = time.perf_counter()
        if self._tick is not None:
            self.observe_step(now - self._tick - aside)
        self._tick = now

    def observe_eval(self, seconds: float) -> None:
        self.eval_s = max(self.eval_s, seconds)

    def observe_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)

    def replan(self, step: int, eval_every: int, checkpoint_every: int) -> int:
        """Re-plan the total from the measured times; returns it (>= ``step``)."""
        per_step = self.step_s
        if eval_every:
            per_step += self.eval_s / eval_every
        if checkpoint_every:
            per_step += self.save_s / checkpoint_every
        left = self.seconds_left() - self.reserve()
        n = max(0, math.floor(left / max(per_step, 1e-9)))
        if self.decay_start is not None:
            n = max(n, 1 if step == self.decay_start else 0)  # a decay has at least one step
        self.total = step + n
        self.replans += 1
        if (self.schedule == "wsd" and self.decay_start is None
                and n <= round(self.decay_fraction * self.total)):
            self.decay_start = step
        return self.total

    def replan_agreed(self, step: int, train: Any, world_size: int) -> int:
        """``replan`` with ``train``'s cadence; several processes take rank 0's plan, so
        that they all stop at the same step."""
        total = self.replan(step, train.eval_every, train.checkpoint_every)
        if world_size > 1:
            from lmobjectives.runtime import broadcast_object

            self.total, self.decay_start = broadcast_object((total, self.decay_start))
        return self.total

    # ------------------------------------------------------------------ schedule
    def lr(self, step: int, peak: float, min_ratio: float) -> float:
        """The learning rate of step ``step`` (0-based) under the current plan."""
        if self.schedule == "wsd" and self.decay_start is not None and step >= self.warmup:
            floor = peak * min_ratio
            span = max(self.total - self.decay_start, 1)
            progress = min((step - self.decay_start + 1) / span, 1.0)
            return peak - (peak - floor) * progress
        if self.schedule == "wsd" and step >= self.warmup:
            return peak
        return lr_at(step, total=max(self.total, step + 1), peak=peak, warmup=self.warmup,
                     schedule=self.schedule, min_ratio=min_ratio, decay_fraction=self.decay_fraction)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the plan, and the budget time spent so far."""
        out = {k: v for k, v in asdict(self).items() if k not in ("deadline", "clock", "_tick")}
        out["spent_s"] = self.budget_s - self.seconds_left()
        return out

    @classmethod
    def restore(cls, state: dict[str, Any], started_at: float,
                clock: Callable[[], float] = time.time) -> "StepPlan":
        """The saved plan, continued by a process that started at ``started_at``: its
        deadline is that start plus the budget the saved run had left."""
        fields = {k: v for k, v in state.items() if k != "spent_s"}
        left = float(state["budget_s"]) - float(state["spent_s"])
        return cls(**fields, deadline=started_at + left, clock=clock)


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"
