"""The run configuration: typed, strict, frozen (pydantic), resolved once and written to the
run's ``config.yaml``. An unknown key or a bad value is a ``UserError`` naming the key and the
closest valid one. ``--set a.b=value`` edits any key; ``objective.PARAM`` is shorthand for
``objective_params.PARAM``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmobjectives.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Strict):
    preset: str = "small"
    init_from: str | None = None  # HF model directory or run directory: fresh start from its weights
    config: dict[str, Any] = Field(default_factory=dict)  # transformers config overrides
    compile: bool = False
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the CPU/GPU has it
    rope_theta: float | None = Field(None, gt=0)  # new RoPE base (context extension); None: keep
    activation_checkpointing: bool = False  # recompute each block's activations in backward


class MixSource(_Strict):
    path: str
    weight: float = Field(gt=0)


class DataConfig(_Strict):
    corpus: list[str] = Field(default_factory=lambda: ["default"])
    store: str | None = None  # a prepared store; else one is prepared inside the run
    mix: list[MixSource] = Field(default_factory=list)  # replay mixing: several stores/corpora
    tokenizer: str | None = None  # None: the shipped default tokenizer (or the store's)
    seq_len: int = Field(256, ge=8)
    val_fraction: float = Field(0.01, ge=0, lt=1)
    encoding: Literal["strict", "replace", "skip"] = "skip"
    text_field: str = "text"
    split: str = "train"  # the split of an HF datasets directory (``DatasetDict.save_to_disk``)
    # Prepare the next step's micro-batches in a background thread while this step computes
    # (train/batches.py: the same batches bit for bit; a checkpoint saves only consumed ones).
    # auto: on CUDA only (measured on CPU: nothing to hide, and a thread to compete with).
    prefetch: Literal["auto"] | bool = "auto"


class TrainConfig(_Strict):
    # A run is counted in steps or timed (``time``: "90s", "5m", "2h", "1d"; see
    # train/budget.py), never both. The command line's default is the timed default job
    # (``default_budget``); a config built in Python without either trains 100 steps.
    steps: int = Field(100, ge=0)
    time: str | None = None
    batch_size: int = Field(8, ge=1)  # per-device micro-batch, in rows
    grad_accum: int = Field(1, ge=1)
    # Output head + loss over this many row chunks, so (B*T, V) logits never exist at once
    # (loss.chunked_nll_sum); 1: in one piece; auto: chunks of at most 128 MiB of logits.
    loss_chunks: Literal["auto"] | Annotated[int, Field(ge=1)] = 1
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_fraction: float = Field(0.05, ge=0, le=1)
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = Field(0.1, gt=0, le=1)  # WSD: share of steps spent decaying (MiniCPM)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    seed: int = 0
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(50, ge=0)  # 0: only at the end
    eval_batches: int = Field(4, ge=1)
    checkpoint_every: int = Field(50, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, ge=2)
    lr_scale: float | None = Field(None, gt=0)  # init-from one of our runs: peak = scale × its peak
    new_embeddings_first: int = Field(0, ge=0)  # first K steps update only new token rows
    max_bad_steps: int = Field(5, ge=1)  # non-finite loss/grad this many steps in a row stops the run
    spike_zscore: float = Field(6.0, gt=0)
    spike_window: int = Field(50, ge=5)
    spike_action: Literal["log", "skip"] = "log"

    @model_validator(mode="before")
    @classmethod
    def _timed_defaults(cls, data: Any) -> Any:
        """A timed run stops at a deadline, not at a known step: WSD fits (the decay starts
        when the time left equals its share), decaying over 20% of the run (Hägele et al.
        2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations":
        a 20% cooldown matches cosine)."""
        if isinstance(data, dict) and data.get("time") is not None:
            data = {"schedule": "wsd", "decay_fraction": TIMED_DECAY_FRACTION, **data}
        return data

    @model_validator(mode="after")
    def _steps_or_time(self) -> "TrainConfig":
        if self.time is not None:
            from lmobjectives.train.budget import parse_duration

            parse_duration(self.time)
            if "steps" in self.model_fields_set:
                raise UserError("give a number of steps or a time budget, not both "
                                f"(steps {self.steps}, time {self.time})")
        return self


TIMED_DECAY_FRACTION = 0.2
# `lmobj train` without --steps or --time: a budget of 4 minutes (the default job; with the
# default corpus it must end within 5 minutes on 2 CPU cores, setup and showcase included).
DEFAULT_TIME = "4m"
DEFAULT_JOB_CADENCE = {"eval_every": 200, "checkpoint_every": 100, "eval_batches": 12}


def default_budget(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with the default time budget when it gives neither ``train.steps`` nor
    ``train.time`` (with the default job's evaluation and checkpoint cadence, unless set)."""
    train = tree.get("train") or {}
    if "steps" in train or train.get("time") is not None:
        return tree
    return {**tree, "train": {**DEFAULT_JOB_CADENCE, **train, "time": DEFAULT_TIME}}


# Continual runs re-warm over 1% of their steps (Ibrahim et al. 2024 §6.1: 0.5-2% warmup
# all end at the same loss; 1% is their choice); fresh runs keep TrainConfig's default.
REWARM_FRACTION = 0.01

class DistributedConfig(_Strict):
    """How several processes (``torchrun``) share the work; ignored by one process, except
    that ``fsdp`` runs always write sharded (DCP) checkpoints."""

    strategy: Literal["ddp", "fsdp"] = "ddp"


class LogConfig(_Strict):
    """Experiment trackers fed on top of ``metrics.jsonl`` (``train/trackers.py``); changing
    them does not change the training, so a resumed run may add or drop one."""

    backends: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    wandb_project: str = "lmobjectives"


def decoder_form(objective: str, architecture: str) -> str:
    """``decoder`` for an objective that trains decoders only in another form means that
    form: ``prefix_lm`` (span, UL2, prefix) or ``bidirectional_decoder`` (masked diffusion:
    a decoder backbone with full attention inside each document); anything else is kept."""
    from lmobjectives.objectives import OBJECTIVES

    cls_ = OBJECTIVES.get(objective)
    if architecture != "decoder" or cls_ is None or "decoder" in cls_.architectures:
        return architecture
    return next((a for a in ("prefix_lm", "bidirectional_decoder") if a in cls_.architectures),
                architecture)


class RunConfig(_Strict):
    # The default job: a code model, CLM + FIM at rate 0.5 (FIM paper: infilling "for free").
    objective: str = "fim"
    objective_params: dict[str, Any] = Field(default_factory=dict)
    architecture: str | None = None  # None: the objective's default
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    out: str | None = None  # run directory; None: runs/<objective>-<timestamp>

    @model_validator(mode="before")
    @classmethod
    def _decoder_alias(cls, data: Any) -> Any:
        """``architecture: decoder`` means the objective's decoder form (``decoder_form``)."""
        if isinstance(data, dict) and data.get("architecture") == "decoder":
            objective = data.get("objective", cls.model_fields["objective"].default)
            data = {**data, "architecture": decoder_form(objective, "decoder")}
        return data

    @model_validator(mode="before")
    @classmethod
    def _rewarm_default(cls, data: Any) -> Any:
        """An initialised run without an explicit warmup re-warms over REWARM_FRACTION."""
        if not isinstance(data, dict):
            return data
        model, train = data.get("model"), data.get("train")
        init = model.get("init_from") if isinstance(model, dict) else getattr(model, "init_from", None)
        if not init:
            return data
        if train is None or isinstance(train, dict):
            if "warmup_fraction" not in (train or {}):
                data = {**data, "train": {**(train or {}), "warmup_fraction": REWARM_FRACTION}}
        elif "warmup_fraction" not in train.model_fields_set:
            data = {**data, "train": train.model_copy(update={"warmup_fraction": REWARM_FRACTION})}
        return data

    @model_validator(mode="after")
    def _known_objective(self) -> "RunConfig":
        from lmobjectives.objectives import objective_class

        cls = objective_class(self.objective)
        if self.architecture is not None and self.architecture not in cls.architectures:
            raise ValueError(f"objective '{self.objective}' trains {', '.join(cls.architectures)}, "
                             f"not '{self.architecture}'")
        if self.model.init_from is None:  # check the preset before any data is prepared
            from lmobjectives.models.presets import check_preset

            check_preset(self.model.preset, self.resolved_architecture)
        return self

    @property
    def resolved_architecture(self) -> str:
        from lmobjectives.objectives import objective_class

        return self.architecture or objective_class(self.objective).architectures[0]


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_fields


def _suggest(key_path: list[str]) -> str:
    """Closest valid dotted key to an unknown one."""
    model: type[BaseModel] = RunConfig
    good: list[str] = []
    for part in key_path:
        fields = _fields(model)
        if part not in fields:
            close = difflib.get_close_matches(part, fields, n=1)
            return ".".join(good + [close[0]]) if close else ""
        good.append(part)
        ann = fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return ""
    return ""


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc) or "config"
        if err["type"] == "extra_forbidden":
            hint = _suggest(loc)
            lines.append(f"unknown config key '{key}'" + (f"; did you mean '{hint}'?" if hint else ""))
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"bad value for '{key}': {msg}")
    return "; ".join(lines)


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars and lists (``3``, ``1e-3``, ``true``, ``[a, b]``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_key(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``dotted`` = ``a.b`` (groups created as needed)."""
    *parents, last = dotted.strip().split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: '{p}' is not a group of keys")
    node[last] = value


def apply_set(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise UserError(f"--set takes key=value, got '{assignment}'")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] == "objective" and len(parts) > 1:
        parts = ["objective_params", *parts[1:]]
    set_key(tree, ".".join(parts), parse_value(value))


def build_config(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(_explain(exc)) from None
    except UserError:
        raise


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        tree = yaml.safe_load(text) or {}
    except (yaml.YAMLError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not valid YAML: {first}") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    return tree


def config_to_yaml(cfg: RunConfig, given_only: bool = False) -> str:
    """The resolved config; a timed run's number of steps is its plan's (in the checkpoints
    and ``run.json``), not a config key, so the file does not give both. ``given_only``:
    only the keys that were given (reloaded, the same config, and the same keys unset — a
    timed run without a preset is still sized)."""
    tree = cfg.model_dump(mode="json", exclude_unset=given_only)
    if cfg.train.time is not None:
        tree.get("train", {}).pop("steps", None)
    return yaml.safe_dump(tree, sort_keys=False)


# Keys a resumed run may change: it continues with its own config otherwise.
RESUME_MAY_CHANGE = ("train.steps", "log.backends")  # trackers watch a run, they do not change it


def check_resume_flags(given: dict[str, Any], config_file: str | None, sets: list[str] | None) -> None:
    """``--resume`` continues a run with its own config: only ``--steps`` (and ``--log``) may change."""
    extra = set(given) - set(RESUME_MAY_CHANGE)
    if extra or config_file or sets:
        raise UserError("--resume continues a run with its own config; only --steps may change (and --log) "
                        f"(got {', '.join(sorted(extra)) or 'a config'})")


def config_from_flags(given: dict[str, Any], config_file: str | None,
                      sets: list[str] | None) -> RunConfig:
    """A new run's config: the config file, then the command's flags (dotted keys), then each
    ``--set key=value`` in order — a later source wins; without steps or a time, the
    default budget (``default_budget``)."""
    tree = load_config_file(config_file) if config_file else {}
    for key, value in given.items():
        set_key(tree, key, value)
    for assignment in sets or []:
        apply_set(tree, assignment)
    return build_config(default_budget(tree))


def parse_mix(items: list[str]) -> list[dict[str, Any]]:
    """``PATH=WEIGHT`` strings (``--mix``) -> ``data.mix`` entries."""
    out = []
    for item in items:
        path, sep, weight = item.rpartition("=")
        if not sep or not path:
            raise UserError(f"--mix takes PATH=WEIGHT (e.g. --mix domain/=0.8), got '{item}'")
        try:
            w = float(weight)
        except ValueError:
            raise UserError(f"--mix {item}: weight '{weight}' is not a number") from None
        if not w > 0:
            raise UserError(f"--mix {item}: weight must be positive")
        out.append({"path": path, "weight": w})
    return out


def given_flags(flags: dict[str, Any], mix: list[str] | None) -> dict[str, Any]:
    """The dotted-key flags a user gave (None and [] mean "not given"); ``--mix`` entries
    become ``data.mix``, which names every source and so excludes ``--corpus``/``--data``."""
    given = {k: v for k, v in flags.items() if v not in (None, [])}
    if mix:
        if "data.corpus" in given or "data.store" in given:
            raise UserError("give either --mix or --corpus/--data: --mix names every source with its weight")
        given["data.mix"] = parse_mix(mix)
    return given
