"""The objective interface: a pure, seeded numpy transform from packed token rows to
architecture-neutral features.

The split follows seqio's task features vs model features: an objective says *what* is
predicted from *what*; a converter (``lmobjectives.data.converters``) says how a given
architecture sees it. So span corruption can train an encoder-decoder or a decoder-only
prefix LM from the same ``Features``.

Two shapes of features exist:

* single stream (``inputs is None``): ``targets`` is a sequence the model reads and predicts
  left to right (CLM, FIM, MTP). ``target_mask[b, t]`` says token ``t`` is scored, predicted
  from the tokens before it (HF's unshifted ``labels`` convention). ``positions`` carries
  per-document positions of packed rows.
* conditioned (``inputs`` given): the model reads ``inputs[b, :input_lengths[b]]`` and
  predicts ``targets`` (span corruption, UL2, prefix LM). For the ``encoder`` architecture
  (MLM) ``inputs`` and ``targets`` are aligned position by position instead.

Worked example, CLM on one packed row (EOS = 0, PAD = 1)::

    rows.tokens    = [[5, 6, 0, 7, 8, 0, 1, 1]]
    rows.positions = [[0, 1, 2, 0, 1, 2, 0, 0]]
    targets        = rows.tokens
    target_mask    = [[F, T, T, F, T, T, F, F]]   # a document's first token and PAD are never scored
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmobjectives.tokenizer.special import SpecialIds

ARCHITECTURES = ("decoder", "prefix_lm", "encoder", "encoder_decoder")
# The label value HF losses skip (``torch.nn.CrossEntropyLoss(ignore_index=-100)``); defined
# here, the lowest stage that writes labels, and imported by data/, loss and train/.
IGNORE = -100

# How an objective's model fills a gap in a text (``Capabilities.infill``):
#   "fim_prompt"     FIM sentinels, PSM/SPM prompts with <fim_prefix>... (a decoder)
#   "sentinel_spans" T5-style <extra_id_N> spans, answered in order (encoder-decoder, prefix LM)
#   "left_to_right"  no infilling form of its own: it only continues a prefix
#   "unmasking"      iterative unmasking of [MASK] positions (masked diffusion)
#   "none"           it does not generate (a masked-LM encoder)
INFILL_KINDS = ("fim_prompt", "sentinel_spans", "left_to_right", "unmasking", "none")
ACCURACY_KEYS = ("accuracy", "masked_accuracy")
MODEL_KINDS = ("standard", "mtp")


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What an objective's model can do, declared once by the objective so that evaluation,
    inference and comparison ask it instead of comparing objective names.

    ``architectures``: the architectures it trains, the first the default.
    ``infill``: one of ``INFILL_KINDS``, how its model fills a gap (see above).
    ``infill_benchmark``: its decoder runs get the single-line infill exact match of
    ``lmobj eval`` (FIM itself, and CLM as the baseline FIM is measured against).
    ``accuracy_key``: the name its held-out accuracy is reported under; ``masked_accuracy``
    when only masked positions are scored.
    ``mode_token``: the ``SpecialIds`` field of the mode token put before an inference prompt
    (UL2's R-denoiser ``[NLU]`` for span infilling, UL2 §3.1.3), or None.
    ``drafts_tokens``: its model carries draft heads for self-speculative decoding.
    ``model_kind``: which model + loss the train loop builds for it (``MODEL_KINDS``).

    Only ``architectures`` and ``infill`` must be given; the defaults are what a plain
    next-token or denoising objective has (``accuracy``, no mode token, no drafts, standard).

    A masked-diffusion objective would declare ``Capabilities(architectures=("encoder",),
    infill="unmasking", accuracy_key="masked_accuracy")``.
    """

    architectures: tuple[str, ...]
    infill: str  # no default: how a model fills a gap is every objective's own decision
    infill_benchmark: bool = False
    accuracy_key: str = "accuracy"
    mode_token: str | None = None
    drafts_tokens: bool = False
    model_kind: str = "standard"

    def __post_init__(self) -> None:
        bad = [a for a in self.architectures if a not in ARCHITECTURES]
        if not self.architectures or bad:
            raise ValueError(f"architectures must be a non-empty subset of {ARCHITECTURES}, "
                             f"got {self.architectures}")
        for field, value, allowed in (("infill", self.infill, INFILL_KINDS),
                                      ("accuracy_key", self.accuracy_key, ACCURACY_KEYS),
                                      ("model_kind", self.model_kind, MODEL_KINDS)):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        if self.mode_token is not None and self.mode_token not in SpecialIds.__dataclass_fields__:
            raise ValueError(f"mode_token {self.mode_token!r} is not a SpecialIds field")

    @property
    def default_architecture(self) -> str:
        return self.architectures[0]


@dataclass(frozen=True)
class Rows:
    """A batch of packed rows as the loader serves them.

    ``tokens``: (B, R) documents each followed by EOS, concatenated; the last row of an epoch
    is padded with PAD. ``positions``: (B, R) offset of each token in its document, restarting
    at 0 at every document start and at the start of every row.
    """

    tokens: np.ndarray  # (B, R) int32
    positions: np.ndarray  # (B, R) int32

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, eos: int) -> "Rows":
        """Rows from raw token rows, positions recomputed from EOS separators (for tests, `show`)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        return cls(tokens=tokens, positions=positions_from_eos(tokens, eos))


def positions_from_eos(tokens: np.ndarray, eos: int) -> np.ndarray:
    """Per-document positions: restart at 0 after every EOS and at each row start.

    >>> positions_from_eos(np.array([[5, 6, 0, 7, 0, 9]]), eos=0).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    B, R = tokens.shape
    idx = np.broadcast_to(np.arange(R, dtype=np.int32), (B, R))
    starts = np.zeros((B, R), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return (idx - last_start).astype(np.int32)


@dataclass(frozen=True)
class Features:
    """Architecture-neutral output of an objective for one batch (see module docstring)."""

    targets: np.ndarray  # (B, T) int32, PAD where unused
    target_mask: np.ndarray  # (B, T) bool: scored target tokens
    positions: np.ndarray | None = None  # (B, T) int32, single-stream features only
    inputs: np.ndarray | None = None  # (B, S) int32, PAD where unused
    input_lengths: np.ndarray | None = None  # (B,) int32: valid prefix of each inputs row
    target_lengths: np.ndarray | None = None  # (B,) int32: valid prefix of each targets row
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per-objective stats

    def __post_init__(self) -> None:
        if self.targets.shape != self.target_mask.shape:
            raise ValueError(f"targets {self.targets.shape} != target_mask {self.target_mask.shape}")
        if (self.inputs is None) != (self.input_lengths is None):
            raise ValueError("inputs and input_lengths come together")


class Objective(abc.ABC):
    """A pre-training objective. Subclasses are frozen keyword-only dataclasses whose fields
    are the objective's parameters (``lmobj train --set objective.PARAM=VALUE``); a field with
    ``metadata={"param": False}`` is a table derived from the tokenizer, not a parameter."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    # Mirrors of ``capabilities`` fields, set for every subclass by ``__init_subclass__``.
    architectures: ClassVar[tuple[str, ...]]  # the first is the default
    model_kind: ClassVar[str]

    specials: SpecialIds

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        caps = cls.__dict__.get("capabilities")
        if caps is not None:
            cls.architectures = caps.architectures
            cls.model_kind = caps.model_kind

    def row_length(self, seq_len: int) -> int:
        """Length of the packed rows this objective needs to make features of ``seq_len``."""
        return seq_len

    @abc.abstractmethod
    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        """Transform a batch of rows. Pure: same rows and rng state give the same features."""

    def params(self) -> dict[str, object]:
        """The objective's parameters, for config files and reports."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name != "specials" and f.metadata.get("param", True)}


def single_stream_mask(rows: Rows, specials: SpecialIds) -> np.ndarray:
    """Scored tokens of a packed CLM row: everything but a document's first token and PAD."""
    return (rows.positions > 0) & (rows.tokens != specials.pad)
