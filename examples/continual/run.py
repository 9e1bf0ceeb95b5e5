"""Continual pre-training in minutes on a CPU: pre-train a small base model on English prose,
continue it on Python code with 0% and 20% replay of the prose, and print how much each
arm gained on code and forgot of prose (bits per byte on held-out documents).

    python examples/continual/run.py                  # tiny preset, about 4 CPU-minutes
    python examples/continual/run.py --preset small   # the 17 M preset: slower, clearer

Data: the embedded default corpus, its two parts (``default:prose``, the pydoc topics, and
``default:code``, standard-library source), each prepared once as a token store with 10% of
the documents held out; the continual arms mix the stores with ``data.mix`` exactly as
``lmobj train --mix code/=0.8 --mix prose/=0.2`` does. Every arm starts from the base's
final weights with a fresh optimizer, re-warms over 1% of its steps to the base's peak
learning rate and decays with cosine (the library defaults for ``--init-from``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmobjectives.config import build_config
from lmobjectives.evaluate.forgetting import forgetting_report
from lmobjectives.store.prepare import prepare_store
from lmobjectives.store.store import TokenStore
from lmobjectives.tokenizer import load_tokenizer
from lmobjectives.train.job import train

VAL_FRACTION = 0.1  # held-out documents per part: the forgetting table scores only these


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def store(out: Path, part: str) -> str:
    path = out / "stores" / part
    if not (path / "manifest.json").is_file():
        prepare_store([f"default:{part}"], load_tokenizer(None), path, val_fraction=VAL_FRACTION,
                      progress=False)
    m = TokenStore(path).manifest["splits"]
    say(f"store {part}: train {m['train']['tokens']} tokens, held out {m['val']['documents']} documents")
    return str(path)


def run(out: Path, name: str, tree: dict) -> Path:
    run_dir = out / name
    if (run_dir / "final" / "config.json").is_file():
        say(f"{name}: already trained, reusing {run_dir}")
        return run_dir
    tree = {**tree, "out": str(run_dir)}
    result = train(build_config(tree), overwrite=True, progress=False, say=say)
    say(f"{name}: train loss {result.final.get('loss', float('nan')):.3f} after {result.final.get('step')} steps")
    return run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/continual-example")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--cpt-steps", type=int, default=150)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--replay", type=float, nargs="+", default=[0.0, 0.2])
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prose, code = store(out, "prose"), store(out, "code")
    common = {"data": {"seq_len": args.seq_len, "val_fraction": VAL_FRACTION},
              "train": {"batch_size": args.batch_size, "eval_every": 0, "checkpoint_every": 0}}
    base = run(out, "base", {**common, "model": {"preset": args.preset},
                             "data": {**common["data"], "store": prose},
                             "train": {**common["train"], "steps": args.base_steps}})
    arms = {}
    for r in args.replay:
        mix = [{"path": code, "weight": 1.0 - r}] + ([{"path": prose, "weight": r}] if r > 0 else [])
        arms[f"{round(100 * r)}% replay"] = run(out, f"cpt-replay{round(100 * r)}", {
            **common, "model": {"init_from": str(base)}, "data": {**common["data"], "mix": mix},
            "train": {**common["train"], "steps": args.cpt_steps}})
    datasets = {"prose": prose, "code": code}
    reports = {"base (prose only)": forgetting_report(base, datasets, base, batches=args.eval_batches)}
    for name, run_dir in arms.items():
        reports[name] = forgetting_report(run_dir, datasets, base, batches=args.eval_batches)
    print(f"\nheld-out bits per byte (lower is better); baseline = the base model; "
          f"preset {args.preset}, seq_len {args.seq_len}")
    print(f"{'arm':<20}{'prose bpb':>10}{'code bpb':>10}{'prose retention':>17}{'code gain':>11}")
    for name, rep in reports.items():
        p, c = rep["datasets"]["prose"], rep["datasets"]["code"]
        print(f"{name:<20}{p['bpb']:>10.3f}{c['bpb']:>10.3f}{p['retention']:>17.3f}{c['gain']:>+11.3f}")
    summary = {name: {k: {"bpb": v["bpb"], "baseline_bpb": v["baseline_bpb"], "retention": v["retention"],
                          "gain": v["gain"]} for k, v in rep["datasets"].items()}
               for name, rep in reports.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nper-arm reports and charts: {out}/*/forgetting.json, forgetting.png")


if __name__ == "__main__":
    main()
