"""Export to the HF ecosystem: ``save_pretrained`` weights (safetensors) + the HF tokenizer,
so ``AutoModelFor*.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from lmobjectives.tokenizer import save_hf_tokenizer
from lmobjectives.util import publish_dir


def export_model(model: torch.nn.Module, tokenizer, out: str | Path) -> Path:  # noqa: ANN001
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per export is enough; ours says where it went
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        use_cache = getattr(model.config, "use_cache", None)
        if use_cache is not None:
            model.config.use_cache = True  # for generation by whoever loads it
        model.save_pretrained(str(tmp), safe_serialization=True)
        if use_cache is not None:
            model.config.use_cache = use_cache
        save_hf_tokenizer(tokenizer, tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    """Export any checkpoint (full or sharded) of a run as an HF directory.

    The run's spec gives the tokenizer and architecture without building the run; the model
    that receives the weights has the shape of the run's ``final/`` model when there is one,
    so the run's ``--init-from`` source may have moved; before the run has finished it is
    built as training built it."""
    from lmobjectives.checkpoint import load_weights
    from lmobjectives.rundir import read_run_info
    from lmobjectives.spec import open_spec

    ckpt = Path(checkpoint)
    run_dir = ckpt.parent.parent
    spec = open_spec(run_dir)
    if (run_dir / "final" / "config.json").is_file():
        from lmobjectives.infer.load import load_model

        model = load_model(run_dir).model
    else:
        from lmobjectives.train.setup import build_run_model

        model = build_run_model(spec, read_run_info(run_dir).get("tokenizer") or "", {})
    load_weights(ckpt, model)
    return export_model(model, spec.tokenizer, out)
