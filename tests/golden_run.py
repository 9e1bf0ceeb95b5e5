"""The golden run shared by ``tests/test_golden.py`` (which compares) and
``scripts/regolden.py`` (which alone rewrites the asset): a tiny CLM run on a fixed synthetic
store, and what is recorded of it — per-step losses and gradient norms, and a digest of the
final weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "assets" / "golden_clm_tiny.json"


def synthetic_store(out: Path) -> Path:
    from lmobjectives.store.store import write_store
    from lmobjectives.tokenizer import load_tokenizer, save_hf_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(None)
    rng = np.random.default_rng(20261130)
    docs = [(f"doc {i}", (200 + np.arange(int(rng.integers(20, 200))) * int(rng.integers(1, 4))) % 400 + 200)
            for i in range(60)]
    write_store(out, iter(docs), vocab_size=tok.get_vocab_size(), eos=0,
                tokenizer_fingerprint=tokenizer_fingerprint(tok), sources={"synthetic": "v1"},
                populate=lambda tmp: save_hf_tokenizer(tok, tmp / "tokenizer"))
    return out


def golden_tree(store: Path, out: Path) -> dict:
    return {"objective": "clm", "model": {"preset": "tiny", "precision": "fp32"},
            "data": {"store": str(store), "seq_len": 32},
            "train": {"steps": 8, "batch_size": 4, "grad_accum": 2, "seed": 7, "lr": 1e-2,
                      "eval_every": 0, "checkpoint_every": 0, "warmup_fraction": 0.25},
            "out": str(out)}


def platform() -> str:
    """What decides the last bits of a CPU run: the CPU (vendor, model, the SIMD level torch
    dispatches to) and the torch build. Floating-point sums are ordered differently by the
    AVX2 and AVX-512 kernels and by MKL's per-vendor code paths, so bit-for-bit equality is a
    promise for one platform only."""
    import platform as py_platform

    import torch

    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "model name") and key.strip() not in cpu:
                cpu[key.strip()] = value.strip()
    except OSError:
        pass
    return " | ".join([cpu.get("vendor_id", py_platform.machine()), cpu.get("model name", ""),
                       torch.backends.cpu.get_cpu_capability(), f"torch {torch.__version__}"])


def weights_norms(model_file: Path) -> dict[str, float]:
    """Each tensor's L2 norm: what is compared on another platform, where the digest cannot be."""
    from safetensors.torch import load_file

    return {name: float(t.double().norm()) for name, t in sorted(load_file(str(model_file)).items())}


def weights_digest(model_file: Path) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: equal exactly
    when the weights are bit for bit equal (the file's own bytes could also hold metadata)."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(model_file)).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def golden_run(root: Path) -> dict:
    """Train the golden run under ``root``; its record: losses, grad norms, weights digest."""
    import torch

    from lmobjectives.config import build_config
    from lmobjectives.train.job import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reductions on every machine
    try:
        store = synthetic_store(root / "store")
        res = train(build_config(golden_tree(store, root / "run")), progress=False)
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if not r.get("eval")]
    final = res.run_dir / "final" / "model.safetensors"
    return {"platform": platform(), "losses": [r["loss"] for r in records],
            "grad_norms": [r["grad_norm"] for r in records],
            "weights_sha256": weights_digest(final), "weights_l2": weights_norms(final)}
