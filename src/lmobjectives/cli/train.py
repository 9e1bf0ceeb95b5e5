"""``lmobj train``: flags in, the library's training job out (flag merging and resume rules: ``config.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lmobjectives.cli.common import _print_json, _say, app


# ------------------------------------------------------------------------------------ train
@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="A YAML recipe (see configs/)."),
    objective: Optional[str] = typer.Option(None, help="clm, mlm, span, ul2, prefix, fim, mtp."),
    corpus: Optional[List[str]] = typer.Option(None, help="Corpus path (repeatable); 'default' = the embedded corpus."),
    data: Optional[str] = typer.Option(None, help="A prepared token store."),
    tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer directory."),
    preset: Optional[str] = typer.Option(None, help="Model size: tiny, small, base, 1b."),
    init_from: Optional[str] = typer.Option(None, help="Start from these weights (HF dir or run dir)."),
    mix: Optional[List[str]] = typer.Option(None, help="PATH=WEIGHT (repeatable): mix corpora/stores at these shares, e.g. --mix code/=0.8 --mix prose/=0.2."),
    lr_scale: Optional[float] = typer.Option(None, help="With --init-from one of our runs: peak LR = this × its peak."),
    rope_theta: Optional[float] = typer.Option(None, help="New RoPE base, e.g. 1e6 for a longer context (written into the exported config)."),
    train_new_embeddings_first: Optional[int] = typer.Option(None, help="First K steps update only the rows of new tokens (extended tokenizer)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Per-device micro-batch, in rows."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    seq_len: Optional[int] = typer.Option(None, help="Sequence length."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    seed: Optional[int] = typer.Option(None, help="Seed of weights, data order and objectives."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint cadence in steps."),
    out: Optional[str] = typer.Option(None, help="Run directory."),
    resume: Optional[str] = typer.Option(None, help="Continue this run from its newest checkpoint."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any config key: --set train.lr=1e-3."),
    overwrite: bool = typer.Option(False, help="Replace a run already in --out."),
    resume_if_exists: bool = typer.Option(False, help="Resume the run in --out if it holds one with this config, else start it (for torchrun --max-restarts)."),
    force: bool = typer.Option(False, help="Resume even if the config or data changed."),
    nproc: Optional[int] = typer.Option(None, help="Processes on this machine (starts torchrun; one per GPU)."),
    strategy: Optional[str] = typer.Option(None, help="Several processes: ddp (default) or fsdp."),
    allow_reshard: bool = typer.Option(False, help="Resume on a different number of processes."),
    log: Optional[List[str]] = typer.Option(None, help="Also log to tensorboard and/or wandb (repeatable; metrics.jsonl is always written)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a model (no arguments: the default job on the embedded default corpus).

    Several processes: `--nproc N` on one machine, or `torchrun ... $(which lmobj) train ...`."""
    from lmobjectives.config import check_resume_flags, config_from_flags, given_flags
    from lmobjectives.rundir import load_run_config
    from lmobjectives.train.job import train as run_train
    from lmobjectives.train.launch import launch_local, should_launch

    launching = should_launch(nproc)  # then every worker runs this same command line
    lead = not launching and int(os.environ.get("RANK", "0")) == 0  # who reports
    say = _say if lead else (lambda m: None)

    flags = {"objective": objective, "data.corpus": corpus, "data.store": data,
             "data.tokenizer": tokenizer, "model.preset": preset, "model.init_from": init_from,
             "train.steps": steps, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
             "data.seq_len": seq_len, "train.lr": lr, "train.seed": seed,
             "train.checkpoint_every": checkpoint_every, "out": out,
             "train.lr_scale": lr_scale, "model.rope_theta": rope_theta,
             "train.new_embeddings_first": train_new_embeddings_first,
             "distributed.strategy": strategy, "log.backends": log}
    given = given_flags(flags, mix)
    if resume:
        check_resume_flags(given, config, set_)
        cfg = load_run_config(Path(resume), given)
        say(f"resuming {resume} (weights, optimizer, data position and RNG restored)")
    else:
        cfg = config_from_flags(given, config, set_)
        if init_from:
            say(f"initialising from {init_from}: weights only, fresh optimizer, step 0")
    if launching:
        raise typer.Exit(launch_local(nproc, sys.argv[1:]))
    result = run_train(cfg, resume=resume, overwrite=overwrite, force=force,
                       allow_reshard=allow_reshard, progress=not json_out,
                       resume_if_exists=resume_if_exists)
    if lead:
        _print_result(result, json_out)


def _print_result(result, json_out: bool) -> None:  # noqa: ANN001 - train.job.TrainResult
    summary = {"run_dir": str(result.run_dir), "started": result.started, "stopped": result.stopped,
               "step": result.final.get("step"), "loss": result.final.get("loss"), "eval": result.eval}
    if json_out:
        _print_json(summary)
    else:
        _say(f"done: {result.run_dir}  train loss {summary['loss'] if summary['loss'] is None else round(summary['loss'], 4)}")
        if result.eval:
            _say("eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in result.eval.items()))
        if not result.stopped:
            _print_showcase(result.run_dir)


def _print_showcase(run_dir: Path) -> None:
    """The end of a finished run: a short generation and an infill example (``showcase``)."""
    from lmobjectives.infer.api import showcase

    shown = showcase(str(run_dir))
    if "generation" in shown:
        g = shown["generation"]
        print(f"--- generation (greedy, prompt {g['prompt']!r})\n{g['prompt'] + g['text']}")
    if "infill" in shown:
        f = shown["infill"]
        if f["kind"] == "sentinels":
            print(f"--- infill (sentinel spans {f['spans']}, stopped by {f['stopped_by']})\n"
                  f"{f['input']}\n-> {f['text']}", end="")
        else:  # a FIM infill
            print(f"--- infill (FIM {f['mode'].upper()}; the middle in [[ ]], stopped by "
                  f"{f['stopped_by']})\n{f['prefix']}[[{f['middle']}]]{f['suffix']}", end="")
