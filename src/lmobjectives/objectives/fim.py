"""Fill-in-the-middle (FIM paper, Bavarian et al. 2022): per document, with probability
``fim_rate``, cut the text at two uniformly random *character* positions into prefix, middle
and suffix and move the middle to the end behind sentinel tokens, so a left-to-right decoder
learns to infill. Otherwise the document stays plain CLM. Two orders (FIM paper; token
names and the SPM variant as in StarCoder)::

    PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

SPM is the paper's "variant 2": prefix and middle stay one contiguous text, so the target
continues the prefix exactly as the prompt will at inference.

The transform is context-level (the FIM paper finds it better than document-level): it runs on packed
rows, on every run of tokens between EOS separators (a whole document, or the fragment of
one that packing put in this row), each with its own coins. The EOS that ended a document
stays after its rearranged parts, so the model learns to close a middle with EOS. The three
sentinels and any split tokens make a FIM document longer, so the row is truncated back to
``R``; a FIM document cut by the row end before its ``<fim_middle>`` (a prompt with no middle
to predict) is replaced by ``<fim_pad>``, which is never scored. A cut inside the middle is
kept and trained, as in the reference.

Character cuts without a decode/re-encode round trip
----------------------------------------------------
The reference implementation decodes each document to text, cuts the string and re-encodes
the three parts: correct, but it runs the tokenizer on every FIM document (~0.7 M tokens/s
per core). Here the objective instead holds ``FIMTables``, built once from a byte-level BPE
tokenizer: for every vocabulary token its UTF-8 byte string, and for every character boundary
*inside* a token the encodings of the two byte pieces on either side. A cut between tokens
takes no work; a cut inside token ``t`` replaces ``t`` by the tokens of its two pieces. The
whole batch is then one gather over a run-length plan (numpy, no per-token Python loop).

Trade-off: the parts are exact as *bytes* (re-ordering the decoded parts gives back the
document text exactly), but the tokens next to a cut are ``t``'s split pieces, not what the
tokenizer would produce for the cut text on its own (a fresh encode of ``"...re"`` may merge
differently from ``"...ret"`` split at ``"re|t"``). The paper's point of character-level cuts
(the model sees and completes partial tokens) holds either way. The table grows with the
total byte length of the vocabulary, not quadratically: only splits at UTF-8 character starts
are stored (a few per token; ~30 k splits for a 8192-token code vocabulary).

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np

from lmobjectives.errors import UserError
from lmobjectives.objectives.base import Features, Objective, Rows, single_stream_mask
from lmobjectives.tokenizer.special import SpecialIds

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# FIM paper: rates up to 0.9 cost no left-to-right quality; StarCoder trains at 0.5 with half
# of the FIM documents in SPM order. We take StarCoder's 0.5 / 0.5.
DEFAULT_FIM_RATE = 0.5
DEFAULT_SPM_RATE = 0.5

# The run plan of one FIM document: 11 runs in a canonical order (each may be empty).
PRE, P1, P2, SUF, S1, S2, S3, MID, M1, M2, M3 = range(11)
N_SLOTS = 11
# Column order of the runs as emitted: PSM keeps the canonical order, SPM moves the prefix
# runs (P1 = whole prefix tokens, P2 = left piece of a split token) between MID and the middle.
PSM_ORDER = np.array([PRE, P1, P2, SUF, S1, S2, S3, MID, M1, M2, M3])
SPM_ORDER = np.array([PRE, SUF, S1, S2, S3, MID, P1, P2, M1, M2, M3])


def byte_level_alphabet() -> dict[str, int]:
    """The reversible byte <-> printable-character map of byte-level BPE (GPT-2 §2.2), as
    char -> byte: printable Latin-1 bytes stand for themselves, the other 68 bytes take the
    code points 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    out = {chr(b): b for b in keep}
    shifted = [b for b in range(256) if b not in kept]
    out.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return out


def _char_starts(data: bytes) -> list[int]:
    """Byte offsets where a UTF-8 character starts (anything but a 10xxxxxx continuation byte)."""
    return [k for k, b in enumerate(data) if b & 0xC0 != 0x80]


@dataclass(frozen=True, eq=False)
class FIMTables:
    """Per-token byte facts and split encodings of one tokenizer; built by
    ``FIM.tables_from_tokenizer``. Split ``e`` of token ``t`` (``split_base[t] <= e <
    split_base[t + 1]``, in byte order) cuts ``t`` at byte ``split_offset[e]``; its left piece
    encodes as ``pieces[piece_start[e]:piece_mid[e]]``, its right piece as
    ``pieces[piece_mid[e]:piece_end[e]]``. Special (added) tokens are atomic: one character
    that never splits."""

    char_starts: np.ndarray  # (V,) int32 characters starting in the token
    lead: np.ndarray  # (V,) bool the token's first byte starts a character
    nbytes: np.ndarray  # (V,) int32
    split_base: np.ndarray  # (V + 1,) int64
    split_offset: np.ndarray  # (E,) int32
    piece_start: np.ndarray  # (E,) int64
    piece_mid: np.ndarray  # (E,) int64
    piece_end: np.ndarray  # (E,) int64
    pieces: np.ndarray  # (P,) int32

    @property
    def vocab_size(self) -> int:
        return len(self.char_starts)


def _tables_from_bytes(token_bytes: list[bytes | None],
                       encode_bytes: Callable[[bytes], list[int]]) -> FIMTables:
    """Tables from each id's bytes (None = atomic special token) and a bytes -> ids encoder."""
    V = len(token_bytes)
    char_starts = np.ones(V, dtype=np.int32)
    lead = np.ones(V, dtype=bool)
    nbytes = np.zeros(V, dtype=np.int32)
    split_base = np.zeros(V + 1, dtype=np.int64)
    offsets: list[int] = []
    bounds: list[tuple[int, int, int]] = []
    pieces: list[int] = []
    for t, data in enumerate(token_bytes):
        if data is not None:
            starts = _char_starts(data)
            nbytes[t] = len(data)
            char_starts[t] = len(starts)
            lead[t] = bool(starts) and starts[0] == 0
            for k in starts:
                if k == 0:
                    continue
                left, right = encode_bytes(data[:k]), encode_bytes(data[k:])
                offsets.append(k)
                start = len(pieces)
                pieces.extend(left)
                mid = len(pieces)
                pieces.extend(right)
                bounds.append((start, mid, len(pieces)))
        split_base[t + 1] = len(offsets)
    b = np.array(bounds, dtype=np.int64).reshape(-1, 3)  # (E, 3)
    return FIMTables(char_starts=char_starts, lead=lead, nbytes=nbytes, split_base=split_base,
                     split_offset=np.array(offsets, dtype=np.int32),
                     piece_start=b[:, 0].copy(), piece_mid=b[:, 1].copy(), piece_end=b[:, 2].copy(),
                     pieces=np.array(pieces, dtype=np.int32))


def build_tables(tokenizer: Tokenizer) -> FIMTables:
    """Build ``FIMTables`` for a byte-level BPE ``tokenizers.Tokenizer``.

    Each split piece is encoded by the BPE model alone: a token never spans two
    pre-tokens, so any piece of it is what BPE would see as a pre-token of its own."""
    from tokenizers import models

    if not isinstance(tokenizer.model, models.BPE):
        raise UserError("character-level FIM needs a byte-level BPE tokenizer "
                        f"(this one's model is {type(tokenizer.model).__name__})")
    alphabet = byte_level_alphabet()
    to_char = {b: c for c, b in alphabet.items()}
    added = set(tokenizer.get_added_tokens_decoder())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    V = max(vocab.values()) + 1
    token_bytes: list[bytes | None] = [None] * V
    for text, t in vocab.items():
        if t in added:
            continue
        try:
            token_bytes[t] = bytes(alphabet[c] for c in text)
        except KeyError:
            raise UserError("character-level FIM needs a byte-level BPE tokenizer; token "
                            f"{t} ({text!r}) is not written in the byte-level alphabet") from None
    model = tokenizer.model

    def encode_bytes(data: bytes) -> list[int]:
        ids = [tok.id for tok in model.tokenize("".join(to_char[b] for b in data))]
        if b"".join(token_bytes[i] or b"" for i in ids) != data:
            raise UserError(f"tokenizer cannot re-encode the byte piece {data!r} exactly; "
                            "character-level FIM needs a plain byte-level BPE tokenizer")
        return ids

    return _tables_from_bytes(token_bytes, encode_bytes)


@dataclass(frozen=True, kw_only=True)
class FIM(Objective):
    """Fill-in-the-middle on packed rows (see module docstring). ``tables`` is not a parameter:
    it is derived from the tokenizer (``FIM.tables_from_tokenizer``) and attached with
    ``with_tables``; calling without it is an error."""

    name: ClassVar[str] = "fim"
    architectures: ClassVar[tuple[str, ...]] = ("decoder",)

    specials: SpecialIds
    fim_rate: float = DEFAULT_FIM_RATE
    spm_rate: float = DEFAULT_SPM_RATE
    tables: FIMTables | None = field(default=None, repr=False, compare=False,
                                     metadata={"param": False})

    def __post_init__(self) -> None:
        for key in ("fim_rate", "spm_rate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{key} must be a number in [0, 1], got {value!r}")
        if self.tables is not None:
            ids = (self.specials.fim_prefix, self.specials.fim_suffix, self.specials.fim_middle,
                   self.specials.fim_pad, self.specials.eos, self.specials.pad)
            if max(ids) >= self.tables.vocab_size:
                raise ValueError(f"FIM tables cover {self.tables.vocab_size} ids but the special "
                                 f"tokens reach id {max(ids)}: tables and tokenizer differ")
            # The pieces followed by the three sentinels: every non-input token comes from here.
            sentinels = np.array([self.specials.fim_prefix, self.specials.fim_suffix,
                                  self.specials.fim_middle], dtype=np.int32)
            object.__setattr__(self, "_source", np.concatenate([self.tables.pieces, sentinels]))

    def params(self) -> dict[str, object]:
        return {"fim_rate": self.fim_rate, "spm_rate": self.spm_rate}

    @classmethod
    def tables_from_tokenizer(cls, tokenizer: Tokenizer) -> FIMTables:
        """The tables for ``tokenizer`` (a byte-level BPE ``tokenizers.Tokenizer``)."""
        return build_tables(tokenizer)

    def with_tables(self, tables: FIMTables) -> "FIM":
        return dataclasses.replace(self, tables=tables)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, **params: float) -> "FIM":
        """A FIM objective for ``tokenizer``: special ids from its vocabulary, tables built."""
        specials = SpecialIds.from_vocab(tokenizer.get_vocab(with_added_tokens=True),
                                         tokenizer.get_vocab_size(with_added_tokens=True))
        return cls(specials=specials, tables=build_tables(tokenizer), **params)

    def __call__(self, rows: Rows, rng: np.random.Generator) -> Features:
        if self.tables is None:
            raise ValueError("FIM needs its tokenizer tables: "
                             "fim.with_tables(FIM.tables_from_tokenizer(tokenizer))")
        tokens = rows.tokens
        if tokens.size and int(tokens.max()) >= self.tables.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside the FIM tables "
                             f"({self.tables.vocab_size} ids): tables and tokenizer differ")
        plan = _plan(rows, rng, self)
        if plan is None:  # no document drew FIM: plain CLM, the same arrays CLM returns
            return Features(targets=tokens, target_mask=single_stream_mask(rows, self.specials),
                            positions=rows.positions)
        return _emit(rows, plan, self)


@dataclass(frozen=True)
class _Plan:
    """Runs to copy, ``N_SLOTS`` per unit (a document or a gap of EOS/PAD), in row order."""

    start: np.ndarray  # (U, N_SLOTS) int64 index into the rows (flat) or FIM._source
    length: np.ndarray  # (U, N_SLOTS) int64
    from_source: np.ndarray  # (U, N_SLOTS) bool: copy from FIM._source, else from the rows
    canonical: np.ndarray  # (U, N_SLOTS) int64 canonical run id of each column
    unit_row: np.ndarray  # (U,) int64
    unit_fim: np.ndarray  # (U,) bool
    unit_pos0: np.ndarray  # (U,) int32 input position of the unit's first token


def _units(tokens: np.ndarray, specials: SpecialIds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split flat rows into units: maximal runs of document tokens, and gaps of EOS/PAD between
    them; a row start always starts a unit. Returns (starts, ends, is_document)."""
    B, R = tokens.shape
    flat = tokens.reshape(-1)  # (N,)
    content = (flat != specials.eos) & (flat != specials.pad)  # (N,)
    boundary = np.ones(flat.size, dtype=bool)
    boundary[1:] = content[1:] != content[:-1]
    boundary[::R] = True
    starts = np.flatnonzero(boundary)
    ends = np.append(starts[1:], flat.size)
    return starts, ends, content[starts]


def _locate(cuts: np.ndarray, seg_start: np.ndarray, seg_end: np.ndarray, n_slots: np.ndarray,
            cum: np.ndarray, slots: np.ndarray, has0: np.ndarray, flat: np.ndarray,
            tables: FIMTables) -> tuple[np.ndarray, np.ndarray]:
    """Cut indices (per document, in [0, n_slots]) -> (token index, split entry or -1).

    Cut c < n_slots is the c-th character start of the document; it lies in token i, and
    either at i's first byte (a cut before token i) or at one of i's interior splits."""
    end = cuts == n_slots
    g = (cum[seg_start] - slots[seg_start]) + np.minimum(cuts, n_slots - 1)  # global slot
    i = np.searchsorted(cum, g, side="right")  # first token whose slots pass g
    i = np.minimum(i, flat.size - 1)
    r = g - (cum[i] - slots[i])  # slot within token i
    before = has0[i] & (r == 0)
    entry = tables.split_base[flat[i]] + r - has0[i]
    entry = np.where(before | end, -1, entry)
    return np.where(end, seg_end, i), entry


def _plan(rows: Rows, rng: np.random.Generator, fim: FIM) -> _Plan | None:
    tables, sp = fim.tables, fim.specials
    assert tables is not None
    B, R = rows.tokens.shape
    flat = rows.tokens.reshape(-1)  # (N,)
    starts, ends, is_doc = _units(rows.tokens, sp)
    U = len(starts)
    coins = rng.random((U, 2))  # (U, 2) one FIM coin and one SPM coin per unit
    unit_fim = is_doc & (coins[:, 0] < fim.fim_rate)
    if not unit_fim.any():
        return None

    # Slots: one per character start; a document's first byte is always a cut position
    # (even when packing began it mid-character).
    content = np.repeat(is_doc, ends - starts)  # (N,)
    doc_first = np.zeros(flat.size, dtype=bool)
    doc_first[starts[is_doc]] = True
    has0 = tables.lead[flat] | doc_first  # (N,)
    slots = np.where(content, tables.char_starts[flat] + (doc_first & ~tables.lead[flat]), 0)
    cum = np.cumsum(slots)  # (N,)
    f_start, f_end = starts[unit_fim], ends[unit_fim]  # (F,)
    n_slots = cum[f_end - 1] - (cum[f_start] - slots[f_start])  # (F,) characters N per document
    cuts = np.sort(rng.integers(0, n_slots[:, None] + 1, size=(len(f_start), 2)), axis=1)  # (F, 2)
    i1, e1 = _locate(cuts[:, 0], f_start, f_end, n_slots, cum, slots, has0, flat, tables)
    i2, e2 = _locate(cuts[:, 1], f_start, f_end, n_slots, cum, slots, has0, flat, tables)

    start = np.zeros((U, N_SLOTS), dtype=np.int64)
    length = np.zeros((U, N_SLOTS), dtype=np.int64)
    from_source = np.zeros((U, N_SLOTS), dtype=bool)
    start[:, 0], length[:, 0] = starts, ends - starts  # plain units: one run, the unit itself

    s, ln, src = _fim_runs(f_start, f_end, i1, e1, i2, e2, tables, len(tables.pieces))
    start[unit_fim], length[unit_fim], from_source[unit_fim] = s, ln, src
    canonical = np.broadcast_to(PSM_ORDER, (U, N_SLOTS)).copy()
    spm = unit_fim & (coins[:, 1] < fim.spm_rate)
    canonical[spm] = SPM_ORDER
    start = np.take_along_axis(start, canonical, axis=1)
    length = np.take_along_axis(length, canonical, axis=1)
    from_source = np.take_along_axis(from_source, canonical, axis=1)
    return _Plan(start=start, length=length, from_source=from_source, canonical=canonical,
                 unit_row=starts // R, unit_fim=unit_fim,
                 unit_pos0=rows.positions.reshape(-1)[starts])


def _fim_runs(a: np.ndarray, z: np.ndarray, i1: np.ndarray, e1: np.ndarray, i2: np.ndarray,
              e2: np.ndarray, t: FIMTables, sentinel_base: int,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 11 canonical runs of each FIM document [a, z) cut at (i1, e1) <= (i2, e2).

    prefix = x[a:i1] + left(e1); middle = right(e1) + x[i1':i2] + left(e2);
    suffix = right(e2) + x[i2':z], where i' skips a split token. Runs index the flat rows
    or FIM._source (pieces, then PRE, SUF, MID)."""
    F = len(a)
    start = np.zeros((F, N_SLOTS), dtype=np.int64)
    length = np.zeros((F, N_SLOTS), dtype=np.int64)
    src = np.zeros((F, N_SLOTS), dtype=bool)
    s1, s2 = e1 >= 0, e2 >= 0
    ee1, ee2 = np.maximum(e1, 0), np.maximum(e2, 0)
    for col, offset in ((PRE, 0), (SUF, 1), (MID, 2)):
        start[:, col], length[:, col], src[:, col] = sentinel_base + offset, 1, True
    start[:, P1], length[:, P1] = a, i1 - a
    start[:, P2], length[:, P2] = t.piece_start[ee1], np.where(s1, t.piece_mid[ee1] - t.piece_start[ee1], 0)
    start[:, M1], length[:, M1] = t.piece_mid[ee1], np.where(s1, t.piece_end[ee1] - t.piece_mid[ee1], 0)
    start[:, M2], length[:, M2] = i1 + s1, np.maximum(i2 - (i1 + s1), 0)
    start[:, M3], length[:, M3] = t.piece_start[ee2], np.where(s2, t.piece_mid[ee2] - t.piece_start[ee2], 0)
    start[:, S1], length[:, S1] = t.piece_mid[ee2], np.where(s2, t.piece_end[ee2] - t.piece_mid[ee2], 0)
    start[:, S3], length[:, S3] = i2 + s2, z - (i2 + s2)
    src[:, [P2, M1, M3, S1, S2]] = True  # the pieces table; S2 is used by same-token cuts only
    for k in np.flatnonzero(s1 & (i1 == i2)):
        _same_token_cuts(start[k], length[k], int(e1[k]), int(e2[k]), t)
    return start, length, src


def _same_token_cuts(start: np.ndarray, length: np.ndarray, e1: int, e2: int, t: FIMTables) -> None:
    """Both cuts inside one token (rare: ~1/len per document). The middle and suffix then come
    from the first split's right piece, cut again at the second split's byte offset, which is a
    character start inside one of that piece's tokens: a second table lookup, no encoding."""
    right = t.pieces[t.piece_mid[e1]:t.piece_end[e1]]
    ends = np.cumsum(t.nbytes[right])
    rel = int(t.split_offset[e2] - t.split_offset[e1])  # byte offset of cut 2 within `right`
    j = int(np.searchsorted(ends, rel, side="right"))
    o = rel - (int(ends[j - 1]) if j else 0)
    base = int(t.piece_mid[e1])
    start[M1], length[M1] = base, j
    length[M2] = length[M3] = length[S1] = 0
    if o == 0:  # cut 2 falls between tokens of the right piece
        start[S2], length[S2] = base + j, len(right) - j
        return
    u = int(right[j])
    lo, hi = int(t.split_base[u]), int(t.split_base[u + 1])
    e = lo + int(np.searchsorted(t.split_offset[lo:hi], o))
    start[M3], length[M3] = t.piece_start[e], t.piece_mid[e] - t.piece_start[e]
    start[S1], length[S1] = t.piece_mid[e], t.piece_end[e] - t.piece_mid[e]
    start[S2], length[S2] = base + j + 1, len(right) - j - 1


def _emit(rows: Rows, plan: _Plan, fim: FIM) -> Features:
    """Lay the runs out row by row, truncate each row to R, pad cut-off prompts, set positions."""
    sp = fim.specials
    B, R = rows.tokens.shape
    flat = rows.tokens.reshape(-1)  # (N,)
    in_pos = rows.positions.reshape(-1)  # (N,)
    U = len(plan.unit_row)
    length = plan.length.reshape(-1)  # (U*K,)
    run_row = np.repeat(plan.unit_row, N_SLOTS)  # (U*K,)
    ends = np.cumsum(length)
    first_run = np.searchsorted(run_row, np.arange(B))  # (B,) every row has >= 1 unit
    row_base = ends[first_run] - length[first_run]
    out_start = ends - length - row_base[run_row]  # (U*K,) row-relative start of each run
    placed = np.clip(R - out_start, 0, length)  # FIM only grows rows, so each row sums to >= R
    run_of = np.repeat(np.arange(length.size), placed)  # (B*R,) run of each output token
    offset = np.arange(B * R) - (run_row * R + out_start)[run_of]  # (B*R,)
    idx = plan.start.reshape(-1)[run_of] + offset  # (B*R,)
    from_source = plan.from_source.reshape(-1)[run_of]
    source = fim._source  # type: ignore[attr-defined]
    x_idx = np.where(from_source, 0, idx)
    tokens = np.where(from_source, source[np.where(from_source, idx, 0)], flat[x_idx])  # (B*R,)

    # Positions continue through a FIM document and restart wherever the input restarted:
    # an anchor takes its position from the input, the tokens after it count on.
    unit_of = run_of // N_SLOTS
    plain = ~plan.unit_fim[unit_of]
    restart = np.ones(flat.size, dtype=bool)
    restart[1:] = in_pos[1:] != in_pos[:-1] + 1
    restart[::R] = True
    fim_head = ~plain & (run_of % N_SLOTS == 0) & (offset == 0)  # the PRE sentinel
    anchor = (plain & restart[x_idx]) | fim_head
    anchor_val = np.where(plain, in_pos[x_idx], plan.unit_pos0[unit_of]).reshape(B, R)
    col = np.arange(R)
    last = np.maximum.accumulate(np.where(anchor.reshape(B, R), col, -1), axis=1)  # (B, R)
    positions = (np.take_along_axis(anchor_val, last, axis=1) + col - last).astype(np.int32)

    # A FIM document whose <fim_middle> falls past the row end is padded out from its start.
    out2d = out_start.reshape(U, N_SLOTS)
    mid_col = np.argmax(plan.canonical == MID, axis=1)  # (U,)
    mid_out = out2d[np.arange(U), mid_col]
    cut = plan.unit_fim & (out2d[:, 0] < R) & (mid_out >= R)
    pad_from = np.full(B, R, dtype=np.int64)
    pad_from[plan.unit_row[cut]] = out2d[cut, 0]
    padded = col[None, :] >= pad_from[:, None]  # (B, R)
    tokens = np.where(padded, sp.fim_pad, tokens.reshape(B, R)).astype(np.int32)
    mask = (positions > 0) & (tokens != sp.pad) & ~padded
    return Features(targets=tokens, target_mask=mask, positions=positions)
