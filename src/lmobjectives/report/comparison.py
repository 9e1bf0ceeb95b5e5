"""The comparison report of ``lmobj compare``: ``DIR/report.md`` (with its PNG plots beside
it) and ``DIR/report.html`` (one file, plots embedded). The pieces, in the order the data
flows: ``comparison_rows`` (read runs, rank them), ``comparison_doc`` (the document's
sections), ``comparison_plots`` and ``comparison_render`` (Markdown and HTML)."""

from __future__ import annotations

from pathlib import Path

from lmobjectives.report.comparison_doc import build_doc
from lmobjectives.report.comparison_plots import plot_loss_curves, plot_metric_bars
from lmobjectives.report.comparison_render import render_html, render_markdown
from lmobjectives.report.comparison_rows import load_comparison


def write_report(out: str | Path) -> tuple[Path, Path]:
    """Write ``report.md``, ``loss_curves.png``, ``metrics.png`` and ``report.html`` in ``out``."""
    out = Path(out)
    plan, rows, columns = load_comparison(out)
    doc = build_doc(plan, rows, columns)
    images = {}
    for name, draw in (("loss_curves.png", lambda p: plot_loss_curves(rows, p)),
                       ("metrics.png", lambda p: plot_metric_bars(rows, columns, p))):
        images[name] = draw(out / name).read_bytes()
    from lmobjectives.util import atomic_write_bytes

    md, page = out / "report.md", out / "report.html"
    atomic_write_bytes(md, render_markdown(doc).encode())
    atomic_write_bytes(page, render_html(doc, images).encode())
    return md, page
