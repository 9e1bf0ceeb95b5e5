"""Plots drawn from a run directory's ``metrics.jsonl`` (never from the trainer's memory)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lmobjectives.rundir import read_metrics


def save_figure(fig, path: Path) -> None:  # noqa: ANN001
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def plottable(record: dict) -> bool:
    """A record with a number for ``tokens`` and ``loss`` (a damaged line may lack either)."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return number(record.get("tokens")) and number(record.get("loss"))


def plot_loss(run_dir: str | Path) -> Path | None:
    """``loss.png``: train and eval loss against tokens seen; spikes and skipped steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if plottable(r)]
    train = [r for r in records if not r.get("eval")]
    if not train:
        return None
    evals = [r for r in records if r.get("eval")]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax.plot([r["tokens"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    marked = [r for r in train if "spike" in r or "skipped" in r]
    if marked:
        ax.scatter([r["tokens"] for r in marked],
                   [r["loss"] if r["loss"] == r["loss"] else 0 for r in marked],
                   marker="x", color="red", zorder=3, label="spike / skipped")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats / scored token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    save_figure(fig, out)
    plt.close(fig)
    return out
