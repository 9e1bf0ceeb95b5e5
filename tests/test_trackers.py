"""Experiment trackers: the TensorBoard event file and the W&B offline run hold what
metrics.jsonl holds; a tracker that cannot start is one error line, one that fails later is
one warning and the run goes on."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import pytest

import runs_util as ru
from lmobjectives.train import trackers



def _args(store: str, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["train", "--objective", "clm", "--preset", "tiny", "--data", store, "--seq-len", "32",
            "--batch-size", "2", "--steps", str(steps), "--checkpoint-every", "3", "--out", str(out),
            "--json", "--set", "model.precision=fp32", "--set", "train.eval_every=3",
            "--set", "train.eval_batches=1", *extra]


def _records(run: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if not r.get("eval")], [r for r in recs if r.get("eval")]


def test_flatten_keys_events_and_sources():
    flat = trackers.flatten({"step": 3, "tokens": 192, "loss": 5.1, "lr": 1e-3, "skipped": "spike",
                             "tokens_by_source": {"code": 150, "prose": 42}, "eval": True})
    assert flat == {"loss": 5.1, "lr": 1e-3, "skipped_spike": 1.0,
                    "tokens_by_source/code": 150.0, "tokens_by_source/prose": 42.0}


def test_tensorboard_event_file_equals_metrics_jsonl(small_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    code, _, err = ru.run_cli(_args(small_store, run, "--log", "tensorboard"))
    assert code == 0, err
    train, evals = _records(run)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)
    by_tokens = _events(run / "tensorboard" / "by_tokens").Scalars("train_by_tokens/loss")
    assert [e.step for e in by_tokens] == [r["tokens"] for r in train]
    for key in ("lr", "grad_norm", "tokens_per_second"):
        assert [e.value for e in acc.Scalars(f"train/{key}")] == pytest.approx([r[key] for r in train], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [r["step"] for r in evals]
    assert [e.value for e in acc.Scalars("eval/loss")] == pytest.approx([r["loss"] for r in evals], rel=1e-6)
    assert [e.step for e in acc.Images(trackers.LOSS_PLOT_TAG)] == [3, 6]  # each eval, and the end
    tags = acc.Tags()
    assert acc.PluginTagToContent("hparams")  # the config as hyper-parameters
    assert "config/text_summary" in tags["tensors"]


def _events(path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_after_resume_holds_each_step_once(small_store, tmp_path):
    """Steps logged after the checkpoint a run resumes from are redone; TensorBoard's purge
    drops the first copies, so the event file again equals metrics.jsonl."""
    import shutil

    run = tmp_path / "run"
    code, _, err = ru.run_cli(_args(small_store, run, "--log", "tensorboard", steps=5))
    assert code == 0, err
    shutil.rmtree(run / "checkpoints" / "step-0000005")  # as if killed after step 5's log
    code, _, err = ru.run_cli(["train", "--resume", str(run), "--steps", "6", "--json"])
    assert code == 0, err
    train, _ = _records(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for path, tag, x in ((run / "tensorboard", "train/loss", "step"),
                         (run / "tensorboard" / "by_tokens", "train_by_tokens/loss", "tokens")):
        events = _events(path).Scalars(tag)
        assert [e.step for e in events] == [r[x] for r in train]
        assert [e.value for e in events] == pytest.approx([r["loss"] for r in train], rel=1e-6)


def test_wandb_offline_run_keeps_its_id_on_resume(small_store, tmp_path):
    run = tmp_path / "run"
    code, _, err = ru.run_cli(_args(small_store, run, "--log", "wandb", steps=3))
    assert code == 0, err
    run_id = json.loads((run / "run.json").read_text())[trackers.WANDB_ID_KEY]
    code, _, err = ru.run_cli(["train", "--resume", str(run), "--steps", "6", "--json"])
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())[trackers.WANDB_ID_KEY] == run_id
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith(run_id) for d in dirs)  # one W&B run, twice
    train, _ = _records(run)
    summary = _wandb_summary(next(dirs[-1].glob("run-*.wandb")))
    assert summary["train/loss"] == pytest.approx(train[-1]["loss"])
    assert summary["tokens"] == train[-1]["tokens"]


def _wandb_records(path: Path):
    """Records of a ``.wandb`` transaction log: a 7-byte file header, then LevelDB-log blocks
    of 32 KiB whose chunks (7-byte header: CRC, length, type) may span blocks."""
    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or last piece
            yield pending


def _wandb_summary(path: Path) -> dict:
    from wandb.proto import wandb_internal_pb2 as pb

    summary: dict = {}
    for data in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


@pytest.mark.parametrize("backend, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_missing_tracker_is_one_error_line_naming_the_extra(small_store, tmp_path, monkeypatch,
                                                            backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    code, _, err = ru.run_cli(_args(small_store, tmp_path / "run", "--log", backend))
    assert code == 2
    assert err.strip().splitlines() == [f"error: {trackers.install_hint(backend)}"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tracker_that_cannot_start_ends_before_step_1(small_store, tmp_path, monkeypatch):
    def no_space(self, *args):  # noqa: ANN001, ANN002
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trackers.TensorBoardTracker, "__init__", no_space)
    code, _, err = ru.run_cli(_args(small_store, tmp_path / "run", "--log", "tensorboard"))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot start tensorboard logging in {tmp_path / 'run'}: "
                      "[Errno 28] No space left on device"]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_tracker_failing_mid_run_warns_once_and_training_goes_on(small_store, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_log = trackers.TensorBoardTracker.log

    def flaky(self, group, values, step, tokens):  # noqa: ANN001
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_log(self, group, values, step, tokens)

    monkeypatch.setattr(trackers.TensorBoardTracker, "log", flaky)
    run = tmp_path / "run"
    code, out, err = ru.run_cli(_args(small_store, run, "--log", "tensorboard"))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "tensorboard logging failed" in line]
    assert len(warnings) == 1 and "at step 3" in warnings[0], err
    train, _ = _records(run)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert calls["n"] == 3  # dropped after its failure
