"""Equal wall time for ``lmobj compare --time 30m``: the split of one budget across runs.

The budget counts from the moment the command started and covers everything it does:
preparing the shared store and the measuring bench, training every run, and measuring the
runs for the report. The split is fixed before the first run, so every run gets the same
share:

    per run = (budget - setup so far - measuring reserve) / runs
    measuring reserve = runs x MEASURE_MARGIN x (one measurement, timed; ``compare.pilot``)

where ``runs`` = objectives x seeds. Worked example: ``--time 30m``, 4 objectives x 3 seeds,
60 s of setup (store, bench, the timed measurement), one measurement 20 s: reserve
12 x 20 = 240 s, per run (1800 - 60 - 240) / 12 = 125 s.

Each run is then an ordinary timed run (``train.time``, ``train/budget.py``): its share
counts from its own start (model setup and its calibration included), and it ends within
its share, so objectives that train slower read fewer tokens — the point of the rule.
Every run uses the same preset, so equal wall time never means different model sizes.

The split is saved in ``DIR/time_plan.json``: the same command run again (after an
interruption) keeps it, so finished runs are reused and started ones resume with the time
their share has left; another ``--time`` or another set of runs plans anew.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from lmobjectives.errors import UserError

# The timed measurement is of an untrained model, the slow case (its infill generations run
# to full length, its draft tokens are rarely accepted): on the default corpus, tiny preset,
# 2 loaded cores, one untrained measurement took 8.3 s and the 21 trained runs of the compare
# example 49 s in all (2.3 s each). So no extra margin.
MEASURE_MARGIN = 1.0
# A share below this cannot hold a timed run's setup, calibration and one step.
MIN_RUN_SECONDS = 5.0
PLAN_FILE = "time_plan.json"


def split_budget(time_text: str, budget_s: float, setup_s: float, measure_one_s: float,
                 labels: Sequence[str]) -> dict[str, Any]:
    """The split of ``budget_s`` (given as ``time_text``) across the runs ``labels``, after
    ``setup_s`` already spent, when measuring one run takes ``measure_one_s``; a share too
    short for a timed run is an error."""
    from lmobjectives.train.budget import format_seconds

    reserve = MEASURE_MARGIN * measure_one_s * len(labels)
    per_run = math.floor((budget_s - setup_s - reserve) / max(len(labels), 1))
    if per_run < MIN_RUN_SECONDS:
        raise UserError(
            f"--time {time_text} is too short for {len(labels)} runs: after {setup_s:.0f} s of "
            f"setup and {reserve:.0f} s kept for measuring, each run would get {per_run} s "
            f"(at least {MIN_RUN_SECONDS:.0f} s); give at least "
            f"{format_seconds(math.ceil(setup_s + reserve + MIN_RUN_SECONDS * len(labels)))}"
            " or fewer objectives/seeds")
    return {"time": time_text, "budget_s": budget_s, "setup_s": round(setup_s, 1),
            "measure_one_s": round(measure_one_s, 1), "measure_margin": MEASURE_MARGIN,
            "measure_reserve_s": round(reserve, 1),
            "per_run_s": per_run, "runs": list(labels), "trained_s": {}}


def plan_time(out: Path, time_text: str, started_at: float, labels: Sequence[str],
              measure_one: Callable[[], float]) -> dict[str, Any]:
    """The saved split when it was made for the same ``--time`` and runs, else a new one
    (saved); ``measure_one()`` times one measurement (only when a new split is made)."""
    from lmobjectives.train.budget import parse_duration
    from lmobjectives.util import atomic_write_json

    budget_s = parse_duration(time_text)
    path = out / PLAN_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("budget_s") == budget_s and saved.get("runs") == list(labels):
            return saved
    one = measure_one()
    plan = split_budget(time_text, budget_s, time.time() - started_at, one, labels)
    atomic_write_json(path, plan)
    return plan


def record_run(out: Path, plan: dict[str, Any], label: str, seconds: float) -> None:
    """Keep the wall time ``label``'s training took (in the saved split)."""
    from lmobjectives.util import atomic_write_json

    # A resumed run adds the time of this part to what its earlier part took.
    plan["trained_s"][label] = round(plan["trained_s"].get(label, 0.0) + seconds, 1)
    atomic_write_json(out / PLAN_FILE, plan)


def finish(plan: dict[str, Any], measure_s: float, started_at: float) -> dict[str, Any]:
    """The split with what measuring took and the command's wall time so far (for the
    report)."""
    return {**plan, "measure_s": round(measure_s, 1), "wall_s": round(time.time() - started_at, 1)}
