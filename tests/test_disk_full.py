"""Disk full: ENOSPC while a checkpoint is written (through ``torch.save`` and through the
safetensors weights file) keeps the previous checkpoints intact and ends with one ``error:``
line; leftovers of a killed write are removed at the next start; ENOSPC outside a checkpoint
(the metrics file) is one line too. Simulated in-process by making the writer raise."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import runs_util as ru
from lmobjectives.checkpoint import list_checkpoints, verify_checkpoint


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return ru.make_store(tmp_path_factory.mktemp("diskfull"), n_docs=12, words=40)


def test_disk_full_keeps_previous_checkpoint_and_leftovers_are_cleaned(store, tmp_path, monkeypatch):
    import lmobjectives.checkpoint.full as ck

    out = tmp_path / "run"
    code, _, err = ru.run_cli(ru.tiny_args(store, out, 3, every=3))
    assert code == 0, err
    before = list_checkpoints(out)
    assert [c.name for c in before] == ["step-0000003"]

    def full(*a, **kw):  # noqa: ANN002,ANN003
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck.torch, "save", full)
    code, _, err = ru.run_cli(["train", "--resume", str(out), "--steps", "6", "--json"])
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert str(out / "checkpoints" / "step-0000006") in lines[0]
    assert "No space left on device" in lines[0] and "previous checkpoints are intact" in lines[0]
    assert list_checkpoints(out) == before
    verify_checkpoint(before[0])
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()

    # A write killed before its rename leaves a temporary directory; the next start removes it.
    debris = out / "checkpoints" / ".step-0000006.tmp-abc"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"partial")
    (out / ".final.tmp-xyz").mkdir()
    (out / ".metrics.jsonl.q1w2e3r4.tmp").write_bytes(b"{")
    (out / ".loss.png.a1b2c3d4.png").write_bytes(b"")
    (out / ".keep-me").write_bytes(b"a user's file")
    code, _, err = ru.run_cli(["train", "--resume", str(out), "--steps", "6", "--json"])
    assert code == 0, err
    assert "removed the leftover" in err
    assert not debris.exists() and not (out / ".final.tmp-xyz").exists()
    assert not (out / ".metrics.jsonl.q1w2e3r4.tmp").exists()
    assert not (out / ".loss.png.a1b2c3d4.png").exists() and (out / ".keep-me").exists()
    assert [c.name for c in list_checkpoints(out)] == ["step-0000003", "step-0000006"]


def test_disk_full_in_safetensors_write(store, tmp_path, monkeypatch):
    """The same through the weights file: safetensors raises the OSError itself."""
    import lmobjectives.checkpoint.full as ck

    out = tmp_path / "run"
    assert ru.run_cli(ru.tiny_args(store, out, 3, every=3))[0] == 0

    def full(model, path):  # noqa: ANN001
        Path(path).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(ck, "save_model", full)
    code, _, err = ru.run_cli(["train", "--resume", str(out), "--steps", "6", "--json"])
    assert code == 2 and "step-0000006" in err and "Traceback" not in err
    assert [c.name for c in list_checkpoints(out)] == ["step-0000003"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_disk_full_outside_a_checkpoint_is_one_line(store, tmp_path, monkeypatch):
    """ENOSPC while appending to metrics.jsonl: one error line naming the file, exit 2."""
    from lmobjectives.train.loop import Trainer

    def full(self, record):  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.metrics_path))

    monkeypatch.setattr(Trainer, "log", full)
    out = tmp_path / "run"
    code, _, err = ru.run_cli(ru.tiny_args(store, out, 3, every=3))
    assert code == 2 and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        f"error: {out / 'metrics.jsonl'}: No space left on device"]
