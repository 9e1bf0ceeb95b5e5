"""FIM: character cuts through split tables must give back every document exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmobjectives.errors import UserError
from lmobjectives.objectives import build_objective
from lmobjectives.objectives.base import Rows, positions_from_eos
from lmobjectives.objectives.clm import CLM
from lmobjectives.objectives.fim import FIM
from lmobjectives.objectives.fim_tables import _tables_from_bytes, byte_level_alphabet
from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds

TRAINING_TEXT = [
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n",
    "The quick brown fox jumps over the lazy dog. Le cœur a ses raisons que la raison ignore.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. Ça coûte très cher.",
    "日本語のテキストと中文文本，还有한국어 텍스트. Ελληνικά και русский текст.",
    "emoji 😀😀🎉🎉 👩‍💻 🇫🇷 ✨✨ and combining e\u0301 a\u0308 — “quotes” …",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT * 8, trainer)  # a few KB
    return tok


@pytest.fixture(scope="module")
def fim(tokenizer: Tokenizer) -> FIM:
    return FIM.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def token_bytes(tokenizer: Tokenizer) -> dict[int, bytes]:
    alphabet = byte_level_alphabet()
    added = set(tokenizer.get_added_tokens_decoder())
    return {i: (b"" if i in added else bytes(alphabet[c] for c in s))
            for s, i in tokenizer.get_vocab(with_added_tokens=True).items()}


def pack(tokenizer: Tokenizer, texts: list[str], R: int, sp: SpecialIds) -> tuple[Rows, list[str]]:
    """Documents + EOS, concatenated and cut into rows of R; the last row padded with PAD."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False).ids + [sp.eos]
    stream += [sp.pad] * (-len(stream) % R)
    return Rows.from_tokens(np.array(stream, dtype=np.int32).reshape(-1, R), sp.eos), texts


def units(row: list[int], structural: set[int]) -> list[tuple[bool, list[int]]]:
    """A row as alternating (is_document, tokens) runs, split on EOS/PAD."""
    out: list[tuple[bool, list[int]]] = []
    for t in row:
        doc = t not in structural
        if out and out[-1][0] == doc:
            out[-1][1].append(t)
        else:
            out.append((doc, [t]))
    return out


def check_row(fim: FIM, tb: dict[int, bytes], tokenizer: Tokenizer, inp: list[int],
              out: list[int], mask: np.ndarray, first_is_doc_start: bool) -> list[str]:
    """Assert every FIM property on one row; return the kind of each output document."""
    sp = fim.specials
    structural = {sp.eos, sp.pad}
    to_bytes = lambda ids: b"".join(tb[i] for i in ids)  # noqa: E731
    ins, outs = units(inp, structural), units(out, structural)
    assert len(outs) <= len(ins)
    kinds = []
    for k, ((is_doc, o), (_, d)) in enumerate(zip(outs, ins)):
        reaches_end = k == len(outs) - 1
        if not is_doc:  # EOS/PAD gaps are kept, only the row end may shorten the last
            assert o == d[:len(o)] and (reaches_end or o == d)
            continue
        whole = (k > 0 or first_is_doc_start) and k + 1 < len(ins)  # document entirely in row
        D = to_bytes(d)
        if o[0] == sp.fim_pad:  # a FIM prompt cut before <fim_middle>: padded, never scored
            assert reaches_end and set(o) == {sp.fim_pad} and not mask[len(out) - len(o):].any()
            kinds.append("padded")
            continue
        if o[0] != sp.fim_prefix:  # plain CLM document, untouched
            assert o == (d[:len(o)] if reaches_end else d)
            kinds.append("plain")
            continue
        assert o.count(sp.fim_prefix) == o.count(sp.fim_suffix) == o.count(sp.fim_middle) == 1
        s_at, m_at = o.index(sp.fim_suffix), o.index(sp.fim_middle)
        assert s_at < m_at
        spm = s_at == 1
        if spm:  # PRE SUF suffix MID prefix+middle
            parts = [o[m_at + 1:], o[2:m_at]]
        else:  # PRE prefix SUF suffix MID middle
            parts = [o[1:s_at], o[m_at + 1:], o[s_at + 1:m_at]]
        got = [to_bytes(p) for p in parts]
        if reaches_end:  # maybe truncated inside the middle: the parts still line up with D
            suffix = got[-1]
            assert D.endswith(suffix) and D[:len(D) - len(suffix)].startswith(b"".join(got[:-1]))
        else:
            assert b"".join(got) == D
            if whole:  # decode each part on its own: the text comes back exactly
                text = "".join(tokenizer.decode(p) for p in parts)
                assert text == D.decode("utf-8")
        kinds.append("spm" if spm else "psm")
    return kinds


def check_batch(fim: FIM, tb: dict[int, bytes], tokenizer: Tokenizer, rows: Rows,
                seed: int) -> list[str]:
    f = fim(rows, np.random.default_rng(seed))
    sp = fim.specials
    B, R = rows.tokens.shape
    assert f.targets.shape == (B, R) and f.targets.dtype == np.int32
    assert f.positions is not None and f.positions.dtype == np.int32
    assert np.array_equal(f.positions, positions_from_eos(f.targets, sp.eos))
    expected_mask = (f.positions > 0) & (f.targets != sp.pad) & (f.targets != sp.fim_pad)
    assert np.array_equal(f.target_mask, expected_mask)
    kinds: list[str] = []
    for b in range(B):
        starts_doc = b == 0 or rows.tokens[b - 1, -1] == sp.eos
        kinds += check_row(fim, tb, tokenizer, rows.tokens[b].tolist(), f.targets[b].tolist(),
                           f.target_mask[b], starts_doc)
    return kinds


texts = st.lists(st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
                 min_size=1, max_size=6)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=texts, R=st.integers(6, 48), rate=st.sampled_from([1.0, 0.5]),
       spm=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**32 - 1))
def test_parts_reorder_to_the_original_text(fim: FIM, token_bytes: dict[int, bytes],
                                            tokenizer: Tokenizer, docs: list[str], R: int,
                                            rate: float, spm: float, seed: int) -> None:
    assume(not any(s in d for d in docs for s in SPECIAL_TOKENS))
    rows, _ = pack(tokenizer, docs, R, fim.specials)
    obj = FIM(specials=fim.specials, tables=fim.tables, fim_rate=rate, spm_rate=spm)
    kinds = check_batch(obj, token_bytes, tokenizer, rows, seed)
    if spm == 1.0:
        assert "psm" not in kinds
    if rate == 1.0:
        assert "plain" not in kinds


def corpus(n: int, rng: np.random.Generator) -> list[str]:
    """Documents of mixed scripts, cut from the training text at random places."""
    text = "".join(TRAINING_TEXT)
    out = []
    for _ in range(n):
        a = int(rng.integers(0, len(text) - 10))
        out.append(text[a:a + int(rng.integers(1, 120))])
    return out


def test_rates_psm_spm_and_padding(fim: FIM, token_bytes: dict[int, bytes],
                                   tokenizer: Tokenizer) -> None:
    rows, _ = pack(tokenizer, corpus(600, np.random.default_rng(0)), 64, fim.specials)
    kinds = check_batch(fim, token_bytes, tokenizer, rows, seed=1)
    n = len(kinds)
    counts = {k: kinds.count(k) for k in ("plain", "psm", "spm", "padded")}
    assert 0.4 < (n - counts["plain"]) / n < 0.6  # fim_rate 0.5
    # SPM and PSM both occur; an empty prefix (rare) makes a PSM example read as SPM.
    assert 0.35 < counts["psm"] / (counts["psm"] + counts["spm"]) < 0.56
    assert counts["padded"] > 0


def test_cuts_are_uniform_over_characters(fim: FIM, token_bytes: dict[int, bytes],
                                          tokenizer: Tokenizer) -> None:
    """Sorted pairs of uniform cuts over the N + 1 character positions: chi-square on all pairs.
    Multi-byte characters and multi-character tokens must not bias where cuts land."""
    text = "für 😀 return"  # 12 characters; tokens hold 1..6 characters, one of 4 bytes
    N = len(text)
    ids = tokenizer.encode(text).ids
    sp = fim.specials
    n_rows = 6000
    row = ids + [sp.eos] + [sp.pad] * 24
    rows = Rows.from_tokens(np.tile(np.array(row, dtype=np.int32), (n_rows, 1)), sp.eos)
    psm = FIM(specials=sp, tables=fim.tables, fim_rate=1.0, spm_rate=0.0)
    out = psm(rows, np.random.default_rng(7)).targets
    counts = np.zeros((N + 1, N + 1))
    for r in out.tolist():
        s_at, m_at = r.index(sp.fim_suffix), r.index(sp.fim_middle)
        end = r.index(sp.eos)
        prefix = b"".join(token_bytes[t] for t in r[1:s_at]).decode()
        middle = b"".join(token_bytes[t] for t in r[m_at + 1:end]).decode()
        suffix = b"".join(token_bytes[t] for t in r[s_at + 1:m_at]).decode()
        assert prefix + middle + suffix == text
        counts[len(prefix), len(prefix) + len(middle)] += 1
    i, j = np.triu_indices(N + 1)
    expected = np.where(i == j, 1.0, 2.0) * n_rows / (N + 1) ** 2
    chi2 = (((counts[i, j] - expected) ** 2) / expected).sum()
    dof = len(i) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), chi2
    assert counts[np.tril_indices(N + 1, -1)].sum() == 0


def test_fragment_starting_mid_character_can_still_have_an_empty_prefix(
        fim: FIM, tokenizer: Tokenizer, token_bytes: dict[int, bytes]) -> None:
    """Packing may start a row inside a multi-byte character: the dangling bytes count as one
    character, and the fragment's start is a cut position like any document start."""
    sp = fim.specials
    cont = tokenizer.token_to_id(chr(0x100 + 34))  # the byte-level symbol of byte 0x80
    assert token_bytes[cont] == b"\x80"
    ids = [cont, *tokenizer.encode("ab").ids]
    rows = Rows.from_tokens(np.tile(np.array(ids + [sp.eos] + [sp.pad] * 8, dtype=np.int32),
                                    (400, 1)), sp.eos)
    psm = FIM(specials=sp, tables=fim.tables, fim_rate=1.0, spm_rate=0.0)
    out = psm(rows, np.random.default_rng(0)).targets.tolist()
    prefixes = {b"".join(token_bytes[t] for t in r[1:r.index(sp.fim_suffix)]) for r in out}
    assert prefixes == {b"", b"\x80", b"\x80a", b"\x80ab"}


def test_fim_rate_zero_is_clm_byte_for_byte(fim: FIM, tokenizer: Tokenizer) -> None:
    rows, _ = pack(tokenizer, corpus(200, np.random.default_rng(3)), 50, fim.specials)
    off = FIM(specials=fim.specials, tables=fim.tables, fim_rate=0.0)
    got = off(rows, np.random.default_rng(0))
    want = CLM(specials=fim.specials)(rows, np.random.default_rng(0))
    for name in ("targets", "target_mask", "positions"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert got.inputs is None and got.extras == want.extras


def test_positions_keep_the_input_convention_outside_fim_documents(
        fim: FIM, tokenizer: Tokenizer) -> None:
    """A loader may give PAD its own positions (here all 0): they pass through, while the EOS
    after a FIM document counts on from the document's last position."""
    sp = fim.specials
    rows, _ = pack(tokenizer, corpus(40, np.random.default_rng(8)), 37, sp)
    positions = np.where(rows.tokens == sp.pad, 0, rows.positions).astype(np.int32)
    assert (rows.tokens == sp.pad).any()
    f = FIM(specials=sp, tables=fim.tables, fim_rate=1.0)(Rows(rows.tokens, positions),
                                                          np.random.default_rng(0))
    pad = f.targets == sp.pad
    assert f.positions is not None and (f.positions[pad] == 0).all()
    assert np.array_equal(f.positions[~pad], positions_from_eos(f.targets, sp.eos)[~pad])
    assert not f.target_mask[pad].any()


def test_deterministic_per_seed(fim: FIM, tokenizer: Tokenizer) -> None:
    rows, _ = pack(tokenizer, corpus(200, np.random.default_rng(4)), 40, fim.specials)
    a, b = fim(rows, np.random.default_rng(5)), fim(rows, np.random.default_rng(5))
    c = fim(rows, np.random.default_rng(6))
    assert np.array_equal(a.targets, b.targets) and np.array_equal(a.target_mask, b.target_mask)
    assert not np.array_equal(a.targets, c.targets)


def test_worked_example_of_the_docstring() -> None:
    vocab = {6: b"def", 7: b" f", 8: b"de", 9: b"f", 10: b" ", 11: b"x", 12: b"d", 13: b"e"}
    by_bytes = {v: k for k, v in vocab.items()}

    def encode(data: bytes) -> list[int]:  # greedy longest match is exact for this vocabulary
        ids = []
        while data:
            k = max(n for n in range(1, len(data) + 1) if data[:n] in by_bytes)
            ids.append(by_bytes[data[:k]])
            data = data[k:]
        return ids

    sp = SpecialIds(eos=0, pad=1, mask=14, sentinels=(), fim_prefix=2, fim_suffix=3,
                    fim_middle=4, fim_pad=5, nlu=15, nlg=16, s2s=17, vocab_size=18)
    tables = _tables_from_bytes([vocab.get(i) for i in range(18)], encode)
    obj = FIM(specials=sp, tables=tables, fim_rate=1.0)
    rows = Rows.from_tokens(np.array([[6, 7, 0, 11, 11, 11, 11, 11]]), eos=0)
    seen = set()
    for seed in range(400):
        f = obj(rows, np.random.default_rng(seed))
        seen.add(tuple(f.targets[0].tolist()))
        assert np.array_equal(f.positions, positions_from_eos(f.targets, eos=0))
    assert (2, 8, 3, 9, 4, 9, 10, 0) in seen  # PSM, cuts 2 and 4
    assert (2, 3, 9, 4, 8, 9, 10, 0) in seen  # SPM, same cuts


def test_tables_split_tokens_exactly(fim: FIM, token_bytes: dict[int, bytes]) -> None:
    t = fim.tables
    assert t is not None and len(t.split_offset) > 0
    for tok in range(t.vocab_size):
        data = token_bytes[tok]
        for e in range(t.split_base[tok], t.split_base[tok + 1]):
            k = t.split_offset[e]
            left = b"".join(token_bytes[i] for i in t.pieces[t.piece_start[e]:t.piece_mid[e]])
            right = b"".join(token_bytes[i] for i in t.pieces[t.piece_mid[e]:t.piece_end[e]])
            assert 0 < k < len(data) and data[k] & 0xC0 != 0x80
            assert left == data[:k] and right == data[k:]


def test_byte_level_alphabet_matches_the_tokenizer() -> None:
    """Every byte valid UTF-8 can hold maps as the byte-level pre-tokenizer maps it."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    for ch in ["\x00", "a", " ", "\x7f", "é", "\u07ff", "\u0800", "€", "\uffff", "😀",
               "\U0010ffff", *map(chr, range(0x80, 0x800, 7))]:
        mapped = pre.pre_tokenize_str(ch)[0][0]
        assert bytes(alphabet[c] for c in mapped) == ch.encode("utf-8")


def test_parameters_and_errors(fim: FIM) -> None:
    sp = fim.specials
    assert fim.params() == {"fim_rate": 0.5, "spm_rate": 0.5}
    for bad in ({"fim_rate": -0.1}, {"fim_rate": 1.5}, {"spm_rate": 2}, {"fim_rate": "0.5"}):
        with pytest.raises(ValueError):
            FIM(specials=sp, **bad)  # type: ignore[arg-type]
        with pytest.raises(UserError):
            build_objective("fim", bad, sp)
    with pytest.raises(UserError, match="tables"):
        build_objective("fim", {"tables": "mine"}, sp)
    bare = build_objective("fim", {"fim_rate": 0.9}, sp)
    assert isinstance(bare, FIM) and bare.params() == {"fim_rate": 0.9, "spm_rate": 0.5}
    rows = Rows.from_tokens(np.array([[200, 201, sp.eos]]), sp.eos)
    with pytest.raises(ValueError, match="tables"):
        bare(rows, np.random.default_rng(0))
    wired = bare.with_tables(fim.tables)
    assert wired(rows, np.random.default_rng(0)).targets.shape == (1, 3)
    empty = Rows.from_tokens(np.zeros((0, 8), dtype=np.int32), sp.eos)
    assert wired(empty, np.random.default_rng(0)).targets.shape == (0, 8)
    with pytest.raises(ValueError, match="outside"):
        wired(Rows.from_tokens(np.array([[10**6, sp.eos]]), sp.eos), np.random.default_rng(0))


def test_rejects_a_tokenizer_that_is_not_byte_level_bpe() -> None:
    word = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(UserError, match="byte-level BPE"):
        FIM.tables_from_tokenizer(word)
    odd = Tokenizer(models.BPE(vocab={"a": 0, "ü": 1, "\u4e00": 2}, merges=[]))
    with pytest.raises(UserError, match="byte-level"):
        FIM.tables_from_tokenizer(odd)
