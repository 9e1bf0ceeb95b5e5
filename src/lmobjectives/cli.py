"""The ``lmobj`` command line: a thin layer over the library. Every command is one call a user
could make from Python; every user error ends with one message and exit code 2."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from lmobjectives.errors import UserError

# When this command started: a timed run's budget counts from here (setup included). The
# workers of `--nproc` inherit their launcher's start through the environment.
STARTED_AT = float(os.environ.get("LMOBJ_STARTED_AT", time.time()))

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pre-train language models with every major objective, and measure them.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and extend tokenizers.")
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
    mix: Optional[List[str]] = typer.Option(None, help="PATH=WEIGHT (repeatable): mix corpora/stores at these shares, e.g. --mix code/=0.8 --mix prose/=0.2."),
    lr_scale: Optional[float] = typer.Option(None, help="With --init-from one of our runs: peak LR = this × its peak."),
    rope_theta: Optional[float] = typer.Option(None, help="New RoPE base, e.g. 1e6 for a longer context (written into the exported config)."),
    train_new_embeddings_first: Optional[int] = typer.Option(None, help="First K steps update only the rows of new tokens (extended tokenizer)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    time_: Optional[str] = typer.Option(None, "--time", help="Time budget (90s, 5m, 2h, 1d), setup included; without --preset the model is sized for it. Default, when --steps is not given either: 4m."),
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
    nproc: Optional[int] = typer.Option(None, help="Processes on this machine (starts torchrun; one per GPU)."),
    strategy: Optional[str] = typer.Option(None, help="Several processes: ddp (default) or fsdp."),
    allow_reshard: bool = typer.Option(False, help="Resume on a different number of processes."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a model (no arguments: the default job, 4 minutes on the embedded default corpus).

    Several processes: `--nproc N` on one machine, or `torchrun ... $(which lmobj) train ...`."""
    from lmobjectives.config import apply_set, build_config, default_budget, load_config_file
    from lmobjectives.train.api import load_run_config, train as run_train
    from lmobjectives.train.launch import launch_local, should_launch

    launching = should_launch(nproc)  # then every worker runs this same command line
    lead = not launching and int(os.environ.get("RANK", "0")) == 0  # who reports
    say = _say if lead else (lambda m: None)

    flags = {"objective": objective, "data.corpus": corpus, "data.store": data,
             "data.tokenizer": tokenizer, "model.preset": preset, "model.init_from": init_from,
             "train.steps": steps, "train.time": time_, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
             "data.seq_len": seq_len, "train.lr": lr, "train.seed": seed,
             "train.checkpoint_every": checkpoint_every, "out": out,
             "train.lr_scale": lr_scale, "model.rope_theta": rope_theta,
             "train.new_embeddings_first": train_new_embeddings_first,
             "distributed.strategy": strategy}
    if mix:
        from lmobjectives.train.continual import parse_mix

        if corpus or data:
            raise UserError("give either --mix or --corpus/--data: --mix names every source with its weight")
        flags["data.mix"] = parse_mix(mix)
    given = {k: v for k, v in flags.items() if v not in (None, [])}
    if steps is not None and time_ is not None:
        raise UserError("give --steps or --time, not both (a timed run plans its own steps)")
    if resume:
        extra = set(given) - {"train.steps"}
        if extra or config or set_:
            raise UserError("--resume continues a run with its own config; only --steps may change "
                            f"(got {', '.join(sorted(extra)) or 'a config'})")
        cfg = load_run_config(Path(resume), given)
        say(f"resuming {resume} (weights, optimizer, data position and RNG restored)")
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
        cfg = build_config(default_budget(tree))
        if init_from:
            say(f"initialising from {init_from}: weights only, fresh optimizer, step 0")
    if launching:
        os.environ["LMOBJ_STARTED_AT"] = repr(STARTED_AT)
        raise typer.Exit(launch_local(nproc, sys.argv[1:]))
    result = run_train(cfg, resume=resume, overwrite=overwrite, force=force,
                       allow_reshard=allow_reshard, progress=not json_out, started_at=STARTED_AT)
    if not lead:
        return
    summary = {"run_dir": str(result.run_dir), "started": result.started, "stopped": result.stopped,
               "step": result.final.get("step"), "loss": result.final.get("loss"), "eval": result.eval}
    if json_out:
        _print_json(summary)
    else:
        _say(f"done: {result.run_dir}  train loss {summary['loss'] if summary['loss'] is None else round(summary['loss'], 4)}")
        if result.eval:
            _print_eval(result.eval)
        if not result.stopped:
            _print_showcase(result.run_dir)


def _print_eval(ev: dict[str, Any]) -> None:
    """Held-out numbers, the headline first: bits per byte (comparable across tokenizers)."""
    scalars = {k: v for k, v in ev.items() if isinstance(v, (int, float))}
    head = f"held-out bits/byte {scalars['bits_per_byte']:.3f}; " if "bits_per_byte" in scalars else ""
    _say("eval: " + head + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in scalars.items() if k != "bits_per_byte"))


def _print_showcase(run_dir: Path) -> None:
    """The end of a finished run: a short generation and an infill example (``showcase``)."""
    from lmobjectives.infer.api import showcase

    shown = showcase(str(run_dir))
    if "generation" in shown:
        g = shown["generation"]
        print(f"--- generation (sampled: temperature {g['temperature']}, top-p {g['top_p']}, "
              f"seed {g['seed']}; prompt {g['prompt']!r})\n{g['prompt'] + g['text']}")
    if "infill" in shown:
        f = shown["infill"]
        if f["kind"] == "fim":
            print(f"--- infill (FIM {f['mode'].upper()}; the middle in [[ ]], stopped by "
                  f"{f['stopped_by']})\n{f['prefix']}[[{f['middle']}]]{f['suffix']}", end="")
        else:
            print(f"--- infill (sentinel spans {f['spans']}, stopped by {f['stopped_by']})\n"
                  f"{f['input']}\n-> {f['text']}", end="")


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


@tokenizer_app.command("extend")
def tokenizer_extend(
    corpus: List[str] = typer.Option(..., help="Domain corpus path (repeatable)."),
    add: int = typer.Option(..., help="How many tokens to add."),
    out: str = typer.Option(..., help="Directory for the extended HF tokenizer."),
    tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer directory to extend (default: the shipped one)."),
    min_frequency: int = typer.Option(2, help="Add no token that saves fewer tokens than this."),
    encoding: str = typer.Option("skip", help="strict | replace | skip undecodable files."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Add the N strings that shorten a domain corpus most (continued BPE); old ids unchanged."""
    from lmobjectives.tokenizer.extend import extend_tokenizer_dir

    ext = extend_tokenizer_dir(tokenizer, corpus, add, out, min_frequency=min_frequency, encoding=encoding)
    st = ext.stats
    if json_out:
        _print_json({"out": out, "added": len(ext.added), "vocab_size": ext.vocab_size, **st})
        return
    _say(f"tokenizer {out}: {len(ext.added)} tokens added ({ext.base_vocab_size} -> {ext.vocab_size}); "
         f"e.g. {', '.join(repr(a.text) for a in ext.added[:8])}")
    _say(f"corpus: {st['tokens_before']} -> {st['tokens_after']} tokens "
         f"({100 * st['token_reduction']:.2f}% fewer); bytes per token "
         f"{st['bytes_per_token_before']:.3f} -> {st['bytes_per_token_after']:.3f}")


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
    data: Optional[List[str]] = typer.Option(None, help="PATH, or NAME=PATH (repeatable): stores or corpora to evaluate on (default: the run's validation split)."),
    baseline: Optional[str] = typer.Option(None, help="Run or HF model dir to compare with: per-dataset gain and retention (forgetting report)."),
    batches: int = typer.Option(16, help="Validation batches (per dataset)."),
    seq_len: Optional[int] = typer.Option(None, help="Row length for the forgetting report (default: the run's)."),
    infill_samples: int = typer.Option(20, help="Held-out lines for infill exact match (FIM/CLM decoders; 0 = skip)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Loss, perplexity and bits-per-byte of a run on held-out data (+ single-line infill
    exact match for FIM/CLM decoders); with NAME=PATH datasets
    or --baseline, the forgetting report (table, JSON, RUN/forgetting.png)."""
    from lmobjectives.evaluate.forgetting import format_table, forgetting_report, is_named, parse_datasets
    from lmobjectives.evaluate.run import evaluate_dir

    data = data or []
    if baseline is not None or len(data) > 1 or any(is_named(d) for d in data):
        report = forgetting_report(run_dir, parse_datasets(data), baseline, batches=batches, seq_len=seq_len)
        _print_json(report) if json_out else print(format_table(report))
        return
    res = evaluate_dir(run_dir, data=data[0] if data else None, n_batches=batches,
                       infill_samples=infill_samples)
    if json_out:
        _print_json(res)
    else:
        for k, v in res.items():
            if isinstance(v, dict):
                v = "  ".join(f"{kk}: {vv:.4f}" for kk, vv in v.items())
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")


@app.command()
def generate(
    run_dir: str = typer.Argument(..., help="A run directory (or an HF model directory)."),
    prompt: str = typer.Option("", help="Text to continue."),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    speculative: bool = typer.Option(False, help="Draft with the MTP heads, verify with the base model "
                                                 "(same output as plain decoding, fewer forward passes)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Continue a prompt with a KV cache (greedy by default)."""
    from lmobjectives.infer.api import generate_text

    res = generate_text(run_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, seed=seed, speculative=speculative)
    _print_json(res) if json_out else print(prompt + res["text"])


@app.command("fill-mask")
def fill_mask(
    run_dir: str = typer.Argument(..., help="An MLM run directory (or an HF encoder directory)."),
    text: str = typer.Option(..., help="Text with one or more <|mask|> tokens."),
    top_k: int = typer.Option(5, help="Candidates per mask."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Predict the tokens behind each <|mask|> of a text with an MLM encoder."""
    from lmobjectives.infer.fill_mask import fill_mask_text, render

    res = fill_mask_text(run_dir, text, top_k=top_k)
    _print_json(res) if json_out else print(render(res))


@app.command()
def infill(
    run_dir: str = typer.Argument(..., help="A run directory (or an HF model directory)."),
    prefix: Optional[str] = typer.Option(None, help="FIM: text before the gap."),
    suffix: Optional[str] = typer.Option(None, help="FIM: text after the gap."),
    mode: str = typer.Option("psm", help="FIM prompt order: psm or spm."),
    file: Optional[str] = typer.Option(None, help="FIM: fill a line of this file (with --line)."),
    line: Optional[int] = typer.Option(None, help="FIM: the 1-based line of --file to fill."),
    text: Optional[str] = typer.Option(None, help="Span/UL2 runs: text with <extra_id_0>, <extra_id_1>, ... gaps."),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Fill a gap: the middle between --prefix and --suffix (FIM decoders), a line of a file,
    or the <extra_id_N> spans of --text (span/UL2 runs)."""
    from lmobjectives.infer.api import infill as run_infill

    res = run_infill(run_dir, prefix=prefix, suffix=suffix, text=text, file=file, line=line,
                     mode=mode, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, seed=seed)
    if json_out:
        _print_json(res)
    elif res.get("file"):
        print(f"line {res['line']} (model): {res['middle']}")
        print(f"line {res['line']} (file):  {res['expected']}")
        print(f"exact match: {'yes' if res['exact_match'] else 'no'}")
    else:
        print(res["text"])


@app.command()
def export(
    checkpoint: str = typer.Argument(..., help="A checkpoint directory: RUN/checkpoints/step-NNNNNNN."),
    out: str = typer.Option(..., help="HF directory to write."),
) -> None:
    """Export a checkpoint as an HF model + tokenizer directory."""
    from lmobjectives.train.api import export_checkpoint

    if not any((Path(checkpoint) / f).is_file() for f in ("model.safetensors", ".metadata")):
        raise UserError(f"{checkpoint} is not a checkpoint directory (no model.safetensors or .metadata)")
    _say(f"exported {export_checkpoint(checkpoint, out)}")


@app.command()
def verify(
    run_dir: str = typer.Argument(..., help="A run directory (or one checkpoint directory)."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Check every checkpoint of a run against its SHA-256 checksums; exit 2 if any is damaged."""
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
        raise UserError(f"{len(bad)} of {len(checked)} checkpoint(s) in {run_dir} failed verification "
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


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def main() -> None:
    try:
        code = app(standalone_mode=False)  # a typer.Exit comes back as its code
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # A full disk, a quota, a read-only or forbidden path: the user's to fix, so one line
        # naming the path (checkpoints are written atomically: the previous ones are intact).
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(UserError.exit_code)
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
