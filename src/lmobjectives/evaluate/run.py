"""``lmobj eval``: a run's objective loss, perplexity and bits-per-byte on held-out data, and
single-line infilling exact match for FIM/CLM decoders (``evaluate/infill.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmobjectives.errors import UserError
from lmobjectives.evaluate.metrics import (LEFT_TO_RIGHT, bits_per_byte, objective_eval,
                                           token_byte_lengths, val_batches)
from lmobjectives.evaluate.infill import DEFAULT_SAMPLES, document_texts, infill_exact_match
from lmobjectives.objectives import capabilities
from lmobjectives.store.store import TokenStore


def accuracy_key(objective: str) -> str:
    """The name a run's held-out accuracy is reported under: an objective that scores masked
    positions only (MLM) says so (``masked_accuracy``)."""
    return capabilities(objective).accuracy_key


def gets_infill_metric(objective: str, architecture: str) -> bool:
    """Decoder runs of objectives on the infill benchmark (FIM, and CLM as its baseline) get
    single-line infilling exact match."""
    return architecture == "decoder" and capabilities(objective).infill_benchmark


def evaluate_dir(run_dir: str | Path, *, data: str | None = None, n_batches: int = 16,
                 infill_samples: int = DEFAULT_SAMPLES) -> dict[str, Any]:
    """Evaluate a run's final model on its validation split, or on ``data`` (a store or a
    corpus, prepared on the fly with the run's tokenizer). Decoders trained with FIM or CLM
    also get single-line ``infill_exact_match`` on ``infill_samples`` held-out lines."""
    from lmobjectives.data.loader import PackedSource
    from lmobjectives.infer.load import load_model
    from lmobjectives.train.api import load_run_config
    from lmobjectives.train.setup import open_run

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    loaded = load_model(run_dir)
    run = open_run(cfg, run_dir, progress=False)
    run.model = loaded.model.to(run.device)
    run.module.model = run.model
    if data is not None:
        if (Path(data) / "manifest.json").is_file():
            store = TokenStore(data)
        else:
            import tempfile

            from lmobjectives.store.prepare import prepare_store

            tmp = Path(tempfile.mkdtemp(prefix="lmobj-eval-"))
            store = prepare_store([data], run.tokenizer, tmp / "store", val_fraction=0.0, progress=False)
        from lmobjectives.tokenizer import tokenizer_fingerprint

        store.check_tokenizer(tokenizer_fingerprint(run.tokenizer), f"the tokenizer of run {run_dir}")
        split = "val" if data is not None and len(store.split("val").docs) else "train"
        table = store.split(split)
        source = PackedSource(table, run.row_length, seed=0, pad=run.specials.pad, shuffle=False)
    else:
        source = run.val_source()
        table = run.sources[0].store.split("val")
        if source is None:
            raise UserError(f"run {run_dir} has no validation split; pass --data")
    rows = val_batches(source, cfg.train.batch_size, n_batches)
    out = objective_eval(run, rows)
    res: dict[str, Any] = {"loss": out["loss"], "perplexity": math.exp(min(out["loss"], 50)),
                           accuracy_key(cfg.objective): out["accuracy"], "tokens": out["targets"]}
    if run.architecture in LEFT_TO_RIGHT:
        bpb = bits_per_byte(run.model, rows, run.specials, token_byte_lengths(run.tokenizer),
                            run.device, run.bf16, by_position=True)
        res.update({"bits_per_byte": bpb["bits_per_byte"], "bytes": bpb["bytes"],
                    "loss_by_position": bpb["loss_by_position"]})
    else:
        res.update({"bits_per_byte": None, "bytes": None,
                    "bits_per_byte_reason": NO_BPB_REASON[run.architecture]})
    if gets_infill_metric(cfg.objective, run.architecture) and infill_samples > 0:
        docs = document_texts(table, run.tokenizer, run.specials.eos)
        em = infill_exact_match(loaded, docs, infill_samples, seed=0, context_tokens=cfg.data.seq_len)
        res.update({"infill_exact_match": em["exact_match"], "infill_samples": em["samples"]})
    return res


# Why bits-per-byte is not reported: it needs p(text) scored token by token, left to right.
NO_BPB_REASON = {
    "encoder": "an MLM encoder sees both sides of every token, so it cannot score text left "
               "to right; compare encoders by loss and masked_accuracy",
    "encoder_decoder": "an encoder-decoder predicts its targets from a separately encoded input "
                       "(span corruption, UL2), not plain text left to right; compare it by loss "
                       "and accuracy",
}
