"""T5 span corruption: replace random spans of a row by sentinels, predict the spans.

Algorithm (T5 ``random_spans_noise_mask`` + ``noise_span_to_unique_sentinel``, T5 §3.1.4),
vectorised over the batch instead of one example at a time:

1. For a row of ``n`` real (non-PAD) tokens the counts are deterministic:
   ``noise = clip(round(n * density), 1, n - 1)``, ``spans = max(1, round(noise / mean_span))``.
2. The noise tokens are cut into ``spans`` non-empty pieces and the other tokens into
   ``spans`` non-empty pieces, each uniformly over all compositions (a uniform subset of the
   gaps between tokens becomes the cut points). The pieces interleave starting with a
   non-noise piece, so a row always starts clean and ends in noise.
3. Inputs: the row with the i-th noise span replaced by ``specials.sentinels[i]``, then EOS.
   Targets: ``sentinel_i, span_i tokens`` for each span in order, then EOS.

Worked example (sentinels 10, 11; EOS 0), one row of 8 tokens, density 0.25, mean span 1
(2 noise tokens in 2 spans)::

    tokens  = [[21, 22, 23, 24, 25, 26, 27, 28]]
    noise   = [[ F,  F,  T,  F,  F,  F,  F,  T]]
    inputs  = [[21, 22, 10, 24, 25, 26, 27, 11, 0]]
    targets = [[10, 23, 11, 28, 0]]

Trade-off: the counts do not depend on the randomness, so ``row_length`` can promise that a
full row's inputs fill ``seq_len`` exactly and its targets fill ``target_length(seq_len)``
(T5's ``random_spans_helper``: 568 raw tokens -> 512 inputs, 114 targets at 0.15 / 3;
``raw_length`` notes the one degenerate corner where inputs fall a token short). The
price is T5's positional bias: the last token of a row is always noise (T5 issue #905).

Packed rows keep their inner EOS separators as ordinary tokens that may be corrupted, as
T5 does with concatenated documents. A row ending in PAD is corrupted on its real tokens only.
Two small departures from T5, both for degenerate inputs only: ``spans`` is also capped at the
number of non-noise tokens (the guard of HF's port, needed when density > 0.5), and a row of
fewer than two real tokens gets no noise at all (T5 would emit a lone sentinel as target).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from lmobjectives.objectives.base import Capabilities, Features, Objective, Rows
from lmobjectives.objectives.noise import non_pad_lengths, random_spans_noise_mask, row_counts
from lmobjectives.tokenizer.special import SpecialIds

# --------------------------------------------------------------------------- inputs / targets


@dataclass(frozen=True)
class Denoised:
    """Conditioned examples: ``inputs`` (B, S) and ``targets`` (B, T), PAD-filled, with lengths."""

    inputs: np.ndarray
    input_lengths: np.ndarray
    targets: np.ndarray
    target_lengths: np.ndarray

    def features(self, **extras: np.ndarray) -> Features:
        T = self.targets.shape[1]
        valid = np.arange(T)[None, :] < self.target_lengths[:, None]  # (B, T)
        return Features(targets=self.targets, target_mask=valid, inputs=self.inputs,
                        input_lengths=self.input_lengths, target_lengths=self.target_lengths,
                        extras=dict(extras))


def _pour(out: np.ndarray, flat: np.ndarray, counts: np.ndarray, lead: int) -> None:
    """Write ``flat`` (row-major) into ``out[b, lead:lead + counts[b]]`` for every row."""
    if counts.size and (counts == counts[0]).all():  # full rows of span corruption: one block
        out[:, lead:lead + int(counts[0])] = flat.reshape(counts.size, -1)
        return
    col = np.arange(out.shape[1])[None, :]
    out[(col >= lead) & (col < (lead + counts)[:, None])] = flat


def denoise(tokens: np.ndarray, noise: np.ndarray, specials: SpecialIds, *,
            sentinels: np.ndarray | bool = True, close_with_eos: np.ndarray | bool = True,
            mode_tokens: np.ndarray | None = None, input_width: int | None = None,
            target_width: int | None = None) -> Denoised:
    """Split rows into inputs (clean tokens) and targets (noise tokens), per row options.

    ``noise`` (B, R) marks target tokens (it must be False on PAD). Per row (scalar or (B,)):
    ``sentinels`` replaces each noise span in the inputs by the next sentinel and opens the
    span in the targets with it (span corruption; False for prefix LM, where the noise is
    one suffix); ``close_with_eos`` appends EOS to both; ``mode_tokens`` (B,) is put in front
    of the inputs (UL2). Widths default to the longest row in the batch.

    Both sides are built as one flat row-major list of every row's tokens, then poured into
    the PAD-filled (B, width) array through a mask of each row's leading slots.
    """
    B = tokens.shape[0]
    with_sent = np.broadcast_to(np.asarray(sentinels, bool), (B,))
    eos = np.broadcast_to(np.asarray(close_with_eos, bool), (B,)).astype(np.int64)
    opens, n_open, sentinel = _span_openings(tokens, noise, specials, with_sent)
    inputs, in_len = _inputs_side(tokens, noise, opens, sentinel, specials, eos=eos,
                                  mode_tokens=mode_tokens, width=input_width)
    targets, tg_len = _targets_side(tokens, noise, opens, n_open, sentinel, specials, eos=eos,
                                    width=target_width)
    return Denoised(inputs=inputs, input_lengths=in_len.astype(np.int32), targets=targets,
                    target_lengths=tg_len.astype(np.int32))


def _span_openings(tokens: np.ndarray, noise: np.ndarray, specials: SpecialIds,
                   with_sent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(opens (B, R): first token of each noise span that gets a sentinel, n_open (B,),
    sentinel (total spans,): the id each opening takes, in row-major order)."""
    opens = noise.copy()  # (B, R)
    opens[:, 1:] &= ~noise[:, :-1]
    if not with_sent.all():
        opens &= with_sent[:, None]
    n_open = np.count_nonzero(opens, axis=1)  # (B,)
    sentinel_ids = np.asarray(specials.sentinels, dtype=tokens.dtype)
    if int(n_open.max(initial=0)) > sentinel_ids.size:
        raise ValueError(f"a row needs {int(n_open.max())} sentinels but only "
                         f"{sentinel_ids.size} exist; use shorter rows or longer spans")
    # The k-th opening of a row (row-major order) takes sentinel k.
    rank = np.arange(int(n_open.sum())) - np.repeat(np.cumsum(n_open) - n_open, n_open)
    return opens, n_open, sentinel_ids[rank]


def _inputs_side(tokens: np.ndarray, noise: np.ndarray, opens: np.ndarray, sentinel: np.ndarray,
                 specials: SpecialIds, *, eos: np.ndarray, mode_tokens: np.ndarray | None,
                 width: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (B, S): [mode token] clean tokens, each noise span as its sentinel, [EOS]."""
    lead = 0 if mode_tokens is None else 1
    keep = tokens != specials.pad  # (B, R) tokens that reach the inputs
    keep &= ~noise
    keep |= opens
    n_keep = np.count_nonzero(keep, axis=1)  # (B,)
    in_len = n_keep + lead + eos
    S = int(in_len.max(initial=1)) if width is None else width
    values = tokens.copy()
    values.reshape(-1)[np.flatnonzero(opens)] = sentinel
    inputs = np.full((tokens.shape[0], S), specials.pad, dtype=tokens.dtype)
    _pour(inputs, values[keep], n_keep, lead)
    if mode_tokens is not None:
        inputs[:, 0] = mode_tokens
    closing = np.flatnonzero(eos)
    inputs[closing, (lead + n_keep)[closing]] = specials.eos
    return inputs, in_len


def _targets_side(tokens: np.ndarray, noise: np.ndarray, opens: np.ndarray, n_open: np.ndarray,
                  sentinel: np.ndarray, specials: SpecialIds, *, eos: np.ndarray,
                  width: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Targets (B, T): every noise token, each span's first one preceded by its sentinel, [EOS]."""
    noise_at = np.flatnonzero(noise)  # (total noise,) row-major
    n_body = np.count_nonzero(noise, axis=1) + n_open  # (B,)
    opens_at = opens.reshape(-1)[noise_at]  # which noise tokens open a span
    slot = np.arange(noise_at.size) + np.cumsum(opens_at)  # their place in the flat body
    body = np.empty(int(n_body.sum()), dtype=tokens.dtype)
    body[slot] = tokens.reshape(-1)[noise_at]
    body[slot[opens_at] - 1] = sentinel
    tg_len = n_body + eos
    T = int(tg_len.max(initial=1)) if width is None else width
    targets = np.full((tokens.shape[0], T), specials.pad, dtype=tokens.dtype)
    _pour(targets, body, n_body, 0)
    closing = np.flatnonzero(eos)
    targets[closing, n_body[closing]] = specials.eos
    return targets, tg_len


# --------------------------------------------------------------------------- lengths


def corrupted_lengths(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths, each with its EOS, for a row of ``length`` real tokens."""
    noise, spans = row_counts(length, noise_density, mean_span)
    return length - noise + spans + 1, noise + spans + 1


def raw_length(inputs_length: int, noise_density: float, mean_span: float) -> int:
    """T5's ``random_spans_helper``: the longest raw row whose inputs fit ``inputs_length``.

    Inputs grow by 0 or 1 token per raw token (mean_span >= 1), so the longest fitting row
    fills ``inputs_length`` exactly and every shorter row fits too. The one exception is the
    cap of spans at the clean tokens (only when density / mean_span > 1 - density, e.g.
    density 0.5 with mean span 1), where inputs can grow by 2 and fall one short. Unlike T5
    there is no special case for density 0.5 (T5 shortens the row by one so targets do not
    outgrow inputs): inputs fill ``inputs_length`` and targets are what they are.
    """
    if inputs_length < 3:
        raise ValueError(f"span corruption needs seq_len >= 3, got {inputs_length}")
    length = inputs_length - 1  # its inputs never exceed inputs_length (spans <= noise)
    # Jump near the answer first: inputs ~ length * (1 - d + d / mean) + 1.
    guess = int((inputs_length - 1) / (1 - noise_density + noise_density / mean_span)) - 2
    if guess > length and corrupted_lengths(guess, noise_density, mean_span)[0] <= inputs_length:
        length = guess
    while corrupted_lengths(length + 1, noise_density, mean_span)[0] <= inputs_length:
        length += 1
    return length


def check_sentinels(length: int, noise_density: float, mean_span: float, n_sentinels: int,
                    what: str) -> None:
    spans = row_counts(length, noise_density, mean_span)[1]
    if spans > n_sentinels:
        raise ValueError(
            f"{what} needs {spans} noise spans on rows of {length} tokens but the tokenizer has "
            f"only {n_sentinels} sentinels; use a shorter seq_len, a longer mean span or a "
            "lower noise density")


# --------------------------------------------------------------------------- the objective


@dataclass(frozen=True, kw_only=True)
class SpanCorruption(Objective):
    """T5 span corruption (T5 §3.1.4 defaults: noise density 0.15, mean span length 3)."""

    name: ClassVar[str] = "span"
    capabilities: ClassVar[Capabilities] = Capabilities(
        architectures=("encoder_decoder", "prefix_lm"), infill="sentinel_spans")

    specials: SpecialIds
    noise_density: float = 0.15
    mean_span_length: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if not self.mean_span_length >= 1.0:
            raise ValueError(f"mean_span_length must be >= 1, got {self.mean_span_length}")

    def row_length(self, seq_len: int) -> int:
        """Raw tokens per row so that a full row's inputs (with EOS) are exactly ``seq_len``."""
        length = raw_length(seq_len, self.noise_density, self.mean_span_length)
        check_sentinels(length, self.noise_density, self.mean_span_length,
                        len(self.specials.sentinels), f"span corruption at seq_len {seq_len}")
        return length

    def target_length(self, seq_len: int) -> int:
        """Targets (sentinels, spans, EOS) of a full row of ``row_length(seq_len)`` tokens."""
        return self._widths(self.row_length(seq_len))[1]

    def _widths(self, row_len: int) -> tuple[int, int]:
        return corrupted_lengths(row_len, self.noise_density, self.mean_span_length)

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        tokens = rows.tokens
        B, R = tokens.shape
        check_sentinels(R, self.noise_density, self.mean_span_length,
                        len(self.specials.sentinels), f"span corruption on rows of {R} tokens")
        noise = random_spans_noise_mask(non_pad_lengths(tokens, self.specials.pad), R,
                                        self.noise_density, self.mean_span_length, rng)  # (B, R)
        S, T = self._widths(R)  # lengths grow with the row, so a full row is the widest
        return denoise(tokens, noise, self.specials, input_width=S, target_width=T).features()
