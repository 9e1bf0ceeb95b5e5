"""Noise masks shared by the denoising objectives: which tokens of a row to corrupt.

Span corruption and UL2 draw T5's ``random_spans_noise_mask`` (spans of noise interleaved
with clean pieces, see ``objectives/span.py`` for the algorithm and a worked example); MLM
draws a fixed-size random subset of a region per row with the same sort-key machinery
(``ranked_keys``, ``in_region``); the prefix LM needs only ``non_pad_lengths``. The helpers
are pure numpy and seeded by the caller's ``np.random.Generator``.

Worked example of the counts (``noise_counts``): a row of 8 real tokens at density 0.25 and
mean span 1 has ``noise = clip(round(8 * 0.25), 1, 7) = 2`` tokens in
``max(1, round(2 / 1)) = 2`` spans, whatever the randomness.
"""

from __future__ import annotations

import numpy as np

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


def row_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """``noise_counts`` for one row in plain Python (no array overhead; same rounding:
    Python's ``round`` and ``np.round`` both round halves to even)."""
    if length < 2:
        return 0, 0
    noise = min(max(round(length * float(noise_density)), 1), length - 1)
    spans = min(max(round(noise / float(mean_span)), 1), length - noise)
    return noise, spans


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
