"""Experiment trackers: TensorBoard and W&B copies of what ``metrics.jsonl`` holds.

``metrics.jsonl`` stays the source of truth; a tracker receives every record the trainer
writes there, flattened to numbers, twice keyed: by the optimizer step (``train/loss``,
``eval/bits_per_byte``) and by the tokens seen (``train_by_tokens/loss`` at x = tokens;
W&B rows carry ``tokens`` as a column, its custom x-axis). Worked example:

    {"step": 3, "tokens": 192, "loss": 5.1, "lr": 1e-3, "skipped": "spike",
     "tokens_by_source": {"code": 150, "prose": 42}}
    -> train/loss 5.1, train/lr 0.001, train/skipped_spike 1.0,
       train/tokens_by_source/code 150, train/tokens_by_source/prose 42   (at step 3)
       and the same under train_by_tokens/...                             (at step 192)

The loss plot goes in as an image at each evaluation; the resolved config as
hyper-parameters. Only rank 0 opens trackers.

Failure policy: a tracker that cannot start (package missing, directory not writable, W&B
not logged in) is a ``UserError`` before step 1, naming the extra to install or the fix; one
that fails while the run goes on is dropped with one warning, and training continues (its
records are all still in ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import secrets
import string
from pathlib import Path
from typing import Any, Callable, Protocol

from lmobjectives.errors import UserError

BACKENDS = ("tensorboard", "wandb")  # each is also the name of its extra
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_KEY = "wandb_run_id"
LOSS_PLOT_TAG = "loss_plot"


def install_hint(backend: str) -> str:
    return f"--log {backend} needs the {backend} package: pip install 'lmobjectives[{backend}]'"


def check_installed(backends: list[str]) -> None:
    """Fail early (before any data is prepared) when a requested tracker is not installed."""
    for name in backends:
        try:
            if name == "tensorboard":
                import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise UserError(install_hint(name)) from None


def flatten(record: dict[str, Any]) -> dict[str, float]:
    """The numeric content of a metrics record, nested keys joined by "/" (see the example
    above); ``step``, ``tokens`` and the ``eval`` flag are the keys, not values."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            out[prefix] = float(value)
        elif isinstance(value, (int, float)):
            out[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, str):
            out[f"{prefix}_{value}"] = 1.0  # an event: "skipped": "spike" -> skipped_spike = 1

    for key, value in record.items():
        if key not in ("step", "tokens", "eval"):
            walk(key, value)
    return out


def hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat scalar hyper-parameters (lists and None as text)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


class Tracker(Protocol):
    def log(self, group: str, values: dict[str, float], step: int, tokens: int) -> None: ...
    def image(self, path: Path, step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    """Event files in ``RUN/tensorboard/`` through ``torch.utils.tensorboard``; the by-tokens
    series in ``RUN/tensorboard/by_tokens/``, a run of its own, because a resumed run purges
    the events logged after its checkpoint by x value (``purge_step``): steps for one series,
    tokens for the other."""

    def __init__(self, run_dir: Path, config: dict[str, Any],
                 resume_at: tuple[int, int] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparam_summaries

        root = run_dir / TENSORBOARD_DIR
        step, tokens = (resume_at[0] + 1, resume_at[1] + 1) if resume_at else (None, None)
        self.writer = SummaryWriter(log_dir=str(root), purge_step=step)
        self.by_tokens = SummaryWriter(log_dir=str(root / "by_tokens"), purge_step=tokens)
        # The HParams dashboard links the config to these metric tags of the same run.
        for summary in hparam_summaries(hparams(config), {"train/loss": 0.0, "eval/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", resume_at[0] if resume_at else 0)
        self.writer.flush()

    def log(self, group: str, values: dict[str, float], step: int, tokens: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{group}/{key}", value, step)
            self.by_tokens.add_scalar(f"{group}_by_tokens/{key}", value, tokens)

    def image(self, path: Path, step: int) -> None:
        from matplotlib.image import imread

        self.writer.add_image(LOSS_PLOT_TAG, imread(str(path))[..., :3], step, dataformats="HWC")
        self.writer.flush()  # at each eval, so a crash loses little
        self.by_tokens.flush()

    def close(self) -> None:
        self.writer.close()
        self.by_tokens.close()


class WandbTracker:
    """A W&B run in ``RUN/wandb/``; ``WANDB_MODE=offline`` works with no network. The run id
    lives in ``run.json`` so that ``--resume`` continues the same W&B run."""

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str, project: str) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, dir=str(run_dir), id=run_id, resume="allow",
                              name=run_dir.name, config=config)

    def log(self, group: str, values: dict[str, float], step: int, tokens: int) -> None:
        self.run.log({**{f"{group}/{k}": v for k, v in values.items()}, "tokens": tokens}, step=step)

    def image(self, path: Path, step: int) -> None:
        self.run.log({LOSS_PLOT_TAG: self._wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every open tracker behind one call; a tracker that raises is dropped with one warning."""

    def __init__(self, trackers: dict[str, Tracker] | None = None,
                 warn: Callable[[str], None] = lambda m: None) -> None:
        self.trackers = dict(trackers or {})
        self.warn = warn

    def _each(self, what: str, call: Callable[[Tracker], None], step: int | None) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception as exc:  # noqa: BLE001 - any tracker failure must not stop training
                del self.trackers[name]
                at = f" at step {step}" if step is not None else ""
                self.warn(f"{name} logging failed{at} while writing {what} "
                          f"({type(exc).__name__}: {exc}); it is off for the rest of the run, "
                          "metrics.jsonl has every record")

    def log(self, record: dict[str, Any]) -> None:
        if not self.trackers or "step" not in record:
            return
        group = "eval" if record.get("eval") else "train"
        values, step, tokens = flatten(record), int(record["step"]), int(record.get("tokens", 0))
        self._each("metrics", lambda t: t.log(group, values, step, tokens), step)

    def image(self, path: Path, step: int) -> None:
        if path.is_file():
            self._each("the loss plot", lambda t: t.image(path, step), step)

    def close(self) -> None:
        self._each("its last records", lambda t: t.close(), None)
        self.trackers.clear()


def wandb_run_id(run_dir: Path) -> str:
    """The W&B id kept in ``run.json``: made (and written down) on the first start."""
    from lmobjectives.util import atomic_write_json

    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if not info.get(WANDB_ID_KEY):
        # W&B's own ids: 8 characters of [a-z0-9]
        alphabet = string.ascii_lowercase + string.digits
        info[WANDB_ID_KEY] = "".join(secrets.choice(alphabet) for _ in range(8))
        atomic_write_json(info_path, info)
    return info[WANDB_ID_KEY]


def open_trackers(backends: list[str], run_dir: Path, config: dict[str, Any], *,
                  resume_at: tuple[int, int] | None = None, wandb_project: str = "lmobjectives",
                  warn: Callable[[str], None] = lambda m: None) -> Trackers:
    """Start each requested tracker, or end the run with one clear error. ``resume_at``:
    the (step, tokens) of the checkpoint a resumed run continues from."""
    check_installed(backends)
    opened: dict[str, Tracker] = {}
    try:
        for name in dict.fromkeys(backends):  # repeated --log: once
            try:
                if name == "tensorboard":
                    opened[name] = TensorBoardTracker(run_dir, config, resume_at)
                else:
                    opened[name] = WandbTracker(run_dir, config, wandb_run_id(run_dir), wandb_project)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - a tracker's own errors vary by version
                hint = ("; for a machine without network set WANDB_MODE=offline"
                        if name == "wandb" else "")
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserError(f"cannot start {name} logging in {run_dir}: {first}{hint}") from None
    except UserError:
        Trackers(opened).close()
        raise
    return Trackers(opened, warn)
