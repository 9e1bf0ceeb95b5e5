"""``lmobj eval``: a run's objective loss, perplexity and bits-per-byte on held-out data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmobjectives.errors import UserError
from lmobjectives.evaluate.metrics import (LEFT_TO_RIGHT, bits_per_byte, objective_eval,
                                           token_byte_lengths, val_batches)
from lmobjectives.store.store import TokenStore


def evaluate_dir(run_dir: str | Path, *, data: str | None = None, n_batches: int = 16) -> dict[str, Any]:
    """Evaluate a run's final model on its validation split, or on ``data`` (a store or a
    corpus, prepared on the fly with the run's tokenizer)."""
    from lmobjectives.data.loader import PackedSource
    from lmobjectives.infer.load import load_model
    from lmobjectives.train.api import load_run_config
    from lmobjectives.train.setup import Source, open_run

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
        source = PackedSource(store.split(split), run.row_length, seed=0, pad=run.specials.pad, shuffle=False)
    else:
        source = run.val_source()
        if source is None:
            raise UserError(f"run {run_dir} has no validation split; pass --data")
    rows = val_batches(source, cfg.train.batch_size, n_batches)
    out = objective_eval(run, rows)
    # An MLM's targets are the masked tokens only: say so in the name of its accuracy.
    accuracy_key = "masked_accuracy" if cfg.objective == "mlm" else "accuracy"
    res: dict[str, Any] = {"loss": out["loss"], "perplexity": math.exp(min(out["loss"], 50)),
                           accuracy_key: out["accuracy"], "tokens": out["targets"]}
    if run.architecture in LEFT_TO_RIGHT:
        bpb = bits_per_byte(run.model, rows, run.specials, token_byte_lengths(run.tokenizer),
                            run.device, run.bf16, by_position=True)
        res.update({"bits_per_byte": bpb["bits_per_byte"], "bytes": bpb["bytes"],
                    "loss_by_position": bpb["loss_by_position"]})
    else:
        res.update({"bits_per_byte": None, "bytes": None,
                    "bits_per_byte_reason": NO_BPB_REASON[run.architecture]})
    return res


# Why bits-per-byte is not reported: it needs p(text) scored token by token, left to right.
NO_BPB_REASON = {
    "encoder": "an MLM encoder sees both sides of every token, so it cannot score text left "
               "to right; compare encoders by loss and masked_accuracy",
    "encoder_decoder": "an encoder-decoder predicts its targets from a separately encoded input "
                       "(span corruption, UL2), not plain text left to right; compare it by loss "
                       "and accuracy",
}
