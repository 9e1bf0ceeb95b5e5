"""The ``lmobj`` command line: a thin layer over the library. Every command is one call a user
could make from Python; every user error ends with one message and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from lmobjectives.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pre-train language models with every major objective, and measure them.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train tokenizers.")
corpus_app = typer.Typer(no_args_is_help=True, help="Corpora: the embedded default corpus.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(corpus_app, name="corpus")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)


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
    force: bool = typer.Option(False, help="Resume even if the config or data changed."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a model (no arguments: the default job on the embedded default corpus)."""
    from lmobjectives.config import apply_set, build_config, load_config_file
    from lmobjectives.train.api import load_run_config, train as run_train

    flags = {"objective": objective, "data.corpus": corpus, "data.store": data,
             "data.tokenizer": tokenizer, "model.preset": preset, "model.init_from": init_from,
             "train.steps": steps, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
             "data.seq_len": seq_len, "train.lr": lr, "train.seed": seed,
             "train.checkpoint_every": checkpoint_every, "out": out}
    given = {k: v for k, v in flags.items() if v not in (None, [])}
    if resume:
        extra = set(given) - {"train.steps"}
        if extra or config or set_:
            raise UserError("--resume continues a run with its own config; only --steps may change "
                            f"(got {', '.join(sorted(extra)) or 'a config'})")
        cfg = load_run_config(Path(resume), given)
        _say(f"resuming {resume} (weights, optimizer, data position and RNG restored)")
    else:
        tree = load_config_file(config) if config else {}
        for key, value in given.items():
            node = tree
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        for assignment in set_ or []:
            apply_set(tree, assignment)
        cfg = build_config(tree)
        if init_from:
            _say(f"initialising from {init_from}: weights only, fresh optimizer, step 0")
    result = run_train(cfg, resume=resume, overwrite=overwrite, force=force, progress=not json_out)
    summary = {"run_dir": str(result.run_dir), "started": result.started, "stopped": result.stopped,
               "step": result.final.get("step"), "loss": result.final.get("loss"), "eval": result.eval}
    if json_out:
        _print_json(summary)
    else:
        _say(f"done: {result.run_dir}  train loss {summary['loss'] if summary['loss'] is None else round(summary['loss'], 4)}")
        if result.eval:
            _say("eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in result.eval.items()))


# ------------------------------------------------------------------------------------ data
@app.command()
def prepare(
    corpus: List[str] = typer.Option(..., help="Corpus path (repeatable); 'default' = the embedded corpus."),
    tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer directory (default: the shipped one)."),
    out: str = typer.Option(..., help="Store directory to write."),
    val_fraction: float = typer.Option(0.01, help="Share of documents held out (by document hash)."),
    seed: int = typer.Option(0, help="Seed of the split."),
    encoding: str = typer.Option("skip", help="strict | replace | skip undecodable files."),
    text_field: str = typer.Option("text", help="JSONL field / parquet column with the text."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Tokenize a corpus into a token store (memmap shards + manifest)."""
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    if encoding not in ("strict", "replace", "skip"):
        raise UserError(f"--encoding must be strict, replace or skip, not '{encoding}'")
    store = prepare_store(corpus, load_tokenizer(tokenizer), out, val_fraction=val_fraction, seed=seed,
                          encoding=encoding, text_field=text_field, progress=not json_out)
    m = store.manifest
    if json_out:
        _print_json(m)
    else:
        _say(f"store {out}: {m['documents']} documents, {m['tokens']} tokens "
             f"(train {m['splits']['train']['tokens']}, val {m['splits']['val']['tokens']}); "
             f"fingerprint {m['fingerprint'][:16]}")


@tokenizer_app.command("train")
def tokenizer_train(
    corpus: List[str] = typer.Option(..., help="Corpus path (repeatable)."),
    vocab_size: int = typer.Option(8192, help="Vocabulary size, special tokens included."),
    out: str = typer.Option(..., help="Directory for the HF tokenizer."),
    encoding: str = typer.Option("skip", help="strict | replace | skip undecodable files."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Train a byte-level BPE tokenizer with the reserved special tokens."""
    from lmobjectives.corpus import iter_documents
    from lmobjectives.tokenizer import save_hf_tokenizer, tokenizer_fingerprint, train_tokenizer

    tok = train_tokenizer((d.text for d in iter_documents(corpus, encoding=encoding)), vocab_size, None)
    save_hf_tokenizer(tok, out)
    info = {"out": out, "vocab_size": tok.get_vocab_size(), "fingerprint": tokenizer_fingerprint(tok)}
    _print_json(info) if json_out else _say(f"tokenizer {out}: {info['vocab_size']} tokens")


@corpus_app.command("default")
def corpus_default(json_out: bool = typer.Option(False, "--json")) -> None:
    """Show what the embedded default corpus is, and its fingerprint."""
    from lmobjectives.corpus import default_corpus_info

    info = default_corpus_info()
    if json_out:
        _print_json(info)
    else:
        for k, v in info.items():
            print(f"{k}: {v}")


# ------------------------------------------------------------------------------------ use
@app.command("eval")
def eval_(
    run_dir: str = typer.Argument(..., help="A run directory."),
    data: Optional[str] = typer.Option(None, help="A store or corpus to evaluate on (default: the run's validation split)."),
    batches: int = typer.Option(16, help="Validation batches."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Loss, perplexity and bits-per-byte of a run on held-out data."""
    from lmobjectives.evaluate.run import evaluate_dir

    res = evaluate_dir(run_dir, data=data, n_batches=batches)
    if json_out:
        _print_json(res)
    else:
        for k, v in res.items():
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")


@app.command()
def generate(
    run_dir: str = typer.Argument(..., help="A run directory (or an HF model directory)."),
    prompt: str = typer.Option("", help="Text to continue."),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Continue a prompt with a KV cache (greedy by default)."""
    from lmobjectives.infer.api import generate_text

    res = generate_text(run_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed)
    _print_json(res) if json_out else print(prompt + res["text"])


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="A checkpoint directory: RUN/checkpoints/step-NNNNNNN."),
    out: str = typer.Option(..., help="HF directory to write."),
) -> None:
    """Export a checkpoint as an HF model + tokenizer directory."""
    from lmobjectives.train.api import export_checkpoint

    if not (Path(checkpoint) / "model.safetensors").is_file():
        raise UserError(f"{checkpoint} is not a checkpoint directory (no model.safetensors)")
    _say(f"exported {export_checkpoint(checkpoint, out)}")


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
    objectives: str = typer.Option("clm,mlm,span,ul2,prefix,fim,mtp",
                                   help="Comma-separated; OBJ@ARCH picks another architecture (span@prefix_lm)."),
    corpus: Optional[List[str]] = typer.Option(None, help="Corpus path (repeatable); default: the embedded corpus."),
    data: Optional[str] = typer.Option(None, help="A prepared token store (instead of --corpus)."),
    tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer directory."),
    preset: str = typer.Option("small", help="Model size for every family: tiny, small, base."),
    steps: Optional[int] = typer.Option(None, help="Budget: this many steps of seq_len rows (default 150)."),
    tokens: Optional[int] = typer.Option(None, help="Budget: corpus tokens each run reads."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per micro-batch."),
    seq_len: Optional[int] = typer.Option(None, help="Sequence length."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (the same for every run)."),
    seed: Optional[int] = typer.Option(None, help="Seed of weights, data order and objectives."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="A shared config key: --set train.warmup_fraction=0.1."),
    out: str = typer.Option("runs/compare", help="Directory for the runs and the report."),
    overwrite: bool = typer.Option(False, help="Retrain runs whose config differs from this one."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train one model per objective under an equal token budget and write a report."""
    from lmobjectives.compare import compare as run_compare

    res = run_compare(objectives.split(","), corpus=corpus or None, store=data, tokenizer=tokenizer,
                      preset=preset, steps=steps, tokens=tokens, batch_size=batch_size,
                      seq_len=seq_len, lr=lr, seed=seed, sets=set_ or [], out=out,
                      overwrite=overwrite, progress=not json_out,
                      command="lmobj " + " ".join(sys.argv[1:]))
    summary = {"out": str(res.out), "runs": res.runs, "skipped": res.skipped,
               "report_md": str(res.report_md), "report_html": str(res.report_html)}
    if json_out:
        _print_json(summary)
    else:
        _say(f"report: {res.report_md} and {res.report_html}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
