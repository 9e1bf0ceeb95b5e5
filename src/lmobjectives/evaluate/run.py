"""``lmobj eval``: a run's objective loss, perplexity and bits-per-byte on held-out data, and
single-line infilling exact match for FIM/CLM decoders (``evaluate/infill.py``)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from lmobjectives.data.loader import PackedSource
from lmobjectives.errors import UserError
from lmobjectives.evaluate.infill import DEFAULT_SAMPLES, document_texts, infill_exact_match
from lmobjectives.evaluate.metrics import left_to_right_bpb, objective_eval, val_batches
from lmobjectives.objectives import capabilities
from lmobjectives.runtime import select_device, use_bf16
from lmobjectives.spec import RunSpec, open_spec
from lmobjectives.step import step_module
from lmobjectives.store.prepare import prepare_store
from lmobjectives.store.store import TokenStore
from lmobjectives.tokenizer import tokenizer_fingerprint


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
    from lmobjectives.infer.load import load_model

    run_dir = Path(run_dir)
    spec = open_spec(run_dir)  # no model built: the final one is loaded below
    cfg = spec.cfg
    loaded = load_model(run_dir)
    device = select_device()
    bf16 = use_bf16(cfg.model.precision, device)
    model = loaded.model.to(device)
    source, table = _eval_source(spec, run_dir, data)
    rows = val_batches(source, cfg.train.batch_size, n_batches)
    module = step_module(model, spec.objective, spec.architecture, bf16, loss_chunks=cfg.train.loss_chunks)
    out = objective_eval(spec, rows, module, device)
    res: dict[str, Any] = {"loss": out["loss"], "perplexity": math.exp(min(out["loss"], 50)),
                           accuracy_key(cfg.objective): out["accuracy"], "tokens": out["targets"]}
    bpb = left_to_right_bpb(spec, model, rows, device, bf16)
    if bpb is not None:
        res.update({"bits_per_byte": bpb["bits_per_byte"], "bytes": bpb["bytes"],
                    "loss_by_position": bpb["loss_by_position"]})
    else:
        res.update({"bits_per_byte": None, "bytes": None,
                    "bits_per_byte_reason": NO_BPB_REASON[spec.architecture]})
    if gets_infill_metric(cfg.objective, spec.architecture) and infill_samples > 0:
        docs = document_texts(table, spec.tokenizer, spec.specials.eos)
        em = infill_exact_match(loaded, docs, infill_samples, seed=0, context_tokens=cfg.data.seq_len)
        res.update({"infill_exact_match": em["exact_match"], "infill_samples": em["samples"]})
    return res


def _eval_source(spec: RunSpec, run_dir: Path, data: str | None) -> tuple[PackedSource, Any]:
    """The rows to score: the run's validation split, or ``data`` (a store, or a corpus
    prepared on the fly with the run's tokenizer); with the document table they come from."""
    if data is None:
        source = spec.val_source()
        if source is None:
            raise UserError(f"run {run_dir} has no validation split; pass --data")
        return source, spec.sources[0].store.split("val")
    if (Path(data) / "manifest.json").is_file():
        store = TokenStore(data)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="lmobj-eval-"))
        store = prepare_store([data], spec.tokenizer, tmp / "store", val_fraction=0.0, progress=False)
    store.check_tokenizer(tokenizer_fingerprint(spec.tokenizer), f"the tokenizer of run {run_dir}")
    table = store.split("val" if len(store.split("val").docs) else "train")
    return PackedSource(table, spec.row_length, seed=0, pad=spec.specials.pad, shuffle=False), table


# Why bits-per-byte is not reported: it needs p(text) scored token by token, left to right.
NO_BPB_REASON = {
    "encoder": "an MLM encoder sees both sides of every token, so it cannot score text left "
               "to right; compare encoders by loss and masked_accuracy",
    "encoder_decoder": "an encoder-decoder predicts its targets from a separately encoded input "
                       "(span corruption, UL2), not plain text left to right; compare it by loss "
                       "and accuracy",
}
