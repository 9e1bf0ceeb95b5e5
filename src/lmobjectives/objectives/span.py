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
from lmobjectives.tokenizer.special import SpecialIds

# Sort keys are int32: 29 random bits under a 2-bit region tag, so one sort orders every
# region of a row at once (regions 0..2 plus "never chosen" = 3 fit below 2**31).
_KEY_BITS = 29


# --------------------------------------------------------------------------- sampling helpers
# Written for speed on few, large arrays: every full-size temporary costs page faults, so
# the helpers keep to int32 / bool (B, R) arrays and do per-span work on short flat lists.


def random_u32(rng: np.random.Generator, shape: tuple[int, ...] | int) -> np.ndarray:
    """Uniform uint32 words straight from the bit generator (2.5x faster than ``integers``)."""
    size = int(np.prod(shape))
    raw = rng.bit_generator.random_raw((size + 1) // 2)  # uint64, two words per draw
    return raw.view(np.uint32)[:size].reshape(shape)


def non_pad_lengths(tokens: np.ndarray, pad: int) -> np.ndarray:
    """Real tokens per row: PAD only ever fills a row's tail (the epoch's last row)."""
    return np.count_nonzero(tokens != pad, axis=1).astype(np.int64)  # (B,)


def ranked_keys(region: np.ndarray, sizes: np.ndarray, counts: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random keys whose smallest ``counts[b, r]`` in region ``r`` are a uniform choice.

    ``region`` (B, W) int8 (or (1, W), shared by all rows) holds 0..K-1 for candidate
    positions and K for positions never chosen; ``sizes`` (B, K) counts each region's
    positions and ``counts`` (B, K) says how many to choose. Returns int32 ``keys`` (B, W), tagged so that region r's keys lie in
    [r * 2**29, (r + 1) * 2**29), and ``thresholds`` (B, K): the largest chosen key of each
    region, -1 where nothing is chosen; ``in_region(keys, r, thresholds)`` is the choice.
    One int32 sort orders every region of every row at once. Keys tied across a threshold
    would make the choice depend on the sort, so those rows (probability ~ W * 2**-29) are
    drawn again: the choice is exactly uniform.
    """
    starts = np.cumsum(sizes, axis=1) - sizes  # (B, K) first sorted slot of each region
    region = np.broadcast_to(region, (sizes.shape[0], region.shape[1]))
    keys = _tagged_keys(region, rng)
    thresholds, tied = _thresholds(keys, starts, sizes, counts)
    while tied.any():
        redo = np.flatnonzero(tied)
        keys[redo] = _tagged_keys(region[redo], rng)
        thresholds[redo], tied[redo] = _thresholds(keys[redo], starts[redo], sizes[redo],
                                                   counts[redo])
    return keys, thresholds


def in_region(keys: np.ndarray, r: int, thresholds: np.ndarray) -> np.ndarray:
    """(B, W) bool: the positions of region ``r`` that ``ranked_keys`` chose."""
    chosen = keys <= thresholds[:, r:r + 1]
    if r:
        chosen &= keys >= (r << _KEY_BITS)
    return chosen


def _tagged_keys(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, W) int32: 29 random bits under the region number."""
    keys = random_u32(rng, region.shape)
    keys >>= 32 - _KEY_BITS
    keys = keys.view(np.int32)
    if region.strides[0] == 0:  # one region row for all rows: tag it once, broadcast
        region = region[:1]
    keys |= np.left_shift(region, _KEY_BITS, dtype=np.int32)
    return keys  # (B, W)


def _thresholds(keys: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row and region the ``counts``-th smallest key (-1 for none), and whether the
    next key of the region equals it (a tie the caller must draw again)."""
    B, W = keys.shape
    if W == 0:
        return np.full(counts.shape, -1, np.int32), np.zeros(B, dtype=bool)
    ordered = np.sort(keys, axis=1)  # (B, W)
    rows = np.arange(B)[:, None]
    last = np.clip(starts + counts - 1, 0, W - 1)  # (B, K) slot of the largest chosen key
    thresholds = np.where(counts > 0, ordered[rows, last], -1).astype(np.int32)
    following = ordered[rows, np.minimum(last + 1, W - 1)]
    tied = ((counts > 0) & (counts < sizes) & (following == thresholds)).any(axis=1)
    return thresholds, tied


def _piece_lengths(cut_at: np.ndarray, n_pieces: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Lengths of each row's pieces, row-major, from the cut points inside ``total`` items.

    ``cut_at`` holds the sorted cut points of all rows in row-major order, ``n_pieces`` - 1
    per row. Example: cuts [2, 5] and [] in rows of 7 and 3 items -> [2, 3, 2, 3].
    """
    ends = np.empty(int(n_pieces.sum()), dtype=np.int64)
    row_end = np.cumsum(n_pieces) - 1  # slot of each row's last piece
    is_cut = np.ones(ends.size, dtype=bool)
    is_cut[row_end] = False
    ends[is_cut] = cut_at
    ends[row_end] = total
    lengths = np.diff(ends, prepend=0)
    lengths[row_end[:-1] + 1] = ends[row_end[:-1] + 1]  # a row's first piece starts at 0
    return lengths


def _block_piece_lengths(cut_at: np.ndarray, total: int) -> np.ndarray:
    """``_piece_lengths`` when every row has the same cuts count: ``cut_at`` is (B, k - 1)."""
    ends = np.empty((cut_at.shape[0], cut_at.shape[1] + 1), dtype=np.int64)  # (B, k)
    ends[:, :-1] = cut_at
    ends[:, -1] = total
    return np.diff(ends, axis=1, prepend=0).reshape(-1)


# --------------------------------------------------------------------------- noise mask


def noise_counts(lengths: np.ndarray, noise_density: np.ndarray | float,
                 mean_span: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """T5's deterministic counts (noise tokens, noise spans) per row; zero for rows < 2 tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    L = np.maximum(lengths, 2)  # T5 raises the length to 2 "to avoid degeneracy"
    noise = np.clip(np.round(L * np.asarray(noise_density, np.float64)).astype(np.int64), 1, L - 1)
    spans = np.maximum(np.round(noise / np.asarray(mean_span, np.float64)).astype(np.int64), 1)
    spans = np.minimum(spans, L - noise)  # each non-noise piece needs a token too
    short = lengths < 2
    return np.where(short, 0, noise), np.where(short, 0, spans)


def random_spans_noise_mask(lengths: np.ndarray, width: int, noise_density: np.ndarray | float,
                            mean_span: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """(B, width) bool noise mask over the first ``lengths[b]`` positions of each row.

    ``noise_density`` and ``mean_span`` are scalars or per-row arrays (UL2 mixes denoisers in
    one batch). T5 cuts the noise tokens into ``spans`` pieces by shuffling ``spans - 1``
    "new piece" marks over the gaps between them; choosing a uniform ``spans - 1`` subset of
    the ``noise - 1`` gaps is the same distribution. Both spaces (noise gaps, then non-noise
    gaps) share one row of sort keys, then the pieces are laid out clean, noise, clean, ...
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    B = lengths.shape[0]
    if B and np.ndim(noise_density) == np.ndim(mean_span) == 0 and (lengths == lengths[0]).all():
        counts = row_counts(int(lengths[0]), noise_density, mean_span)  # one row's worth
        noise, spans = (np.full(B, c, dtype=np.int64) for c in counts)
    else:
        noise, spans = noise_counts(lengths, noise_density, mean_span)
    live = np.flatnonzero(lengths >= 2)  # rows of < 2 tokens carry no noise
    if width < 2 or live.size == 0:
        return np.zeros((B, width), dtype=bool)
    n, noise, spans = lengths[live], noise[live], spans[live]
    clean = n - noise
    W = width - 2  # (noise - 1) + (clean - 1) gaps = n - 2 <= width - 2
    # Usually every row has the same counts (full rows of one objective): then one region
    # row serves all rows and the cuts form a (rows, spans - 1) block.
    same = bool((n == n[0]).all() and (noise == noise[0]).all() and (spans == spans[0]).all())
    # Region per gap column: noise gaps (0), then clean gaps (1), then unused columns (2).
    sizes = np.stack([noise - 1, clean - 1, W - (n - 2)], 1)  # (b, 3)
    regions = sizes[:1] if same else sizes
    region = np.repeat(np.tile(np.arange(3, dtype=np.int8), regions.shape[0]), regions.reshape(-1))
    region = region.reshape(regions.shape[0], W)
    cuts = np.repeat((spans - 1)[:, None], 2, axis=1)  # (b, 2) the same in both spaces
    keys, thresholds = ranked_keys(region, sizes[:, :2], cuts, rng)
    # A cut in gap column c of a space starts a new piece at item c + 1 of that space.
    pieces = np.empty((spans.sum(), 2), dtype=np.int64)  # (total spans, [clean, noise])
    if same:  # each space is one column block: look for cuts inside it only
        a, b, k = int(noise[0]) - 1, int(n[0]) - 2, int(spans[0]) - 1
        noise_cut = np.flatnonzero(keys[:, :a] <= thresholds[:, :1]) % max(a, 1) + 1
        clean_cut = np.flatnonzero(keys[:, a:b] <= thresholds[:, 1:]) % max(b - a, 1) + 1
        pieces[:, 0] = _block_piece_lengths(clean_cut.reshape(live.size, k), int(clean[0]))
        pieces[:, 1] = _block_piece_lengths(noise_cut.reshape(live.size, k), int(noise[0]))
    else:
        noise_cut = np.flatnonzero(in_region(keys, 0, thresholds)) % max(W, 1) + 1
        clean_cut = np.flatnonzero(in_region(keys, 1, thresholds)) % max(W, 1)
        clean_cut -= np.repeat(noise - 1, spans - 1) - 1
        pieces[:, 0] = _piece_lengths(clean_cut, spans, clean)
        pieces[:, 1] = _piece_lengths(noise_cut, spans, noise)
    flat = np.repeat(np.tile(np.array([False, True]), pieces.shape[0]), pieces.reshape(-1))
    mask = np.zeros((B, width), dtype=bool)
    if live.size == B and (n == width).all():
        mask.reshape(-1)[:] = flat  # every row full: the pieces tile the batch
    else:
        filled = np.zeros((B, width), dtype=bool)
        filled[live] = np.arange(width)[None, :] < n[:, None]
        mask[filled] = flat
    return mask


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
    B, R = tokens.shape
    with_sent = np.broadcast_to(np.asarray(sentinels, bool), (B,))
    eos = np.broadcast_to(np.asarray(close_with_eos, bool), (B,)).astype(np.int64)
    lead = 0 if mode_tokens is None else 1
    opens = noise.copy()  # (B, R) first token of each noise span that gets a sentinel
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
    sentinel = sentinel_ids[rank]  # (total spans,)

    keep = tokens != specials.pad  # (B, R) tokens that reach the inputs
    keep &= ~noise
    keep |= opens
    n_keep = np.count_nonzero(keep, axis=1)  # (B,)
    in_len = n_keep + lead + eos
    S = int(in_len.max(initial=1)) if input_width is None else input_width
    values = tokens.copy()
    values.reshape(-1)[np.flatnonzero(opens)] = sentinel
    inputs = np.full((B, S), specials.pad, dtype=tokens.dtype)
    _pour(inputs, values[keep], n_keep, lead)
    if mode_tokens is not None:
        inputs[:, 0] = mode_tokens
    closing = np.flatnonzero(eos)
    inputs[closing, (lead + n_keep)[closing]] = specials.eos

    # Targets: every noise token, each span's first one preceded by its sentinel.
    noise_at = np.flatnonzero(noise)  # (total noise,) row-major
    n_body = np.count_nonzero(noise, axis=1) + n_open  # (B,)
    opens_at = opens.reshape(-1)[noise_at]  # which noise tokens open a span
    slot = np.arange(noise_at.size) + np.cumsum(opens_at)  # their place in the flat body
    body = np.empty(int(n_body.sum()), dtype=tokens.dtype)
    body[slot] = tokens.reshape(-1)[noise_at]
    body[slot[opens_at] - 1] = sentinel
    tg_len = n_body + eos
    T = int(tg_len.max(initial=1)) if target_width is None else target_width
    targets = np.full((B, T), specials.pad, dtype=tokens.dtype)
    _pour(targets, body, n_body, 0)
    targets[closing, n_body[closing]] = specials.eos
    return Denoised(inputs=inputs, input_lengths=in_len.astype(np.int32), targets=targets,
                    target_lengths=tg_len.astype(np.int32))


# --------------------------------------------------------------------------- lengths


def row_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """``noise_counts`` for one row in plain Python (no array overhead; same rounding:
    Python's ``round`` and ``np.round`` both round halves to even)."""
    if length < 2:
        return 0, 0
    noise = min(max(round(length * float(noise_density)), 1), length - 1)
    spans = min(max(round(noise / float(mean_span)), 1), length - noise)
    return noise, spans


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
