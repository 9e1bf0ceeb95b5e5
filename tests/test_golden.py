"""A golden loss curve: a tiny CLM run on a fixed synthetic store must reproduce the losses
recorded in ``assets/golden_clm_tiny.json`` bit for bit on CPU (one thread, fp32). A change
that moves them changes training numerics: look at why before regenerating with
``LMOBJ_REGOLDEN=1 pytest tests/test_golden.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lmobjectives.config import build_config
from lmobjectives.store.store import write_store
from lmobjectives.tokenizer import load_tokenizer, save_hf_tokenizer, tokenizer_fingerprint
from lmobjectives.train.job import train

GOLDEN = Path(__file__).parent / "assets" / "golden_clm_tiny.json"


def synthetic_store(out: Path) -> Path:
    tok = load_tokenizer(None)
    rng = np.random.default_rng(20261130)
    docs = [(f"doc {i}", (200 + np.arange(int(rng.integers(20, 200))) * int(rng.integers(1, 4))) % 400 + 200) for i in range(60)]
    write_store(out, iter(docs), vocab_size=tok.get_vocab_size(), eos=0,
                tokenizer_fingerprint=tokenizer_fingerprint(tok), sources={"synthetic": "v1"},
                populate=lambda tmp: save_hf_tokenizer(tok, tmp / "tokenizer"))
    return out


def test_golden_loss_curve(tmp_path):
    store = synthetic_store(tmp_path / "store")
    cfg = build_config({"objective": "clm", "model": {"preset": "tiny", "precision": "fp32"},
                        "data": {"store": str(store), "seq_len": 32},
                        "train": {"steps": 8, "batch_size": 4, "grad_accum": 2, "seed": 7, "lr": 1e-2,
                                  "eval_every": 0, "checkpoint_every": 0, "warmup_fraction": 0.25},
                        "out": str(tmp_path / "run")})
    res = train(cfg, progress=False)
    losses = [json.loads(l)["loss"] for l in (res.run_dir / "metrics.jsonl").read_text().splitlines()
              if not json.loads(l).get("eval")]
    if os.environ.get("LMOBJ_REGOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert losses == expected
