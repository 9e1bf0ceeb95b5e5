"""Peak memory of one multi-token-prediction training step: n = 1, 2, 4 heads, the
sequential per-head backward (ours, Gloeckle et al. 2024 §2 Fig. 2) against the naive one
(every head's logits alive, one backward).

Each configuration runs in a fresh process so that peaks do not mix. On a GPU the number is
``torch.cuda.max_memory_allocated`` above the model + batch baseline; on a CPU it is the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the
model is built) above the resident set before the step. Both include the parameter gradients
the step allocates, so the extra heads' own weights and gradients count against n = 4.

    PYTHONPATH=src python benchmarks/mtp_memory.py            # small preset, B=8, T=256
    PYTHONPATH=src python benchmarks/mtp_memory.py --json

Measured on a CPU (small preset, batch 8 x 256, peak MiB above the baseline; ours / naive):
parallel n = 1: 726 / 726, n = 2: 747 / 858, n = 4: 758 (1.04x n = 1) / 1119 (1.54x);
sequential (``--design sequential``) n = 2: 810 / 876, n = 4: 857 (1.18x) / 1173 (1.62x).
Step time is about the same for both strategies (Gloeckle Table S5: "at no expense in runtime").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from proc_memory import status_kib

MiB = 1 << 20


def one(n_heads: int, strategy: str, design: str, preset: str, batch: int, seq_len: int, seed: int) -> dict:
    """Measure one configuration in this process."""
    import numpy as np
    import torch

    from lmobjectives.data.converters import to_decoder
    from lmobjectives.models.mtp import MTPModel, MTPSpec, init_heads
    from lmobjectives.models.presets import build_model
    from lmobjectives.objectives.base import Rows
    from lmobjectives.objectives.mtp import MTP
    from lmobjectives.tokenizer.special import SpecialIds
    from lmobjectives.runtime import to_torch
    from lmobjectives.step.mtp import MTPModule

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    specials = SpecialIds.default(vocab_size=8192)
    lm = build_model(preset, "decoder", specials, max_positions=2 * seq_len, seed=seed)
    model = MTPModel(lm, MTPSpec(n_heads, design))
    init_heads(model, seed + 1)
    model.to(device).train()
    objective = MTP(specials=specials, n_heads=n_heads, head_design=design)
    module = MTPModule(model, objective, strategy=strategy)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(300, specials.vocab_size, size=(batch, seq_len))
    tokens[:, ::97] = specials.eos  # a few packed documents per row
    np_batch = to_decoder(objective(Rows.from_tokens(tokens, specials.eos), rng), specials)
    totals = torch.as_tensor(module.counts(np_batch), dtype=torch.float32, device=device)
    tensors = to_torch(np_batch, device)
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    module.forward_backward(tensors, totals)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = status_kib("VmHWM") * 1024
    seconds = time.perf_counter() - start
    return {"n_heads": n_heads, "strategy": strategy, "design": design, "device": device.type,
            "params_m": params / 1e6, "peak_extra_mib": (peak - base) / MiB, "step_seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--design", default="parallel", choices=("parallel", "sequential"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--heads", default="1,2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("N_HEADS", "STRATEGY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.design, args.preset, args.batch,
                             args.seq_len, args.seed)))
        return
    rows = []
    for n in (int(x) for x in args.heads.split(",")):
        for strategy in ("sequential", "naive"):
            cmd = [sys.executable, __file__, "--one", str(n), strategy, "--design", args.design,
                   "--preset", args.preset, "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                   "--seed", str(args.seed)]
            # A fixed mmap threshold makes glibc return every large tensor's memory on free (its
            # default adapts the threshold upwards and keeps freed blocks), so RSS tracks live tensors.
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = {r["strategy"]: r["peak_extra_mib"] for r in rows if r["n_heads"] == min(r["n_heads"] for r in rows)}
    for r in rows:
        r["vs_n1_ours"] = r["peak_extra_mib"] / ref["sequential"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"preset {args.preset}, {args.design} heads, batch {args.batch} x {args.seq_len} tokens, "
          f"device {rows[0]['device']}")
    print(f"{'n':>3} {'strategy':>10} {'params M':>9} {'peak MiB':>9} {'x n=1 ours':>11} {'step s':>7}")
    for r in rows:
        name = "ours" if r["strategy"] == "sequential" else "naive"
        print(f"{r['n_heads']:>3} {name:>10} {r['params_m']:>9.1f} {r['peak_extra_mib']:>9.0f} "
              f"{r['vs_n1_ours']:>11.2f} {r['step_seconds']:>7.2f}")


if __name__ == "__main__":
    main()
