"""The two plots of the ``lmobj compare`` report: every run's loss curve against corpus tokens
read, and the headline metrics per objective as bars."""

from __future__ import annotations

from pathlib import Path

from lmobjectives.report.comparison_rows import CURVE_POINTS, Column, Row, fmt
from lmobjectives.report.plots import save_figure


def _smooth(ys: list[float]) -> list[float]:
    w = max(1, len(ys) // CURVE_POINTS)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot_loss_curves(rows: list[Row], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        xs, ys = r.curve
        if xs:
            ax.plot(xs, _smooth(list(ys)), lw=1.4, label=f"{r.label} ({r.architecture.replace('_', '-')})")
    ax.set_xlabel("corpus tokens read")
    ax.set_ylabel("own-objective training loss (nats / scored token)")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    for axis in (ax.yaxis,):  # plain numbers on the log axis, major and minor ticks
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(ScalarFormatter())
    ax.set_title("Training loss per objective (levels do not compare across objectives)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_metric_bars(rows: list[Row], columns: list[Column], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A column with a single value ranks nothing: it stays in the table, out of the charts.
    shown = [c for c in columns if c.higher_is_better is not None
             and sum(r.values.get(c.name) is not None for r in rows) >= 2]
    ncols = 2
    nrows = max(1, -(-len(shown) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(10, 3.2 * nrows), squeeze=False)
    labels = [r.label for r in rows]
    for ax, col in zip(axes.flat, shown):
        vals = [r.values.get(col.name) for r in rows]
        xs = range(len(rows))
        bars = ax.bar([x for x, v in zip(xs, vals) if v is not None], [v for v in vals if v is not None],
                      color="#4c72b0")
        ax.bar_label(bars, labels=[fmt(v, col.digits) for v in vals if v is not None], fontsize=7,
                     padding=2)
        ax.margins(y=0.15)
        for x, v in zip(xs, vals):
            if v is None:
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8, color="#888")
        if col.name == "probe_accuracy":
            base = [r.extras.get(col.name, {}).get("baseline") for r in rows]
            base = [b for b in base if b is not None]
            if base:
                ax.axhline(base[0], ls="--", color="#c44", lw=1, label="majority baseline")
            init = [(x, r.extras.get(col.name, {}).get("at_init")) for x, r in zip(xs, rows)]
            init = [(x, v) for x, v in init if v is not None]
            if init:
                ax.scatter([x for x, _ in init], [v for _, v in init], marker="_", s=400,
                           color="black", zorder=3, label="untrained")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{col.label} ({'higher' if col.higher_is_better else 'lower'} is better)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path
