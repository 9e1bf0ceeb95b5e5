"""``lmobj eval``, ``generate``, ``fill-mask`` and ``infill``: using a trained model."""

from __future__ import annotations

from typing import List, Optional

import typer

from lmobjectives.cli.common import _print_json, _say, app


# ------------------------------------------------------------------------------------ use
@app.command("eval")
def eval_(
    run_dir: str = typer.Argument(..., help="A run directory."),
    data: Optional[List[str]] = typer.Option(None, help="PATH, or NAME=PATH (repeatable): stores or corpora to evaluate on (default: the run's validation split)."),
    baseline: Optional[str] = typer.Option(None, help="Run or HF model dir to compare with: per-dataset gain and retention (forgetting report)."),
    batches: int = typer.Option(16, help="Validation batches (per dataset)."),
    seq_len: Optional[int] = typer.Option(None, help="Row length for the forgetting report (default: the run's)."),
    infill_samples: int = typer.Option(20, help="Held-out lines for infill exact match (FIM/CLM decoders; 0 = skip)."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-eval-harness tasks instead: names or task YAML paths, comma-separated (e.g. hellaswag,arc_easy,piqa)."),
    lm_eval_limit: Optional[int] = typer.Option(None, "--lm-eval-limit", help="At most this many examples per lm-eval task."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Loss, perplexity and bits-per-byte of a run on held-out data (+ single-line infill
    exact match for FIM/CLM decoders); with NAME=PATH datasets
    or --baseline, the forgetting report (table, JSON, RUN/forgetting.png)."""
    from lmobjectives.evaluate.forgetting import format_table, forgetting_report, is_named, parse_datasets
    from lmobjectives.evaluate.run import evaluate_dir

    if lm_eval is not None:
        _lm_eval(run_dir, lm_eval, lm_eval_limit, json_out)
        return
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


def _lm_eval(run_dir: str, tasks: str, limit: Optional[int], json_out: bool) -> None:
    from lmobjectives.evaluate.lm_eval import format_results, run_lm_eval

    res = run_lm_eval(run_dir, [t.strip() for t in tasks.split(",") if t.strip()], limit=limit)
    if json_out:
        _print_json({k: res.get(k) for k in ("results", "groups", "versions", "n-shot", "path") if k in res})
    else:
        print(format_results(res))
        _say(f"wrote {res['path']}")


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
