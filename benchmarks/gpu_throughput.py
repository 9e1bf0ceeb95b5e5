"""Training throughput and MFU of one preset on one CUDA GPU: bf16 autocast, eager and
``torch.compile``, synthetic packed rows. The step is the library's: ``StandardModule``
(forward, token cross-entropy summed outside the model, backward) and fused AdamW.

    python benchmarks/gpu_throughput.py [--preset base] [--batch-size 32|auto] [--seq-len 1024] [--steps 20]
        [--loss-chunks 1|N|auto] [--fsdp]

``--batch-size auto`` doubles the batch (eager, one step each) until the GPU runs out of
memory and measures at the largest that fitted. ``--fsdp`` shards the model with the
library's FSDP2 wrapping (``train.distributed.shard_model``) in a process group of one, to
see what the sharding machinery costs on one GPU.

Prints one table row per mode and a JSON line. FLOPs per token follow PaLM (Chowdhery et al.
2022, appendix B): ``6 * N + 12 * L * d * T``, with ``N`` the parameters that take part in
matmuls (the tied output head counts once, the embedding lookup does not). MFU is given
against the data-sheet dense bf16 peak of known GPUs and against this GPU's measured bf16
matmul peak. Takes about 1-3 minutes, most of it compiling.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lmobjectives.data.converters import to_decoder
from lmobjectives.models.presets import build_model
from lmobjectives.objectives.base import Rows
from lmobjectives.objectives.clm import CLM
from lmobjectives.tokenizer.special import SpecialIds
from lmobjectives.runtime import to_torch
from lmobjectives.step import StandardModule

# Dense bf16 peak, FLOP/s, from the vendors' data sheets (no sparsity).
DATASHEET_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
VOCAB = 8192  # the shipped tokenizer's size


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if getattr(cfg, "tie_word_embeddings", False):
        matmul_params += model.get_input_embeddings().weight.numel()  # the head's matmul
    return 6 * matmul_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def measured_matmul_peak(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def synthetic_batch(batch: int, seq_len: int, specials: SpecialIds, device: str = "cuda",
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Packed rows of random documents (mean length 300 tokens), as the loader would serve."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(len(specials.sentinels) + 10, VOCAB, size=(batch, seq_len), dtype=np.int32)
    tokens[rng.random((batch, seq_len)) < 1 / 300] = specials.eos  # document ends
    rows = Rows.from_tokens(tokens, specials.eos)
    return to_torch(to_decoder(CLM(specials=specials)(rows, rng), specials), torch.device(device))


def time_steps(module: StandardModule, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               warmup: int, steps: int) -> tuple[float, float]:
    """(seconds per step, seconds spent in the warm-up steps)."""
    totals = torch.tensor([float((batch["labels"][:, 1:] != -100).sum())], device=batch["labels"].device)

    def step() -> None:
        module.forward_backward(batch, totals)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, warm


def build(args: argparse.Namespace, specials: SpecialIds, compiled: bool):  # noqa: ANN201
    """(model, optimizer, module) on the GPU, sharded with FSDP2 when ``--fsdp``."""
    model = build_model(args.preset, "decoder", specials, max_positions=args.seq_len, seed=0).cuda()
    model.config.use_cache = False
    if args.fsdp:
        import torch.distributed as dist

        from lmobjectives.train.distributed import shard_model

        if not dist.is_initialized():
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        shard_model(model, bf16=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=not args.fsdp)
    module = StandardModule(torch.compile(model) if compiled else model, "decoder", bf16=True,
                            loss_chunks=args.loss_chunks)
    return model, optimizer, module


def largest_batch(args: argparse.Namespace, specials: SpecialIds, start: int = 8, cap: int = 1024) -> int:
    """The largest power-of-two batch (rows) whose eager step fits in GPU memory."""
    fits, batch = 0, start
    while batch <= cap:
        try:
            model, optimizer, module = build(args, specials, compiled=False)
            time_steps(module, optimizer, synthetic_batch(batch, args.seq_len, specials), warmup=0, steps=1)
            fits = batch
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            model = optimizer = module = None
            torch.cuda.empty_cache()
        batch *= 2
    if not fits:
        raise SystemExit(f"not even a batch of {start} rows fits")
    print(f"largest batch that fits (eager): {fits} rows", flush=True)
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch-size", default="32", help="rows per step, or auto")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--loss-chunks", default="1", help="train.loss_chunks: 1, N or auto")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 in a group of one")
    parser.add_argument("--no-eager", action="store_true", help="measure the compiled model only")
    parser.add_argument("--no-compile", action="store_true", help="measure the eager model only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    args.loss_chunks = args.loss_chunks if args.loss_chunks == "auto" else int(args.loss_chunks)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak_sheet = next((v for k, v in DATASHEET_PEAK.items() if k in name), None)
    peak_measured = measured_matmul_peak()
    specials = SpecialIds.default(vocab_size=VOCAB)
    batch_size = largest_batch(args, specials) if args.batch_size == "auto" else int(args.batch_size)
    tokens_per_step = batch_size * args.seq_len
    results = []
    modes = [m for m, off in (("eager", args.no_eager), ("compiled", args.no_compile)) if not off]
    for mode in modes:
        model, optimizer, module = build(args, specials, compiled=mode == "compiled")
        fpt = flops_per_token(model, args.seq_len)
        torch.cuda.reset_peak_memory_stats()
        try:
            sec, warm = time_steps(module, optimizer, synthetic_batch(batch_size, args.seq_len, specials),
                                   warmup=3, steps=args.steps)
        except torch.cuda.OutOfMemoryError:
            print(f"{mode}: out of memory at batch {batch_size}", flush=True)
            model = optimizer = module = None
            torch.cuda.empty_cache()
            continue
        tps = tokens_per_step / sec
        results.append({
            "mode": mode + ("+fsdp" if args.fsdp else ""), "gpu": name, "preset": args.preset,
            "batch_size": batch_size, "loss_chunks": args.loss_chunks,
            "seq_len": args.seq_len, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "tokens_per_second": round(tps), "step_ms": round(sec * 1e3, 1), "warmup_s": round(warm, 1),
            "model_tflops": round(tps * fpt / 1e12, 1),
            "mfu_datasheet": round(tps * fpt / peak_sheet, 4) if peak_sheet else None,
            "mfu_measured_peak": round(tps * fpt / peak_measured, 4),
            "matmul_peak_tflops": round(peak_measured / 1e12, 1),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        del model, module, optimizer
        torch.cuda.empty_cache()
    print(f"preset {args.preset}, batch {batch_size} x {args.seq_len}, loss_chunks {args.loss_chunks}")
    print("| mode          | tokens/s  | step ms | model TFLOP/s | MFU (data sheet) | MFU (measured peak) | max GiB |")
    print("|---------------|-----------|---------|---------------|------------------|---------------------|---------|")
    for r in results:
        sheet = f"{r['mfu_datasheet']:.1%}" if r["mfu_datasheet"] is not None else "n/a"
        print(f"| {r['mode']:<13} | {r['tokens_per_second']:>9,} | {r['step_ms']:>7} | {r['model_tflops']:>13} "
              f"| {sheet:>16} | {r['mfu_measured_peak']:>19.1%} | {r['max_memory_gib']:>7} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
