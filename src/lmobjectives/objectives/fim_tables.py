"""Tables that let FIM cut documents at character positions without a tokenizer round trip.

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
are stored (an 8192-token vocabulary trained on Python code: 35 k splits, 104 k piece ids,
built in about a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from lmobjectives.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


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


_TABLES_CACHE: dict[str, FIMTables] = {}  # the last tokenizer's tables, by its JSON


def build_tables(tokenizer: Tokenizer) -> FIMTables:
    """Build ``FIMTables`` for a byte-level BPE ``tokenizers.Tokenizer``.

    Each split piece is encoded by the BPE model alone: a token never spans two
    pre-tokens, so any piece of it is what BPE would see as a pre-token of its own. The
    last tokenizer's tables are kept (about a second to build for 8 K ids; a timed run's
    calibration opens the run once per candidate model)."""
    key = tokenizer.to_str()
    if key not in _TABLES_CACHE:
        _TABLES_CACHE.clear()
        _TABLES_CACHE[key] = _build_tables(tokenizer)
    return _TABLES_CACHE[key]


def _build_tables(tokenizer: Tokenizer) -> FIMTables:
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
