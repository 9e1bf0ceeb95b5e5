"""Fill-in-the-middle (FIM paper, Bavarian et al. 2022): per document, with probability
``fim_rate``, cut the text at two uniformly random *character* positions into prefix, middle
and suffix and move the middle to the end behind sentinel tokens, so a left-to-right decoder
learns to infill. Otherwise the document stays plain CLM. Two orders (FIM paper; token
names and the SPM variant as in StarCoder)::

    PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

SPM is the paper's "variant 2": prefix and middle stay one contiguous text, so the target
continues the prefix exactly as the prompt will at inference.

The transform is context-level (the FIM paper finds it better than document-level): it runs
on packed rows, on every run of tokens between EOS separators (a whole document, or the
fragment of one that packing put in this row), each with its own coins. The EOS that ended a
document stays after its rearranged parts, so the model learns to close a middle with EOS.
The three sentinels and any split tokens make a FIM document longer, so the row is cut back to
``R``; a FIM document cut by the row end before its ``<fim_middle>`` (a prompt with no middle
to predict) is replaced by ``<fim_pad>``, which is never scored. A cut inside the middle is
kept and trained, as in the reference.

Character cuts without a decode/re-encode round trip: the objective holds ``FIMTables``
(``objectives/fim_tables.py``), built once from a byte-level BPE tokenizer, so a cut inside a
token replaces it by the tokens of its two byte pieces and the whole batch is one gather over
a run-length plan (numpy, no per-token Python loop).

Cut points are uniform over the ``N + 1`` character positions of a document of ``N``
characters (EOS excluded): two independent draws, sorted, empty parts allowed, as the
reference does. Cut ``c < N`` is located by a cumulative count of character starts per token
(a multi-byte character split over two tokens belongs to the token holding its first byte);
cut ``N`` is the document's end.

Worked example (EOS = 0, PRE = 2, SUF = 3, MID = 4; vocabulary bytes 6 = "def", 7 = " f",
8 = "de", 9 = "f", 10 = " ", 11 = "x"). One row holding the document "def f" (5 characters,
6 cut positions) and the start of a next one; cuts drawn at characters 2 and 4::

    rows.tokens   = [[6, 7, 0, 11, 11, 11, 11, 11]]   # "def f" EOS "xxxxx"
    prefix  "de"  : cut 2 is inside 6 "def" at byte 2  -> 6 splits into [8] "de" + [9] "f"
    middle  "f "  : [9] + [10]                          (cut 4 is inside 7 " f" at byte 1)
    suffix  "f"   : [9]
    PSM targets   = [[2, 8, 3, 9, 4, 9, 10, 0]]         # PRE de SUF f MID f_ EOS; "xxxxx" cut off
    SPM targets   = [[2, 3, 9, 4, 8, 9, 10, 0]]         # PRE SUF f MID de f_ EOS
    positions     = [[0, 1, 2, 3, 4, 5, 6, 7]]
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from lmobjectives.objectives.base import Capabilities, Features, Objective, Rows, single_stream_mask
from lmobjectives.objectives.fim_tables import FIMTables, build_tables
from lmobjectives.tokenizer.special import SpecialIds

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# FIM paper: rates up to 0.9 cost no left-to-right quality; StarCoder trains at 0.5 with half
# of the FIM documents in SPM order. We take StarCoder's 0.5 / 0.5.
DEFAULT_FIM_RATE = 0.5
DEFAULT_SPM_RATE = 0.5

# The run plan of one FIM document: 11 runs in a canonical order (each may be empty).
PRE, P1, P2, SUF, S1, S2, S3, MID, M1, M2, M3 = range(11)
N_RUNS = 11
# Emitted order of the runs: PSM keeps the canonical order, SPM moves the prefix runs
# (P1 = whole prefix tokens, P2 = left piece of a split token) between MID and the middle.
PSM_ORDER = np.array([PRE, P1, P2, SUF, S1, S2, S3, MID, M1, M2, M3])
SPM_ORDER = np.array([PRE, SUF, S1, S2, S3, MID, P1, P2, M1, M2, M3])
PSM_MID = int(np.flatnonzero(PSM_ORDER == MID)[0])  # column of <fim_middle> in each order
SPM_MID = int(np.flatnonzero(SPM_ORDER == MID)[0])


@dataclass(frozen=True, kw_only=True)
class FIM(Objective):
    """Fill-in-the-middle on packed rows (see module docstring). ``tables`` is not a parameter:
    it is derived from the tokenizer (``FIM.tables_from_tokenizer``) and attached with
    ``with_tables``; calling without it is an error."""

    name: ClassVar[str] = "fim"
    capabilities: ClassVar[Capabilities] = Capabilities(
        architectures=("decoder",), infill="fim_prompt", infill_benchmark=True)

    specials: SpecialIds
    fim_rate: float = DEFAULT_FIM_RATE
    spm_rate: float = DEFAULT_SPM_RATE
    tables: FIMTables | None = field(default=None, repr=False, compare=False,
                                     metadata={"param": False})

    def __post_init__(self) -> None:
        for key in ("fim_rate", "spm_rate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be a number in [0, 1], got {value!r}")
        if self.tables is not None:
            if not isinstance(self.tables, FIMTables):
                raise ValueError("tables are built from the tokenizer with "
                                 "FIM.tables_from_tokenizer, not set as a parameter")
            ids = (self.specials.fim_prefix, self.specials.fim_suffix, self.specials.fim_middle,
                   self.specials.fim_pad, self.specials.eos, self.specials.pad)
            if max(ids) >= self.tables.vocab_size:
                raise ValueError(f"FIM tables cover {self.tables.vocab_size} ids but the special "
                                 f"tokens reach id {max(ids)}: tables and tokenizer differ")

    @functools.cached_property
    def _source(self) -> np.ndarray:
        """The split pieces followed by PRE, SUF, MID: every token a FIM document gains."""
        assert self.tables is not None
        sp = self.specials
        sentinels = np.array([sp.fim_prefix, sp.fim_suffix, sp.fim_middle], dtype=np.int32)
        return np.concatenate([self.tables.pieces, sentinels])

    @functools.cached_property
    def _slots(self) -> np.ndarray:
        """Cut positions each token holds: its character starts; EOS and PAD are not text."""
        assert self.tables is not None
        slots = self.tables.char_starts.astype(np.int64)  # (V,)
        slots[[self.specials.eos, self.specials.pad]] = 0
        return slots

    def params(self) -> dict[str, object]:
        return {"fim_rate": self.fim_rate, "spm_rate": self.spm_rate}

    @classmethod
    def tables_from_tokenizer(cls, tokenizer: Tokenizer) -> FIMTables:
        """The tables for ``tokenizer`` (a byte-level BPE ``tokenizers.Tokenizer``)."""
        return build_tables(tokenizer)

    def with_tables(self, tables: FIMTables) -> "FIM":
        return dataclasses.replace(self, tables=tables)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, *, specials: SpecialIds | None = None,
                       **params: float) -> "FIM":
        """A FIM objective for ``tokenizer``: special ids from its vocabulary, tables built."""
        if specials is None:
            specials = SpecialIds.from_vocab(tokenizer.get_vocab(with_added_tokens=True),
                                             tokenizer.get_vocab_size(with_added_tokens=True))
        return cls(specials=specials, tables=build_tables(tokenizer), **params)

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        if self.tables is None:
            raise ValueError("FIM needs its tokenizer tables: "
                             "fim.with_tables(FIM.tables_from_tokenizer(tokenizer))")
        tokens = rows.tokens
        if tokens.ndim != 2:
            raise ValueError(f"rows must be (B, R), got shape {tokens.shape}")
        if tokens.size == 0:
            return Features(targets=tokens, target_mask=np.zeros(tokens.shape, dtype=bool),
                            positions=rows.positions)
        if int(tokens.max()) >= self.tables.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside the FIM tables "
                             f"({self.tables.vocab_size} ids): tables and tokenizer differ")
        units = _units(tokens, self.specials)
        coins = rng.random((len(units.start), 2))  # (U, 2) a FIM coin and an SPM coin per unit
        fim = units.is_doc & (coins[:, 0] < self.fim_rate)  # (U,)
        if not fim.any():  # plain CLM: the very arrays CLM returns
            return Features(targets=tokens, target_mask=single_stream_mask(rows, self.specials),
                            positions=rows.positions)
        spm = coins[fim, 1] < self.spm_rate  # (F,)
        runs = _fim_runs(tokens.reshape(-1), units, fim, rng, self)  # (F, N_RUNS) x2
        return _emit(rows, units, fim, spm, runs, self)


@dataclass(frozen=True)
class _Units:
    """A batch as units in row order: maximal runs of document tokens, and the gaps of
    EOS/PAD between them; a row start always starts a unit."""

    start: np.ndarray  # (U,) int64 flat index of the first token
    end: np.ndarray  # (U,) int64 flat index past the last token
    is_doc: np.ndarray  # (U,) bool


def _units(tokens: np.ndarray, specials: SpecialIds) -> _Units:
    B, R = tokens.shape
    flat = tokens.reshape(-1)  # (N,)
    content = (flat != specials.eos) & (flat != specials.pad)  # (N,)
    boundary = np.empty(flat.size, dtype=bool)
    boundary[0] = True
    np.not_equal(content[1:], content[:-1], out=boundary[1:])
    boundary[::R] = True
    start = np.flatnonzero(boundary)
    return _Units(start=start, end=np.append(start[1:], flat.size), is_doc=content[start])


def _fim_runs(flat: np.ndarray, units: _Units, fim: np.ndarray, rng: np.random.Generator,
              obj: FIM) -> tuple[np.ndarray, np.ndarray]:
    """Draw two cuts per FIM document and return its 11 canonical runs as (start, length),
    starts indexing ``concat(flat rows, FIM._source)``.

    With cuts at (token i1, split e1) <= (i2, e2), e = -1 for a cut between tokens::

        prefix = x[a:i1] + left(e1)    middle = right(e1) + x[i1':i2] + left(e2)
        suffix = right(e2) + x[i2':z]  where i' = i + 1 skips a split token
    """
    t = obj.tables
    assert t is not None
    a, z = units.start[fim], units.end[fim]  # (F,)
    slots = obj._slots[flat]  # (N,)
    # A document's first byte is a cut position even when packing began it mid-character.
    first_lead = t.lead[flat[a]]
    slots[a] += ~first_lead
    cum = np.cumsum(slots)  # (N,)
    before_a = cum[a] - slots[a]  # (F,)
    n_chars = cum[z - 1] - before_a  # (F,)
    # Two cuts uniform over the n_chars + 1 positions, sorted (the reference's randint pair).
    cuts = np.sort(rng.integers(0, n_chars[:, None] + 1, size=(len(a), 2)), axis=1)  # (F, 2)
    i1, e1 = _locate(cuts[:, 0], a, z, n_chars, before_a, cum, slots, flat, t)
    i2, e2 = _locate(cuts[:, 1], a, z, n_chars, before_a, cum, slots, flat, t)

    N, P = flat.size, flat.size + len(t.pieces)  # sentinels sit at P, P + 1, P + 2
    F = len(a)
    start = np.zeros((F, N_RUNS), dtype=np.int64)
    length = np.zeros((F, N_RUNS), dtype=np.int64)
    s1, s2 = e1 >= 0, e2 >= 0
    ee1, ee2 = np.maximum(e1, 0), np.maximum(e2, 0)
    start[:, PRE], start[:, SUF], start[:, MID] = P, P + 1, P + 2
    length[:, [PRE, SUF, MID]] = 1
    start[:, P1], length[:, P1] = a, i1 - a
    left1, right1 = t.piece_mid[ee1] - t.piece_start[ee1], t.piece_end[ee1] - t.piece_mid[ee1]
    left2, right2 = t.piece_mid[ee2] - t.piece_start[ee2], t.piece_end[ee2] - t.piece_mid[ee2]
    start[:, P2], length[:, P2] = N + t.piece_start[ee1], s1 * left1
    start[:, M1], length[:, M1] = N + t.piece_mid[ee1], s1 * right1
    start[:, M2], length[:, M2] = i1 + s1, np.maximum(i2 - (i1 + s1), 0)
    start[:, M3], length[:, M3] = N + t.piece_start[ee2], s2 * left2
    start[:, S1], length[:, S1] = N + t.piece_mid[ee2], s2 * right2
    start[:, S3], length[:, S3] = i2 + s2, z - (i2 + s2)
    for k in np.flatnonzero(s1 & (i1 == i2)):
        _same_token_cuts(start[k], length[k], int(e1[k]), int(e2[k]), t, N)
    return start, length


def _locate(cuts: np.ndarray, a: np.ndarray, z: np.ndarray, n_chars: np.ndarray,
            before_a: np.ndarray, cum: np.ndarray, slots: np.ndarray, flat: np.ndarray,
            t: FIMTables) -> tuple[np.ndarray, np.ndarray]:
    """Cuts (per document, in [0, n_chars]) -> (token index, split entry or -1).

    Cut c < n_chars is the document's c-th character start: it lies in token i, either at
    i's first byte (a cut before token i) or at one of i's interior splits. Cut n_chars is
    the document's end."""
    end = cuts == n_chars
    g = before_a + np.minimum(cuts, n_chars - 1)  # global slot number
    i = np.searchsorted(cum, g, side="right")  # the token whose slots contain g
    r = g - (cum[i] - slots[i])  # slot within token i
    has0 = t.lead[flat[i]] | (i == a)  # token i's slot 0 is its first byte
    entry = t.split_base[flat[i]] + r - has0
    entry = np.where((has0 & (r == 0)) | end, -1, entry)
    return np.where(end, z, i), entry


def _same_token_cuts(start: np.ndarray, length: np.ndarray, e1: int, e2: int, t: FIMTables,
                     N: int) -> None:
    """Both cuts inside one token (rare: ~1/len per document). The middle and suffix then come
    from the first split's right piece, cut again at the second split's byte offset, which is a
    character start inside one of that piece's tokens: a second table lookup, no encoding."""
    right = t.pieces[t.piece_mid[e1]:t.piece_end[e1]]
    ends = np.cumsum(t.nbytes[right])
    rel = int(t.split_offset[e2] - t.split_offset[e1])  # byte offset of cut 2 within `right`
    j = int(np.searchsorted(ends, rel, side="right"))
    o = rel - (int(ends[j - 1]) if j else 0)
    base = N + int(t.piece_mid[e1])
    start[M1], length[M1] = base, j
    length[M2] = length[M3] = length[S1] = 0
    if o == 0:  # cut 2 falls between tokens of the right piece
        start[S2], length[S2] = base + j, len(right) - j
        return
    u = int(right[j])
    lo, hi = int(t.split_base[u]), int(t.split_base[u + 1])
    e = lo + int(np.searchsorted(t.split_offset[lo:hi], o))
    start[M3], length[M3] = N + t.piece_start[e], t.piece_mid[e] - t.piece_start[e]
    start[S1], length[S1] = N + t.piece_mid[e], t.piece_end[e] - t.piece_mid[e]
    start[S2], length[S2] = base + j + 1, len(right) - j - 1


def _emit(rows: Rows, units: _Units, fim: np.ndarray, spm: np.ndarray,
          runs: tuple[np.ndarray, np.ndarray], obj: FIM) -> Features:
    """Lay the units' runs out row by row, truncate rows to R, pad cut-off prompts, and
    continue positions through FIM documents. Every output token is one gather from a run."""
    sp = obj.specials
    B, R = rows.tokens.shape
    N = B * R
    flat, in_pos = rows.tokens.reshape(-1), rows.positions.reshape(-1)  # (N,)
    U = len(units.start)
    unit_len_in = units.end - units.start  # (U,)

    # Runs per unit: a plain unit is one run of itself; a FIM unit its 11 runs in PSM/SPM order.
    order = np.where(spm[:, None], SPM_ORDER, PSM_ORDER)  # (F, N_RUNS)
    rr = np.arange(len(spm))[:, None]
    start = np.zeros((U, N_RUNS), dtype=np.int64)
    length = np.zeros((U, N_RUNS), dtype=np.int64)
    start[:, 0], length[:, 0] = units.start, unit_len_in
    start[fim], length[fim] = runs[0][rr, order], runs[1][rr, order]

    # Where every run lands in its row (before truncation to R).
    unit_len = length.sum(axis=1)  # (U,)
    unit_row = units.start // R  # (U,)
    unit_end = np.cumsum(unit_len)
    first = np.searchsorted(unit_row, np.arange(B))  # (B,) every row holds >= 1 unit
    unit_out = unit_end - unit_len - (unit_end[first] - unit_len[first])[unit_row]  # (U,)
    run_out = unit_out[:, None] + np.cumsum(length, axis=1) - length  # (U, N_RUNS)
    placed = np.clip(R - run_out, 0, length)  # FIM only grows a row: each row places R

    # Positions: the input's, except that a FIM document counts on from its first position,
    # and whatever continues its document after it (its EOS) is shifted by its growth.
    pos0 = in_pos[units.start[fim]].astype(np.int64)  # (F,)
    counting = np.arange(int(pos0.max()) + 2 * R, dtype=np.int64)
    pos_start = start.copy()
    pos_start[fim] = N + pos0[:, None] + run_out[fim] - unit_out[fim, None]
    pos_source = np.concatenate([in_pos.astype(np.int64), counting])
    _shift_continuations(pos_source, in_pos, units.end[fim], unit_len[fim] - unit_len_in[fim], R)

    # One gather each for tokens and positions: run offsets repeated over their tokens.
    run_dst = (unit_row[:, None] * R + run_out).reshape(-1)
    n = placed.reshape(-1)
    col = np.arange(N)
    source = np.concatenate([flat, obj._source])  # (N + P + 3,)
    tokens = source[np.repeat(start.reshape(-1) - run_dst, n) + col].reshape(B, R)
    positions = pos_source[np.repeat(pos_start.reshape(-1) - run_dst, n) + col]
    positions = positions.astype(np.int32).reshape(B, R)
    mask = (positions > 0) & (tokens != sp.pad)

    # A FIM document whose <fim_middle> falls past the row end: fim_pad from its start on.
    mid = np.where(spm, SPM_MID, PSM_MID)  # (F,)
    f_out, mid_out = unit_out[fim], run_out[fim][np.arange(len(mid)), mid]
    for k in np.flatnonzero((f_out < R) & (mid_out >= R)):
        b = unit_row[fim][k]
        tokens[b, f_out[k]:] = sp.fim_pad
        mask[b, f_out[k]:] = False
    return Features(targets=tokens, target_mask=mask, positions=positions)


def _shift_continuations(pos_source: np.ndarray, in_pos: np.ndarray, ends: np.ndarray,
                         growth: np.ndarray, R: int) -> None:
    """Add each FIM document's growth to the input positions of the tokens that continue its
    document (up to the next position restart: the next document or row)."""
    nxt = ends.copy()
    N = len(in_pos)
    live = nxt < N
    while live.any():  # one step per continuing token; almost always just the EOS
        j = nxt[live]
        cont = (j % R != 0) & (in_pos[j] == in_pos[j - 1] + 1)
        pos_source[j[cont]] += growth[live][cont]
        idx = np.flatnonzero(live)
        live[idx[~cont]] = False
        nxt[idx[cont]] += 1
        live &= nxt < N
