"""What measuring one run costs on this machine, timed before a ``--time`` budget is split.

Measuring a run for the report (held-out bits/byte, infilling, speculative decoding, token
probes on the trained model and on the same architecture untrained, a few timed training
steps) costs about the same whatever the run's training length: on two loaded CPU cores,
8-11 s for a 0.7 M-parameter model with one thread, as much as a short run trains. A fixed share of the
budget would be far off, so ``lmobj compare --time`` measures an untrained model of the
first run's config on the shared bench once, and reserves that time for every run
(``compare.timing``: an untrained model is the slow case).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lmobjectives.compare.measure import Bench, Subject, measure
from lmobjectives.config import RunConfig


def pilot_seconds(cfg: RunConfig, bench: Bench, scratch: Path) -> float:
    """Seconds one measurement of ``cfg``'s model takes (its weights untrained; building it
    is not counted); the scratch run directory it needs is removed afterwards."""
    from lmobjectives.train.setup import open_run

    try:
        run = open_run(cfg.model_copy(update={"out": str(scratch)}), scratch, progress=False)
        model = run.model.to(bench.device).eval()
        subject = Subject(key="pilot", objective=cfg.objective, architecture=run.architecture,
                          run_dir=scratch, model=model, specials=run.specials,
                          tokenizer=run.tokenizer, eval={}, transform=run.objective,
                          seed=cfg.train.seed)
        began = time.time()
        measure(subject, bench)
        return time.time() - began
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
