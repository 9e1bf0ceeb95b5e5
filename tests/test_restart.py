"""``resume_if_exists`` (``lmobj train --resume-if-exists``): an empty --out starts a run, a
run of the same config is continued, a run of another config is refused with ``error:``.
The kill-and-restart under torchrun is in ``test_distributed.py``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import tiny_tree
from lmobjectives.config import build_config
from lmobjectives.errors import UserError
from lmobjectives.train.job import train

QUIET = {"progress": False, "say": lambda m: None}


def test_start_then_resume_then_refuse_another_config(small_store, tmp_path):
    out = tmp_path / "run"
    tree = tiny_tree(small_store, str(out), steps=2, checkpoint_every=2)
    first = train(build_config(tree), resume_if_exists=True, **QUIET)
    assert first.started == "new"
    tree["train"]["steps"] = 4  # more steps: the same trajectory, continued
    second = train(build_config(tree), resume_if_exists=True, **QUIET)
    assert second.started.startswith("resumed from step-0000002") and second.final["step"] == 4
    tree["train"]["lr"] = 1e-4
    with pytest.raises(UserError, match="holds a run with another config"):
        train(build_config(tree), resume_if_exists=True, **QUIET)
    with pytest.raises(UserError, match="needs --out"):
        train(build_config({**tree, "out": None}), resume_if_exists=True, **QUIET)


def test_cli_refuses_with_one_error_line(small_store, tmp_path):
    out = tmp_path / "run"
    train(build_config(tiny_tree(small_store, str(out), steps=1)), **QUIET)
    proc = subprocess.run([sys.executable, "-m", "lmobjectives.cli", "train", "--data", small_store,
                           "--preset", "tiny", "--steps", "1", "--seq-len", "48", "--out", str(out),
                           "--resume-if-exists"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "another config" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runs_from_before_the_loss_chunks_key_keep_their_config_hash(small_store, tmp_path, monkeypatch):
    """A checkpoint written before ``train.loss_chunks`` existed holds the hash of a config
    without it; the one-piece default must hash the same, or such runs could not be resumed."""
    from lmobjectives.config import RunConfig
    from lmobjectives.rundir import config_hash

    cfg = build_config(tiny_tree(small_store, str(tmp_path / "run")))
    dump = RunConfig.model_dump

    def without_the_key(self, **kw):  # noqa: ANN001, ANN003, ANN202 - the config class before the key
        tree = dump(self, **kw)
        del tree["train"]["loss_chunks"]
        return tree

    monkeypatch.setattr(RunConfig, "model_dump", without_the_key)
    old = config_hash(cfg)
    monkeypatch.undo()
    assert config_hash(cfg) == old
    chunked = cfg.model_copy(update={"train": cfg.train.model_copy(update={"loss_chunks": 2})})
    assert config_hash(chunked) != old
