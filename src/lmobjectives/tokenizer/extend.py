"""Tokenizer extension for a domain: continue BPE on the domain corpus, keep every old id.

Algorithm (continued BPE):

1. Pre-tokenize the domain corpus exactly as the tokenizer does (normalizer, then
   pre-tokenizer) and count the distinct pieces ("words").
2. Split every word with the *old* BPE model: that is how the old tokenizer sees it.
3. Repeat ``N`` times: take the adjacent token pair that occurs most often in the corpus,
   merge it everywhere into a new token with the next free id, and append the merge to the
   end of the old merge list. Merging a pair that occurs ``c`` times saves exactly ``c``
   tokens, so each step adds the string that shortens the corpus most, given the ones
   before it. A new token is therefore a string the corpus uses often and the old
   tokenizer splits into at least two pieces.

Because the new merges rank after every old merge, the encoder first applies all old
merges (no old merge involves a new token), which reproduces the old split, and only then
the new ones, which can only join tokens. So old ids keep their meaning, no text ever gets
more tokens than before, and a text without the new strings is encoded exactly as before.

Worked example (old pieces of the word ``Ġreturn`` are ``Ġret`` + ``urn``; it occurs 900
times, the next best pair 400 times)::

    step 1: merge (Ġret, urn) -> "Ġreturn", id = old vocab size, saves 900 tokens
    record: {"id": 8192, "token": "Ġreturn", "text": " return", "pieces": [931, 1204], ...}

``pieces`` are the old-tokenizer ids a new token stands for (merges expanded down to old
ids); the embedding of a new token starts as the mean of those pieces' embeddings
(``lmobjectives.models.resize``).

The output directory is an HF tokenizer plus ``extension.json``, the record that ties it
to its base tokenizer (fingerprint, vocabulary size) and lists every added token with its
pieces, and the corpus measurement (tokens and bytes per token before and after).

Trade-off: a merge-based extension never makes any text longer and leaves old text
untouched, but a new token is only reached through its merge chain (intermediate strings
count against ``N``), unlike added tokens, which match raw text anywhere and can cut words
in unexpected places.
"""

from __future__ import annotations

import heapq
import json
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer

from lmobjectives.errors import UserError
from lmobjectives.tokenizer.special import SpecialIds
from lmobjectives.tokenizer.train import (TOKENIZER_FILE, canonical_tokenizer_json, encode_data,
                                          load_tokenizer, save_hf_tokenizer, tokenizer_fingerprint)
from lmobjectives.util import atomic_write_json

EXTENSION_FILE = "extension.json"
EXTENSION_FORMAT = "lmobj-tokenizer-extension/1"
# A merge seen once saves one token and spends a whole embedding row on it.
DEFAULT_MIN_FREQUENCY = 2
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class AddedToken:
    id: int
    token: str  # the vocabulary string (byte-level stand-in characters)
    text: str  # what it decodes to
    pieces: tuple[int, ...]  # old-tokenizer ids it replaces
    saved: int  # tokens saved on the corpus when it was added


@dataclass(frozen=True)
class Extension:
    """The record of an extended tokenizer (``extension.json``)."""

    base_fingerprint: str
    base_vocab_size: int
    base_path: str
    fingerprint: str
    vocab_size: int
    added: tuple[AddedToken, ...]
    corpus: tuple[str, ...]
    stats: dict[str, Any]

    def pieces(self) -> dict[int, tuple[int, ...]]:
        return {a.id: a.pieces for a in self.added}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EXTENSION_FORMAT,
            "base": {"fingerprint": self.base_fingerprint, "vocab_size": self.base_vocab_size,
                     "path": self.base_path},
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "corpus": list(self.corpus),
            "corpus_stats": self.stats,
            "added": [{"id": a.id, "token": a.token, "text": a.text, "pieces": list(a.pieces),
                       "saved": a.saved} for a in self.added],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Extension":
        return cls(
            base_fingerprint=obj["base"]["fingerprint"], base_vocab_size=int(obj["base"]["vocab_size"]),
            base_path=obj["base"].get("path", ""), fingerprint=obj["fingerprint"],
            vocab_size=int(obj["vocab_size"]), corpus=tuple(obj.get("corpus", ())),
            stats=dict(obj.get("corpus_stats", {})),
            added=tuple(AddedToken(id=int(a["id"]), token=a["token"], text=a["text"],
                                   pieces=tuple(int(p) for p in a["pieces"]), saved=int(a["saved"]))
                        for a in obj["added"]),
        )


def load_extension(tokenizer_dir: str | Path | None) -> Extension | None:
    """The extension record of a tokenizer directory; None when it has none.

    A record that no longer matches the directory's tokenizer.json (edited by hand) is an
    error rather than something to ignore: it would initialise the wrong rows."""
    if tokenizer_dir is None:
        return None
    d = Path(tokenizer_dir)
    f = d / EXTENSION_FILE
    if not f.is_file():
        return None
    try:
        ext = Extension.from_json(json.loads(f.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{f} is corrupt ({exc}); re-run `lmobj tokenizer extend`") from None
    if tokenizer_fingerprint(load_tokenizer(str(d))) != ext.fingerprint:
        raise UserError(f"{d / TOKENIZER_FILE} changed since {f} was written; "
                        "re-run `lmobj tokenizer extend`")
    return ext


# ------------------------------------------------------------------------------ counting
def count_words(tok: Tokenizer, texts: Iterable[str]) -> Counter:
    """Pre-tokenized pieces of the corpus and how often each occurs."""
    counts: Counter = Counter()
    norm, pre = tok.normalizer, tok.pre_tokenizer
    for text in texts:
        if norm is not None:
            text = norm.normalize_str(text)
        if pre is None:
            counts[text] += 1
        else:
            counts.update(piece for piece, _ in pre.pre_tokenize_str(text))
    return counts


class _PairIndex:
    """Words as id lists with their counts, adjacent-pair counts, and a lazy max-heap."""

    def __init__(self, words: list[list[int]], freqs: list[int]) -> None:
        self.words, self.freqs = words, freqs
        self.pairs: dict[tuple[int, int], int] = defaultdict(int)
        self.where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for w, ids in enumerate(words):
            self._add(w, +1)
        self.heap = [(-c, p) for p, c in self.pairs.items()]
        heapq.heapify(self.heap)

    def _add(self, w: int, sign: int) -> None:
        ids, f = self.words[w], self.freqs[w]
        for pair in zip(ids, ids[1:]):
            self.pairs[pair] += sign * f
            if sign > 0:
                self.where[pair].add(w)

    def best(self, banned: set[tuple[int, int]]) -> tuple[tuple[int, int], int] | None:
        """Most frequent pair (ties: smallest ids, so the result is deterministic)."""
        while self.heap:
            neg, pair = self.heap[0]
            if self.pairs.get(pair, 0) != -neg or pair in banned:
                heapq.heappop(self.heap)  # stale entry (or a pair we may not merge)
                continue
            return pair, -neg
        return None

    def merge(self, pair: tuple[int, int], new: int) -> int:
        """Replace non-overlapping occurrences left to right; returns tokens saved."""
        a, b = pair
        saved = 0
        touched: set[tuple[int, int]] = set()
        for w in list(self.where.pop(pair, ())):
            ids = self.words[w]
            self._add(w, -1)
            touched.update(zip(ids, ids[1:]))  # counts that went down need fresh heap entries
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                    saved += self.freqs[w]
                else:
                    out.append(ids[i])
                    i += 1
            self.words[w] = out
            self._add(w, +1)
            touched.update(zip(out, out[1:]))
        self.pairs.pop(pair, None)
        for p in touched:
            c = self.pairs.get(p, 0)
            if c > 0:
                heapq.heappush(self.heap, (-c, p))
        return saved


# ------------------------------------------------------------------------------ extension
def _bpe_json(tok: Tokenizer) -> dict[str, Any]:
    data = json.loads(tok.to_str())
    if data.get("model", {}).get("type") != "BPE":
        raise UserError(f"tokenizer extension works on BPE tokenizers; this one is "
                        f"{data.get('model', {}).get('type')}")
    if data["model"].get("continuing_subword_prefix") or data["model"].get("end_of_word_suffix"):
        raise UserError("tokenizer extension does not support BPE with subword prefixes/suffixes")
    return data


def extend_tokenizer(tok: Tokenizer, texts: Iterable[str], n_add: int, *,
                     min_frequency: int = DEFAULT_MIN_FREQUENCY) -> tuple[Tokenizer, list[AddedToken]]:
    """Add up to ``n_add`` tokens by continued BPE on ``texts``; old ids are unchanged.

    Fewer are added when no pair occurs ``min_frequency`` times any more."""
    if n_add < 1:
        raise UserError(f"--add must be at least 1, not {n_add}")
    data = _bpe_json(tok)
    vocab: dict[str, int] = data["model"]["vocab"]
    id_to_str = {i: s for s, i in vocab.items()}
    taken = {s for s in vocab} | {t["content"] for t in data.get("added_tokens", [])}
    next_id = max([*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1

    counts = count_words(tok, texts)
    words, freqs = [], []
    for piece, f in counts.items():
        ids = [t.id for t in tok.model.tokenize(piece)]
        if len(ids) > 1:  # a word already one token cannot get shorter
            words.append(ids)
            freqs.append(f)
    index = _PairIndex(words, freqs)
    pieces: dict[int, tuple[int, ...]] = {}
    added: list[AddedToken] = []
    new_merges: list[tuple[str, str]] = []
    banned: set[tuple[int, int]] = set()
    while len(added) < n_add:
        found = index.best(banned)
        if found is None or found[1] < min_frequency:
            break
        (a, b), _ = found
        text = id_to_str[a] + id_to_str[b]
        if text in taken:  # the string exists (unreachable by the old merges, or a special)
            banned.add((a, b))
            continue
        saved = index.merge((a, b), next_id)
        pieces[next_id] = pieces.get(a, (a,)) + pieces.get(b, (b,))
        vocab[text] = next_id
        id_to_str[next_id] = text
        taken.add(text)
        new_merges.append((id_to_str[a], id_to_str[b]))
        added.append(AddedToken(id=next_id, token=text, text="", pieces=pieces[next_id], saved=saved))
        next_id += 1
    if not added:
        raise UserError(f"no pair of tokens occurs {min_frequency}+ times in the corpus; "
                        "nothing to add (is the corpus tiny, or already well covered?)")
    merges = data["model"]["merges"]
    as_strings = bool(merges) and isinstance(merges[0], str)  # older tokenizer.json format
    merges.extend(f"{x} {y}" if as_strings else [x, y] for x, y in new_merges)
    new_tok = Tokenizer.from_str(json.dumps(data))
    added = [AddedToken(id=a.id, token=a.token, text=new_tok.decode([a.id], skip_special_tokens=False),
                        pieces=a.pieces, saved=a.saved) for a in added]
    return new_tok, added


def corpus_stats(old: Tokenizer, new: Tokenizer, texts: Sequence[str]) -> dict[str, Any]:
    """Tokens and bytes per token of ``texts`` under both tokenizers (data encoding rules)."""
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    before = after = 0
    for i in range(0, len(texts), 256):
        chunk = list(texts[i:i + 256])
        before += sum(len(ids) for ids in encode_data(old, chunk))
        after += sum(len(ids) for ids in encode_data(new, chunk))
    return {"documents": len(texts), "bytes": n_bytes, "tokens_before": before, "tokens_after": after,
            "bytes_per_token_before": n_bytes / max(before, 1),
            "bytes_per_token_after": n_bytes / max(after, 1),
            "token_reduction": 1 - after / max(before, 1)}


def save_extended(new: Tokenizer, ext: Extension, out: str | Path, source_dir: Path | None) -> Path:
    """Write the HF tokenizer directory and its ``extension.json``."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / EXTENSION_FILE).is_file():
        raise UserError(f"{out} exists and is not an extended tokenizer directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        SpecialIds.from_vocab(new.get_vocab(with_added_tokens=True), new.get_vocab_size())
        ours = True
    except UserError:
        ours = False
    if ours:
        save_hf_tokenizer(new, out)
    else:  # a foreign tokenizer keeps its own configuration files
        (out / TOKENIZER_FILE).write_text(canonical_tokenizer_json(new), encoding="utf-8")
        for name in CONFIG_FILES:
            if source_dir is not None and (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, out / name)
    atomic_write_json(out / EXTENSION_FILE, ext.to_json())
    return out


def extend_tokenizer_dir(tokenizer_dir: str | None, corpus: Sequence[str], n_add: int, out: str | Path, *,
                         min_frequency: int = DEFAULT_MIN_FREQUENCY, encoding: str = "skip",
                         text_field: str = "text") -> Extension:
    """``lmobj tokenizer extend``: extend, save, measure; returns the record."""
    from lmobjectives.corpus import iter_documents
    from lmobjectives.tokenizer.train import default_tokenizer_dir

    if not corpus:
        raise UserError("no corpus given: pass --corpus PATH")
    old = load_tokenizer(tokenizer_dir)
    texts = [d.text for d in iter_documents(list(corpus), encoding=encoding, text_field=text_field)]
    new, added = extend_tokenizer(old, texts, n_add, min_frequency=min_frequency)
    src = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    if src.is_file():
        src = src.parent
    ext = Extension(
        base_fingerprint=tokenizer_fingerprint(old), base_vocab_size=old.get_vocab_size(),
        base_path=str(src.resolve()), fingerprint=tokenizer_fingerprint(new),
        vocab_size=new.get_vocab_size(), added=tuple(added), corpus=tuple(str(c) for c in corpus),
        stats=corpus_stats(old, new, texts))
    save_extended(new, ext, out, src)
    return ext
