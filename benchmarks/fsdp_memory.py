"""Peak memory per process while the model is built: one process building it whole, against
2 FSDP processes that build it on the meta device and materialise it block by block
(``models.init.materialise`` via ``train.distributed.shard_model``), and against 2 FSDP
processes that build it whole and shard it afterwards (what FSDP did before the meta build).

Each configuration runs in fresh processes (the 2-process ones under ``torchrun``, gloo on
CPU). The number is the process's peak resident set (``VmHWM``), reset through
``/proc/self/clear_refs`` once torch, transformers and the process group are set up, minus
the resident set at that point: what building the model added at its peak. The fp32
parameter bytes of the whole model are printed beside it for scale.

    PYTHONPATH=src python benchmarks/fsdp_memory.py                  # base preset
    PYTHONPATH=src python benchmarks/fsdp_memory.py --preset small --json

Measured on a CPU (base preset, 119.6 M parameters = 456 MiB in fp32; peak MiB added per
process): one process 458; FSDP built on meta, 2 processes: 255 and 256 (0.56x: half the
model plus the largest block, 36 MiB, in full); FSDP built whole then sharded (the former
way): 477 on each process (1.04x).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from proc_memory import status_kib

MiB = 1 << 20
MODES = ("one", "fsdp-meta", "fsdp-full")
# glibc raises its mmap threshold to the size of any mmapped block that is freed, after which
# a block of that size comes from the heap and stays resident when freed: the resident set
# would then show the allocator's history, not what the build holds. A fixed threshold (every
# mode runs with it) returns each freed unit to the system.
MMAP_THRESHOLD = 1 << 16


def _reset_peak() -> int:
    """Reset the peak resident set to the current one; returns it in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


def measure(mode: str, preset: str, seed: int) -> dict:
    """Build ``preset`` in this process as ``mode`` says; peak and baseline in MiB."""
    import torch

    from lmobjectives.models.presets import build_model, count_parameters
    from lmobjectives.tokenizer.special import SpecialIds
    from lmobjectives.train.distributed import init_world, shard_model

    torch.set_num_threads(1)
    world = init_world()
    specials = SpecialIds.default(vocab_size=8192)
    # Warm-up build of the smallest preset: transformers' lazy imports and torch's allocator
    # caches are paid before the baseline, not counted against the first mode.
    build_model("tiny", "decoder", specials, max_positions=64, seed=seed)
    base = _reset_peak()
    if mode == "one":
        model = build_model(preset, "decoder", specials, max_positions=2048, seed=seed)
    else:
        model = build_model(preset, "decoder", specials, max_positions=2048, seed=seed, meta=mode == "fsdp-meta")
        shard_model(model, bf16=False, seed=seed)
    peak = status_kib("VmHWM")
    n = count_parameters(model)
    world.close()
    return {"mode": mode, "rank": world.rank, "world_size": world.world_size, "parameters": n,
            "param_mib": n * 4 / MiB, "baseline_mib": base / 1024, "peak_above_baseline_mib": (peak - base) / 1024}


def _run(mode: str, preset: str, seed: int) -> list[dict]:
    """Run one mode in fresh processes: one plain process, or 2 under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank{rank}.json"
        worker = [__file__, "--worker", mode, "--preset", preset, "--seed", str(seed), "--out", str(out)]
        cmd = ([sys.executable, *worker] if mode == "one" else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *worker])
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = measure(args.worker, args.preset, args.seed)
        Path(args.out.format(rank=result["rank"])).write_text(json.dumps(result))
        return
    rows = [r for mode in MODES for r in _run(mode, args.preset, args.seed)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"building preset {args.preset!r}: {rows[0]['parameters'] / 1e6:.1f} M parameters, "
          f"{rows[0]['param_mib']:.0f} MiB in fp32; peak resident set added by the build, per process")
    print(f"{'mode':<12} {'processes':>9} {'rank':>4} {'peak MiB':>9} {'x one process':>14}")
    one = rows[0]["peak_above_baseline_mib"]
    for r in rows:
        print(f"{r['mode']:<12} {r['world_size']:>9} {r['rank']:>4} {r['peak_above_baseline_mib']:>9.0f} "
              f"{r['peak_above_baseline_mib'] / one:>14.2f}")


if __name__ == "__main__":
    main()
