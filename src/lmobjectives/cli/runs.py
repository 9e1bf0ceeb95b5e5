"""``lmobj export``, ``verify``, ``show`` and ``compare``: run directories and their checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from lmobjectives.cli.common import _print_json, _say, app
from lmobjectives.errors import UserError


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="A checkpoint directory: RUN/checkpoints/step-NNNNNNN."),
    out: str = typer.Option(..., help="HF directory to write."),
) -> None:
    """Export a checkpoint as an HF model + tokenizer directory."""
    from lmobjectives.export import export_checkpoint

    if not any((Path(checkpoint) / f).is_file() for f in ("model.safetensors", ".metadata")):
        raise UserError(f"{checkpoint} is not a checkpoint directory (no model.safetensors or .metadata)")
    _say(f"exported {export_checkpoint(checkpoint, out)}")


@app.command()
def verify(
    run_dir: str = typer.Argument(..., help="A run directory, one checkpoint, or an exported model directory."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Check every checkpoint of a run and its final/ model (or one checkpoint, or one exported
    model directory) against their SHA-256 checksums; exit 2 if any is damaged."""
    from lmobjectives.checkpoint import verify_run

    results = verify_run(Path(run_dir))
    checked = [r for r in results if "checkpoint" in r]
    bad = [r for r in checked if not r["ok"]]
    if json_out:
        _print_json({"run_dir": run_dir, "checkpoints": checked, "ok": not bad,
                     "leftovers": [r["leftover"] for r in results if "leftover" in r]})
    else:
        for r in results:
            if "leftover" in r:
                print(f"leftover  {r['leftover']} (an interrupted write; removed on the next start)")
            else:
                print(f"{'ok' if r['ok'] else 'CORRUPT':8}  {r['checkpoint']}"
                      + ("" if r["ok"] else f": {r['error']}"))
    if bad:
        raise UserError(f"{len(bad)} of {len(checked)} checkpoint(s)/model(s) in {run_dir} failed verification "
                        f"(first: {bad[0]['error']})")


@app.command()
def show(
    objective: str = typer.Argument(..., help="Objective name."),
    text: str = typer.Option(..., help="Text to transform."),
    seed: int = typer.Option(0),
    tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer directory (default: the shipped one)."),
    seq_len: int = typer.Option(128),
    architecture: Optional[str] = typer.Option(None, help="Converter to show (default: the objective's)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Objective parameter: --set mask_rate=0.3."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Show what an objective makes of a text: inputs and targets, special tokens visible."""
    from lmobjectives.config import parse_value
    from lmobjectives.show import render, show as run_show
    from lmobjectives.tokenizer import load_tokenizer

    params = {}
    for assignment in set_ or []:
        if "=" not in assignment:
            raise UserError(f"--set takes param=value, got '{assignment}'")
        k, v = assignment.split("=", 1)
        params[k.removeprefix("objective.")] = parse_value(v)
    tok = load_tokenizer(tokenizer)
    shown = run_show(objective, text, tok, seed=seed, seq_len=seq_len, params=params,
                     architecture=architecture)
    _print_json(shown) if json_out else print(render(shown, tok))


@app.command()
def compare(
    objectives: str = typer.Option("clm,mlm,span,ul2,prefix,fim,mtp,mdlm",
                                   help="Comma-separated; OBJ@ARCH picks another architecture (span@prefix_lm)."),
    corpus: Optional[List[str]] = typer.Option(None, help="Corpus path (repeatable); default: the embedded corpus."),
    data: Optional[str] = typer.Option(None, help="A prepared token store (instead of --corpus)."),
    tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer directory."),
    preset: str = typer.Option("small", help="Model size for every family: tiny, small, base."),
    steps: Optional[int] = typer.Option(None, help="Budget: this many steps of seq_len rows (default 150)."),
    tokens: Optional[int] = typer.Option(None, help="Budget: corpus tokens each run reads."),
    time_: Optional[str] = typer.Option(None, "--time", help="Budget: wall time of the whole command (90s, 30m, 2h), split equally across runs (objectives x seeds), measuring included."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per micro-batch."),
    seq_len: Optional[int] = typer.Option(None, help="Sequence length."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (the same for every run)."),
    seed: Optional[int] = typer.Option(None, help="First seed of weights, data order and objectives."),
    seeds: int = typer.Option(3, help="Runs per objective (seeds SEED, SEED+1, ...); the report gives mean ± 95% interval."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="A shared config key: --set train.warmup_fraction=0.1."),
    out: str = typer.Option("runs/compare", help="Directory for the runs and the report."),
    overwrite: bool = typer.Option(False, help="Retrain runs whose config differs from this one."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train SEEDS models per objective under an equal budget (tokens, or wall time with --time) and write a report."""
    from lmobjectives.cli.train import STARTED_AT
    from lmobjectives.compare import compare as run_compare

    res = run_compare(objectives.split(","), corpus=corpus or None, store=data, tokenizer=tokenizer,
                      preset=preset, steps=steps, tokens=tokens, time_budget=time_, batch_size=batch_size,
                      seq_len=seq_len, lr=lr, seed=seed, seeds=seeds, sets=set_ or [], out=out,
                      overwrite=overwrite, progress=not json_out,
                      command="lmobj " + " ".join(sys.argv[1:]), started_at=STARTED_AT)
    summary = {"out": str(res.out), "runs": res.runs, "skipped": res.skipped,
               "report_md": str(res.report_md), "report_html": str(res.report_html)}
    if json_out:
        _print_json(summary)
    else:
        _say(f"report: {res.report_md} and {res.report_html}")

