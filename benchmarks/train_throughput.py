"""Training throughput, side by side in one process: `lmobj`'s step against a plain PyTorch
loop over the same HF model (``model(input_ids, labels=...)``, AdamW, clipping) and, with
``--trainer``, transformers' `Trainer` (needs `accelerate`: ``pip install accelerate``). Same
model config, batch and sequence length, fp32; the runs alternate so that all see the same
machine load. Reports tokens/s, the ratio to the plain loop, and MFU against the fp32 matmul
peak measured in the same process, FLOPs counted with the (tied) head and attention.

    python benchmarks/train_throughput.py --preset tiny --preset d128-l4 [--batch 16] [--seq-len 128]
    python benchmarks/train_throughput.py --preset small --batch 8 --seq-len 256 --trainer
    python benchmarks/train_throughput.py --objective mlm --preset tiny --preset d128-l4
    python benchmarks/train_throughput.py --preset tiny --prefetch  # adds lmobj, prefetch on

``--objective mlm`` trains the ModernBERT encoder on BERT masking instead of the Llama decoder
on next tokens: the plain loop is then ``model(input_ids, attention_mask, labels)`` of the HF
masked-LM class (full-vocabulary head on every position), and the MFU counts the head on the
scored tokens only, the FLOPs an MLM step needs.

Targets (issue 14): >= 1.5x the plain loop and >= 45% of the peak at `tiny` and at the size
the default job picks; >= 1.0x `Trainer` at `small`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmobjectives.config import build_config
from lmobjectives.data.loader import PackedSource
from lmobjectives.models.presets import build_model, count_parameters
from lmobjectives.store.store import TokenStore, write_store
from lmobjectives.tokenizer.special import SpecialIds
from lmobjectives.train.batches import compute_threads
from lmobjectives.train.loop import Trainer
from lmobjectives.step import StandardModule
from lmobjectives.spec import Source
from lmobjectives.train.setup import Run


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Best fp32 matmul FLOP/s on this machine (the MFU denominator)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


# Architecture and the share of positions the loss scores, per benchmarked objective.
OBJECTIVES = {"clm": ("decoder", 1.0), "mlm": ("encoder", 0.15)}  # BERT §3.1: 15 % selected


def make_objective(name: str, specials: SpecialIds):  # noqa: ANN201
    from lmobjectives.objectives import CLM, MLM

    return {"clm": CLM, "mlm": MLM}[name](specials=specials)


def flops_per_token(model, seq_len: int, head_share: float = 1.0) -> float:  # noqa: ANN001
    """6N for the matmuls (embedding lookup excluded, tied unembedding included, on the
    ``head_share`` of positions that are scored) plus attention's 12·layers·d·T (the PaLM
    appendix B count)."""
    cfg = model.config
    n = count_parameters(model) - cfg.vocab_size * cfg.hidden_size  # no lookup FLOPs
    n += head_share * cfg.vocab_size * cfg.hidden_size  # but the tied unembedding is a matmul
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def random_store(vocab: int, n_docs: int = 400, seed: int = 0) -> TokenStore:
    """A real token store of random documents (50-2,000 tokens), in a temporary directory."""
    from lmobjectives.tokenizer import load_tokenizer, tokenizer_fingerprint

    rng = np.random.default_rng(seed)
    docs = [(f"doc {i}", rng.integers(200, vocab, rng.integers(50, 2000))) for i in range(n_docs)]
    out = Path(tempfile.mkdtemp(prefix="lmobj-bench-")) / "store"
    write_store(out, iter(docs), vocab_size=vocab, eos=0,
                tokenizer_fingerprint=tokenizer_fingerprint(load_tokenizer(None)), sources={})
    return TokenStore(out)


def ours_step_times(preset: str, batch: int, seq_len: int, steps: int, specials: SpecialIds,
                    table: TokenStore, compile: bool = False, objective: str = "clm",
                    prefetch: str | bool = "auto") -> list[float]:
    from lmobjectives.tokenizer import load_tokenizer

    architecture = OBJECTIVES[objective][0]
    cfg = build_config({"objective": objective, "model": {"preset": preset, "precision": "fp32"},
                        "data": {"seq_len": seq_len, "prefetch": prefetch},
                        "train": {"steps": steps + 2, "batch_size": batch}})
    model = build_model(preset, architecture, specials, seq_len * 2, seed=0)
    model.config.use_cache = False
    run = Run(cfg=cfg, dir=Path(tempfile.mkdtemp(prefix="lmobj-bench-")), tokenizer=load_tokenizer(None),
              specials=specials,
              sources=[Source("bench", table, 1.0)], objective=make_objective(objective, specials),
              architecture=architecture, model=model,
              model_with_loss=StandardModule(torch.compile(model) if compile else model, architecture),
              device=torch.device("cpu"), bf16=False)
    trainer = Trainer(run, progress=False)
    threads = torch.get_num_threads()
    # as `lmobj train` does: with a preparation thread on CPU, compute gets a core less
    torch.set_num_threads(compute_threads(threads, trainer.batches.background, run.device))
    times = []
    try:
        for _ in range(steps + 2):
            t = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return times[2:]  # the first steps warm allocators and kernels


def plain_inputs(objective: str, rows, specials: SpecialIds, index: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """HF's own inputs for ``rows``: the tokens as their own labels (the model shifts them), or
    BERT-masked inputs with labels on the selected tokens."""
    x = torch.from_numpy(rows.tokens.astype(np.int64))
    if objective == "clm":
        return {"input_ids": x, "labels": x}
    f = make_objective(objective, specials)(rows, np.random.default_rng([0, index]))
    return {"input_ids": torch.from_numpy(f.inputs.astype(np.int64)), "attention_mask": torch.ones_like(x),
            "labels": torch.from_numpy(np.where(f.target_mask, f.targets, -100).astype(np.int64))}


def plain_step_times(preset: str, batch: int, seq_len: int, steps: int, specials: SpecialIds,
                     table: TokenStore, compile: bool = False, objective: str = "clm") -> list[float]:
    """The loop a user would write: HF's own loss, AdamW, clipping, rows from the same store."""
    model = build_model(preset, OBJECTIVES[objective][0], specials, seq_len * 2, seed=0)
    model.config.use_cache = False
    src = PackedSource(table.split("train"), seq_len, seed=0, pad=specials.pad)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    fwd = torch.compile(model) if compile else model
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        rows = src.rows(np.arange(i * batch, (i + 1) * batch))
        loss = fwd(**plain_inputs(objective, rows, specials, i)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[2:]


def hf_step_times(preset: str, batch: int, seq_len: int, steps: int, specials: SpecialIds,
                  table: TokenStore, compile: bool = False, objective: str = "clm") -> list[float]:
    import transformers as tf

    model = build_model(preset, "decoder", specials, seq_len * 2, seed=0)
    src = PackedSource(table.split("train"), seq_len, seed=0, pad=specials.pad)
    rows = src.rows(np.arange((steps + 2) * batch)).tokens.astype(np.int64)
    data = [{"input_ids": r, "labels": r} for r in rows]
    times: list[float] = []

    class Timer(tf.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):  # noqa: ANN001,ANN003
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # noqa: ANN001,ANN003
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = tf.TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps + 2,
            learning_rate=3e-3, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
            lr_scheduler_type="cosine", warmup_steps=1, logging_steps=10**6, save_strategy="no",
            report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
            torch_compile=compile)
        trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[Timer()])
        trainer.train()
    return times[2:]


def bench(preset: str, args: argparse.Namespace, specials: SpecialIds, table: TokenStore,
          peak: float) -> list[tuple[str, float, float]]:
    """(name, s/step median, MFU) for each side, alternating rounds."""
    sides = {"plain PyTorch loop": plain_step_times, "lmobj": ours_step_times}
    if args.prefetch:
        sides["lmobj, prefetch on"] = functools.partial(ours_step_times, prefetch=True)
    if args.trainer:
        sides["transformers Trainer"] = hf_step_times
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):  # alternate, so all see the same background load
        for name, fn in sides.items():
            times[name] += fn(preset, args.batch, args.seq_len, args.steps, specials, table, args.compile,
                              objective=args.objective)
    architecture, head_share = OBJECTIVES[args.objective]
    model = build_model(preset, architecture, specials, args.seq_len * 2, seed=0)
    fpt = flops_per_token(model, args.seq_len, head_share)
    tokens = args.batch * args.seq_len
    return [(name, statistics.median(ts), fpt * tokens / statistics.median(ts) / peak)
            for name, ts in times.items()], count_parameters(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="repeatable (default: tiny)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each")
    ap.add_argument("--trainer", action="store_true", help="add transformers' Trainer (needs accelerate)")
    ap.add_argument("--compile", action="store_true", help="torch.compile all sides (the first steps compile)")
    ap.add_argument("--objective", choices=sorted(OBJECTIVES), default="clm",
                    help="clm: Llama decoder, next tokens; mlm: ModernBERT encoder, BERT masking")
    ap.add_argument("--prefetch", action="store_true",
                    help="add lmobj with data.prefetch true (the next step prepared in a thread)")
    ap.add_argument("--threads", type=int, help="intra-op threads for every side (default: torch's)")
    args = ap.parse_args()
    if args.trainer and args.objective != "clm":
        ap.error("--trainer compares CLM only")
    if args.threads:
        torch.set_num_threads(args.threads)
    specials = SpecialIds.default(8192)
    table = random_store(8192)
    peak = matmul_peak()
    print(f"{args.objective}, batch {args.batch} x {args.seq_len}, {torch.get_num_threads()} threads, fp32"
          f"{', compiled' if args.compile else ''}; matmul peak {peak / 1e9:.0f} GFLOP/s (measured here)")
    print()
    print("| model | trainer | s/step (median) | tokens/s | MFU | vs plain loop |")
    print("|---|---|---:|---:|---:|---:|")
    for preset in args.preset or ["tiny"]:
        rows, n = bench(preset, args, specials, table, peak)
        base = rows[0][1]
        for name, t, mfu in rows:
            print(f"| {preset} ({n / 1e6:.2f} M) | {name} | {t:.3f} | {args.batch * args.seq_len / t:.0f} | "
                  f"{mfu:.1%} | {base / t:.2f}x |", flush=True)
    print(f"\nmatmul peak re-measured at the end: {matmul_peak() / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
