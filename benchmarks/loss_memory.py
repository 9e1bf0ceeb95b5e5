"""Peak memory and speed of the output head + loss, forward and backward: today's one-piece
path (full (B·T, V) logits, ``loss.token_nll_sum``) against the chunked linear cross-entropy
(``loss.chunked_nll_sum``), at vocabularies of 8 K, 32 K and 128 K ids, B·T = 8 K positions,
hidden size 1024.

Each case runs in a fresh process so that peaks do not mix. On a GPU the number is
``torch.cuda.max_memory_allocated`` above the inputs (hidden states, weight, labels); on a
CPU it is the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
once the inputs exist) above the resident set at that point, with glibc returning every large
block on free (a fixed mmap threshold) so that RSS follows live tensors — torch keeps no peak
statistics of its CPU allocator. Both include the weight's gradient (V x d fp32), which every
path allocates. A case that needs more than ``--limit-gib`` of address space fails cleanly
(RLIMIT_AS) rather than calling the kernel's OOM killer on a shared machine.

    PYTHONPATH=src python benchmarks/loss_memory.py --interleave 2     # fp32, chunks = auto
    PYTHONPATH=src python benchmarks/loss_memory.py --dtype bf16 --repeats 5   # on a GPU

Measured on a CPU (2 AMD EPYC cores, otherwise idle; fp32; peak MiB above the inputs, today
/ chunked, ``--interleave 2``): V = 8 K: 786 / 467 (0.59x, 2 chunks); V = 32 K: 3090 / 563
(0.18x, 8 chunks); V = 128 K: 12306 / 1202 (0.10x, 32 chunks). Tokens/s chunked / today, both
alternating in one process, best of 2: 0.97 at 8 K, 1.03 at 32 K, 1.06 at 128 K.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from proc_memory import status_kib

MiB = 1 << 20


def _case(path: str, vocab: int, rows: int, hidden: int, chunks: str, dtype: str):  # noqa: ANN202
    """(device, one forward+backward of ``path``, chunk count) on fresh inputs."""
    import torch
    import torch.nn.functional as F

    from lmobjectives.loss import chunked_nll_sum, resolve_chunks, token_nll_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    T = min(rows, 1024)
    B = rows // T
    h = (torch.randn(B, T, hidden, device=device) * 0.5).requires_grad_(True)  # (B, T, d)
    w = torch.nn.Parameter(torch.randn(vocab, hidden, device=device) * hidden ** -0.5)  # (V, d)
    labels = torch.randint(0, vocab, (B, T), device=device)
    n = resolve_chunks(chunks if chunks == "auto" else int(chunks), rows, vocab) if path == "chunked" else 1
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step() -> None:
        with amp:
            if path == "chunked":
                nll, _ = chunked_nll_sum(h, w, None, labels, True, n)
            else:
                nll, _, _ = token_nll_sum(F.linear(h, w), labels, True)  # (B, T, V) logits
        (nll / rows).backward()
        h.grad = w.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    return device, step, n


def one(path: str, vocab: int, rows: int, hidden: int, chunks: str, dtype: str, repeats: int) -> dict:
    """Peak memory of one case in this process (``repeats`` forward+backward passes)."""
    import torch

    device, step, n = _case(path, vocab, rows, hidden, chunks, dtype)
    if device.type == "cuda":
        step()  # warm-up: kernels, cuBLAS workspaces
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = status_kib("VmRSS") * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else status_kib("VmHWM") * 1024
    return {"path": path, "vocab": vocab, "rows": rows, "hidden": hidden, "chunks": n, "dtype": dtype,
            "device": device.type, "peak_mib": (peak - base) / MiB, "seconds": min(times),
            "tokens_per_s": rows / min(times)}


def interleaved(vocab: int, rows: int, hidden: int, chunks: str, dtype: str, repeats: int) -> dict:
    """Best time of each path, the two alternating in one process, so that a machine shared
    with other work slows both alike."""
    steps = {p: _case(p, vocab, rows, hidden, chunks, dtype)[1] for p in ("today", "chunked")}
    best = {p: float("inf") for p in steps}
    for _ in range(repeats):
        for p, step in steps.items():
            start = time.perf_counter()
            step()
            best[p] = min(best[p], time.perf_counter() - start)
    return {f"{p}_tokens_per_s": rows / best[p] for p in steps}


def run_case(args: argparse.Namespace, path: str, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--one", path, str(vocab), "--rows", str(args.rows),
           "--hidden", str(args.hidden), "--chunks", args.chunks, "--dtype", args.dtype,
           "--repeats", str(args.repeats), "--limit-gib", str(args.limit_gib)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"path": path, "vocab": vocab, "failed": tail[:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [f"{'V':>7} {'today MiB':>10} {'chunked MiB':>12} {'ratio':>6} {'chunks':>6} "
             f"{'today tok/s':>12} {'chunked tok/s':>14} {'speed':>6}"]
    for vocab in sorted({r["vocab"] for r in rows}):
        a = next(r for r in rows if r["vocab"] == vocab and r["path"] == "today")
        b = next(r for r in rows if r["vocab"] == vocab and r["path"] == "chunked")
        if "failed" in a or "failed" in b:
            lines.append(f"{vocab:>7} failed: {a.get('failed') or b.get('failed')}")
            continue
        lines.append(f"{vocab:>7} {a['peak_mib']:>10.0f} {b['peak_mib']:>12.0f} "
                     f"{b['peak_mib'] / a['peak_mib']:>6.3f} {b['chunks']:>6} {a['tokens_per_s']:>12.0f} "
                     f"{b['tokens_per_s']:>14.0f} {b['tokens_per_s'] / a['tokens_per_s']:>6.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", default="8192,32768,131072")
    ap.add_argument("--rows", type=int, default=8192, help="B*T positions")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--chunks", default="auto")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--limit-gib", type=float, default=16.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--interleave", type=int, default=0, metavar="REPEATS",
                    help="also time both paths alternating in one process, best of REPEATS each")
    ap.add_argument("--one", nargs=2, metavar=("PATH", "VOCAB"), help=argparse.SUPPRESS)
    ap.add_argument("--timing", type=int, metavar="VOCAB", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.timing:
        print(json.dumps(interleaved(args.timing, args.rows, args.hidden, args.chunks, args.dtype,
                                     args.interleave)))
        return
    if args.one:
        if args.limit_gib > 0:  # 0: no limit (CUDA reserves far more address space than it uses)
            limit = int(args.limit_gib * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(json.dumps(one(args.one[0], int(args.one[1]), args.rows, args.hidden, args.chunks,
                             args.dtype, args.repeats)))
        return
    results = [run_case(args, path, int(v)) for v in args.vocabs.split(",") for path in ("today", "chunked")]
    if args.interleave:
        for v in args.vocabs.split(","):
            cmd = [sys.executable, __file__, "--timing", v, "--rows", str(args.rows), "--hidden",
                   str(args.hidden), "--chunks", args.chunks, "--dtype", args.dtype,
                   "--interleave", str(args.interleave)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            timing = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
            for r in results:
                if r["vocab"] == int(v) and f"{r['path']}_tokens_per_s" in timing:
                    r["tokens_per_s"] = timing[f"{r['path']}_tokens_per_s"]
                    r["timing"] = f"interleaved, best of {args.interleave}"
    if args.json:
        print(json.dumps(results, indent=2))
        return
    dev = next((r["device"] for r in results if "device" in r), "?")
    print(f"head + loss fwd+bwd, B*T = {args.rows}, hidden {args.hidden}, {args.dtype}, device {dev}, "
          f"peak MiB above the inputs; tokens/s best of "
          f"{f'{args.interleave}, both paths alternating in one process' if args.interleave else args.repeats}")
    print(table(results))


if __name__ == "__main__":
    main()
