"""Training throughput: `lmobj`'s step against transformers' `Trainer` on the same model
config, batch and sequence length, in the same process, alternating so that both see the
same machine load. Reports tokens/s, the ratio, and MFU against this machine's measured
matmul peak.

    python benchmarks/train_throughput.py [--preset small] [--batch 8] [--seq-len 256] [--steps 8]

Needs `accelerate` (transformers' Trainer requires it): `pip install accelerate`.
Target on this CPU: >= 1.3x Trainer.
"""

from __future__ import annotations

import argparse
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


def flops_per_token(model, seq_len: int) -> float:  # noqa: ANN001
    """6N for the matmuls (embedding lookup excluded, tied unembedding included) plus
    attention's 12·layers·d·T (the PaLM appendix B count)."""
    cfg = model.config
    n = count_parameters(model) - cfg.vocab_size * cfg.hidden_size  # no lookup FLOPs
    n += cfg.vocab_size * cfg.hidden_size  # but the tied unembedding is a matmul
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
                    table: TokenStore, compile: bool = False) -> list[float]:
    from lmobjectives.objectives import CLM

    cfg = build_config({"model": {"preset": preset}, "data": {"seq_len": seq_len},
                        "train": {"steps": steps + 2, "batch_size": batch}})
    model = build_model(preset, "decoder", specials, seq_len * 2, seed=0)
    model.config.use_cache = False
    from lmobjectives.tokenizer import load_tokenizer

    run = Run(cfg=cfg, dir=Path(tempfile.mkdtemp(prefix="lmobj-bench-")), tokenizer=load_tokenizer(None),
              specials=specials,
              sources=[Source("bench", table, 1.0)], objective=CLM(specials=specials),
              architecture="decoder", model=model,
              model_with_loss=StandardModule(torch.compile(model) if compile else model, "decoder"),
              device=torch.device("cpu"), bf16=False)
    trainer = Trainer(run, progress=False)
    times = []
    for _ in range(steps + 2):
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    return times[2:]  # the first steps warm allocators and kernels


def hf_step_times(preset: str, batch: int, seq_len: int, steps: int, specials: SpecialIds,
                  table: TokenStore, compile: bool = False) -> list[float]:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of each")
    ap.add_argument("--compile", action="store_true", help="torch.compile both (the first steps compile)")
    args = ap.parse_args()
    specials = SpecialIds.default(8192)
    table = random_store(8192)
    ours, hf = [], []
    for _ in range(args.rounds):  # alternate, so both see the same background load
        ours += ours_step_times(args.preset, args.batch, args.seq_len, args.steps, specials, table, args.compile)
        hf += hf_step_times(args.preset, args.batch, args.seq_len, args.steps, specials, table, args.compile)
    tokens = args.batch * args.seq_len
    model = build_model(args.preset, "decoder", specials, args.seq_len * 2, seed=0)
    fpt = flops_per_token(model, args.seq_len)
    peak = matmul_peak()
    t_ours, t_hf = statistics.median(ours), statistics.median(hf)
    print(f"model {args.preset} ({count_parameters(model) / 1e6:.1f} M), batch {args.batch} x {args.seq_len}, "
          f"{torch.get_num_threads()} threads, fp32{', compiled' if args.compile else ''}; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s")
    print()
    print("| trainer              | s/step (median) | tokens/s | MFU   | ratio |")
    print("|----------------------|----------------:|---------:|------:|------:|")
    for name, t in (("transformers Trainer", t_hf), ("lmobj", t_ours)):
        print(f"| {name:<20} | {t:15.3f} | {tokens / t:8.0f} | {fpt * tokens / t / peak:5.1%} | "
              f"{t_hf / t:4.2f}x |")


if __name__ == "__main__":
    main()
