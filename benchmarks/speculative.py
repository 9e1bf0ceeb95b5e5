"""Plain greedy decoding against exact self-speculative decoding with the MTP heads of a code
model: wall-clock tokens/s, forward passes, tokens per forward pass and acceptance per head,
side by side, with 1 .. n-1 draft heads used (Gloeckle et al. 2024 App. A Table S2 layout).
Every speculative output is checked token for token against plain greedy decoding.

Prompts are the first ``--prompt-tokens`` tokens of held-out (validation) documents of the
run's own store, so the model never trained on them.

    # train the default code model with MTP first (or pass --run DIR of an existing mtp run)
    PYTHONPATH=src python benchmarks/speculative.py --train-steps 200
    PYTHONPATH=src python benchmarks/speculative.py --run runs/mtp-code --json

Measured on 2 shared CPU cores, one thread, 8 held-out prompts x 96 tokens, greedy:

* small preset + 4 parallel heads (22.6 M), trained only 40 steps x 1,024 tokens of
  default:code (loss 7.0; longer training did not fit the shared CPUs): 27.5 -> 74.4 tok/s,
  2.70x, 3.84 tokens per forward, identical output. The model emits one token over and over,
  so every draft is accepted: this measures the machinery (a 4-token verify pass costs about
  1.4 one-token steps here), not the heads.
* tiny preset (0.9 M), 300 steps (loss 6.3): acceptance 0.80 / 0.68 / 0.67 for heads 2-4,
  2.64 tokens per forward, but 0.99x tokens/s — three head layers on a two-layer model and
  4-row matmuls on a CPU make a verify pass cost about 2.7 one-token steps.

Gloeckle et al. report 3.0x (3.5 tokens per forward) on code for a 7B model trained on 1T
tokens, on GPUs, where verifying 4 tokens costs about as much as decoding one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def train_default(out: Path, steps: int, seq_len: int, batch: int) -> Path:
    from lmobjectives.config import build_config
    from lmobjectives.train.job import train

    cfg = build_config({"objective": "mtp", "out": str(out), "model": {"preset": "small"},
                        "data": {"corpus": ["default:code"], "seq_len": seq_len},
                        "train": {"steps": steps, "batch_size": batch, "eval_every": 0}})
    return train(cfg, progress=True).run_dir


def held_out_prompts(run_dir: Path, n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` tokens spread evenly over the validation documents (a code
    store holds whole files, so a few documents give many prompts), EOS first as ``generate``
    does."""
    from lmobjectives.infer.load import load_model
    from lmobjectives.rundir import load_run_config
    from lmobjectives.train.setup import open_run

    run = open_run(load_run_config(run_dir), run_dir, progress=False)
    table = run.sources[0].store.split("val")
    if len(table.docs) == 0:
        table = run.sources[0].store.split("train")
    eos = load_model(run_dir).specials.eos
    docs = [np.asarray(table.document(i))[:-1] for i in range(len(table.docs))]
    docs = [d for d in docs if len(d) >= length]
    per_doc = -(-n // max(len(docs), 1))
    prompts = []
    for doc in docs:
        starts = np.linspace(0, len(doc) - length, num=per_doc).astype(int)
        prompts += [[eos] + doc[s:s + length].astype(int).tolist() for s in sorted(set(starts))]
    return prompts[:n]


def timed(fn, repeats: int):  # noqa: ANN001, ANN202 - best-of-repeats wall clock, and the result
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="An mtp run directory (default: train one).")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--train-seq-len", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="Timing: best of this many runs.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from lmobjectives.infer.generate import generate
    from lmobjectives.infer.load import load_model
    from lmobjectives.infer.speculative import speculative_generate
    from lmobjectives.models.mtp import MTPModel

    run_dir = args.run or train_default(Path("runs/bench-mtp-code"), args.train_steps,
                                        args.train_seq_len, args.train_batch)
    loaded = load_model(run_dir)
    model = loaded.model
    if not isinstance(model, MTPModel):
        sys.exit(f"{run_dir} is not an mtp run")
    prompts = held_out_prompts(run_dir, args.prompts, args.prompt_tokens)
    N = args.max_new_tokens
    # Stopping at EOS would give the two methods different lengths to time; generate N tokens.
    generate(model, prompts[0], max_new_tokens=4)  # warm-up
    plain_s, plain_tokens, plain_passes = [], [], []
    for p in prompts:
        s, g = timed(lambda: generate(model, p, max_new_tokens=N), args.repeats)
        plain_s.append(s)
        plain_tokens.append(g.tokens)
        plain_passes.append(g.forward_passes)
    rows = [{"method": "plain greedy", "heads": 1, "tokens_per_s": N * len(prompts) / sum(plain_s),
             "forward_passes": statistics.mean(plain_passes), "tokens_per_forward": 1.0,
             "identical": True, "speedup": 1.0, "acceptance": {}}]
    for k in range(1, model.n_heads):
        secs, passes, same, acc = [], [], [], []
        for p, want in zip(prompts, plain_tokens):
            s, g = timed(lambda: speculative_generate(model, p, max_new_tokens=N, max_drafts=k), args.repeats)
            secs.append(s)
            passes.append(g.forward_passes)
            same.append(g.tokens == want)
            acc.append(g.extras["acceptance"])
        rate = {h: statistics.mean(a[h] for a in acc) for h in acc[0]}
        rows.append({"method": "speculative", "heads": k + 1,
                     "tokens_per_s": N * len(prompts) / sum(secs),
                     "forward_passes": statistics.mean(passes),
                     "tokens_per_forward": N * len(prompts) / sum(passes), "identical": all(same),
                     "speedup": sum(plain_s) / sum(secs), "acceptance": rate})
    meta = {"run": str(run_dir), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "n_heads": model.n_heads, "design": model.spec.head_design, "prompts": len(prompts),
            "max_new_tokens": N, "threads": torch.get_num_threads(),
            "device": str(next(model.parameters()).device)}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    print(f"{meta['run']}: {meta['design']} MTP, n={meta['n_heads']}, {meta['params_m']:.1f} M params, "
          f"{len(prompts)} held-out prompts x {N} new tokens, greedy, {meta['threads']} threads")
    print(f"{'method':>13} {'heads':>5} {'tok/s':>7} {'speedup':>7} {'passes':>7} {'tok/pass':>8} "
          f"{'same':>5}  acceptance per head")
    for r in rows:
        acc = " ".join(f"{h}={v:.2f}" for h, v in r["acceptance"].items())
        print(f"{r['method']:>13} {r['heads']:>5} {r['tokens_per_s']:>7.1f} {r['speedup']:>7.2f} "
              f"{r['forward_passes']:>7.1f} {r['tokens_per_forward']:>8.2f} {str(r['identical']):>5}  {acc}")


if __name__ == "__main__":
    main()
