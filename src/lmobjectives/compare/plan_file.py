"""``DIR/compare.json``: what ``lmobj compare`` planned and ran, and everything the report
(``report/comparison_rows.py``) needs besides the run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmobjectives.compare.measure import METRICS
from lmobjectives.config import RunConfig


def _store_summary(store_path: str) -> dict[str, Any]:
    from lmobjectives.store.store import TokenStore

    m = TokenStore(store_path).manifest
    return {"corpus": m.get("corpus", []), "documents": m["documents"], "tokens": m["tokens"],
            "val_documents": m["splits"]["val"]["documents"], "fingerprint": m["fingerprint"]}


def write_plan(out: Path, shared: RunConfig, *, budget_tokens: int | None,
               timing: dict[str, Any] | None, runs: list[dict[str, Any]], seeds: list[int],
               skipped: dict[str, str], probe: Any, command: str | None) -> None:
    """Write ``DIR/compare.json``. ``timing`` (``compare.timing``) is the split of a
    ``--time`` budget, None under the equal-token rule (``budget_tokens``)."""
    from lmobjectives.util import atomic_write_json

    t = shared.train
    atomic_write_json(out / "compare.json", {
        "command": command,
        "preset": shared.model.preset,
        "seq_len": shared.data.seq_len,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "seed": t.seed,
        "lr": t.lr,
        "store": shared.data.store,
        "data": _store_summary(shared.data.store),
        # "time": equal wall time per run (``timing``); "tokens": equal corpus tokens read.
        "budget_rule": "time" if timing is not None else "tokens",
        "budget_tokens": budget_tokens,
        "time": timing,
        "seeds": seeds,
        "runs": runs,
        "skipped": skipped,
        "probe": probe if isinstance(probe, str) else probe.describe(),
        "metrics": [m.describe() for m in METRICS.values()],
    })
