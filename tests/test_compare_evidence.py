"""The evidence of ``lmobj compare``: probe labels on hand-written text, intervals and
Welch's test on known distributions, claim verdicts from literal numbers."""

from __future__ import annotations

import numpy as np
import pytest

from lmobjectives.compare import probe_labels as pl
from lmobjectives.report.stats import interval, t975, welch


def marks(f, text: str) -> str:
    """'.' for a character the task does not classify, else its label."""
    ok, lab = f(text)
    return "".join("." if not o else str(int(v)) for o, v in zip(ok, lab))


CODE = 'x = f(a, "s")\nif y.z:\n    g(1)\n'
PROSE = 'He said "Go now." Then he left! the end'


def test_code_left_context_labels():
    assert marks(pl.code_in_brackets, CODE) == "0.0.0011.1110.00.0000.....0010."
    assert marks(pl.code_in_string, CODE) == "0.0.0000.1110.00.0000.....0000."


def test_code_right_context_labels():
    # identifiers only: f and g are called next, x a y z are not (keywords never count)
    assert marks(pl.code_called, CODE) == "0...1.0..........0.0......1...."
    # every token of the `if` line: the line ends with ':'
    assert marks(pl.code_line_colon, CODE) == "0.0.0000.0000.11.1111.....0000."


def test_prose_labels():
    assert marks(pl.prose_in_quotes, PROSE) == "00.0000..11.111...0000.00.0000..000.000"
    assert marks(pl.prose_sent_start, PROSE) == "11.0000..00.000...1111.00.0000..111.000"
    assert marks(pl.prose_sent_end, PROSE) == "00.0000..00.111...0000.00.1111..000.000"
    assert marks(pl.prose_next_cap, PROSE) == "00.1111..00.111...0000.00.0000..000...."


def test_families_and_kinds_cover_both_sides():
    fams = {(t.family, t.kind) for t in pl.TASKS}
    assert fams == {(f, k) for f in (pl.LEFT, pl.RIGHT) for k in ("code", "prose")}


def test_is_code():
    assert pl.is_code("def f(x):\n    return x\n")
    assert not pl.is_code("The cat's toy is here. It is red.")
    assert not pl.is_code("   \n")


def test_token_labels_skip_tokens_holding_the_deciding_character():
    text = "f(a)"
    labels = pl.code_called(text)
    # tokens: "f" | "(a" (holds a non-eligible "(") | ")"
    got = pl.token_labels(labels, [(0, 1), (1, 3), (3, 4)], text)
    assert got.tolist() == [1, -1, -1]
    assert pl.token_labels(labels, [(0, 1), (1, 2), (2, 3)], text).tolist() == [1, -1, 0]


def test_token_labels_with_the_shipped_tokenizer():
    from lmobjectives.tokenizer import load_tokenizer

    enc = load_tokenizer(None).encode(CODE, add_special_tokens=False)
    got = pl.token_labels(pl.code_called(CODE), enc.offsets, CODE)
    called = [CODE[a:b].strip() for (a, b), y in zip(enc.offsets, got) if y == 1]
    not_called = [CODE[a:b].strip() for (a, b), y in zip(enc.offsets, got) if y == 0]
    assert called == ["f", "g"] and not_called == ["x", "a", "y", "z"]


def test_t_quantiles():
    assert t975(1) == pytest.approx(12.706) and t975(10) == pytest.approx(2.228)
    assert t975(1e6) == pytest.approx(1.96, abs=1e-3)
    assert t975(2) > t975(2.5) > t975(3)


def test_interval_on_known_values():
    iv = interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.half == pytest.approx(4.303 / 3 ** 0.5)
    one = interval([5.0])
    assert one.low is None and one.half is None


def test_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for n in (3, 10):
        hits = 0
        for _ in range(2000):
            iv = interval(rng.normal(1.5, 2.0, n).tolist())
            hits += iv.low <= 1.5 <= iv.high
        assert 0.93 < hits / 2000 < 0.97


def test_welch_calls_real_differences_and_rarely_false_ones():
    assert welch([1, 2, 3], [11, 12, 13]).significant
    d = welch([1, 2, 3], [11, 12, 13])
    assert d.diff == -10 and d.low < -10 < d.high
    assert not welch([1.0], [3.0]).significant  # one seed: nothing is called
    rng = np.random.default_rng(1)
    false = sum(welch(rng.normal(0, 1, 4).tolist(), rng.normal(0, 3, 6).tolist()).significant
                for _ in range(2000))
    assert false / 2000 < 0.07  # about the 5% the test promises


def _rows(spec: dict[str, tuple[str, dict[str, list[float]]]]):
    from lmobjectives.report.comparison_rows import Row, aggregate

    runs = []
    for obj, (arch, metrics) in spec.items():
        n = len(next(iter(metrics.values())))
        for i in range(n):
            runs.append(Row(obj, obj, arch, None, 10, 100, 32, "", seed=i,
                            values={k: v[i] for k, v in metrics.items()}))
    return aggregate(runs)


def test_fim_claim_verdicts_from_literal_numbers():
    from lmobjectives.report.comparison_claim_checks import claim_fim
    from lmobjectives.report.comparison_claims import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED

    clm = ("decoder", {"bits_per_byte": [2.00, 2.01, 2.02], "infill_exact_match": [0.0, 0.0, 0.05]})
    free = ("decoder", {"bits_per_byte": [2.00, 2.01, 2.02], "infill_exact_match": [0.30, 0.35, 0.40]})
    costly = ("decoder", {"bits_per_byte": [2.20, 2.21, 2.22], "infill_exact_match": [0.30, 0.35, 0.40]})
    noisy = ("decoder", {"bits_per_byte": [1.9, 2.3, 2.0], "infill_exact_match": [0.30, 0.35, 0.40]})
    assert claim_fim(_rows({"clm": clm, "fim": free})).verdict == SUPPORTED
    assert claim_fim(_rows({"clm": clm, "fim": costly})).verdict == NOT_SUPPORTED
    got = claim_fim(_rows({"clm": clm, "fim": noisy}))
    assert got.verdict == INCONCLUSIVE and "seeds per objective" in got.decide
    assert claim_fim(_rows({"clm": clm})).verdict == INCONCLUSIVE  # no FIM run: says what is missing


def test_bidirectional_claim_needs_a_right_gap_and_no_left_gap():
    from lmobjectives.report.comparison_claim_checks import claim_bidirectional
    from lmobjectives.report.comparison_claims import NOT_SUPPORTED, SUPPORTED

    clm = ("decoder", {"probe_left": [0.800, 0.801, 0.802], "probe_right": [0.60, 0.61, 0.62]})
    good = ("encoder", {"probe_left": [0.800, 0.801, 0.802], "probe_right": [0.70, 0.71, 0.72]})
    bad = ("encoder", {"probe_left": [0.80, 0.81, 0.82], "probe_right": [0.50, 0.51, 0.52]})
    assert claim_bidirectional(_rows({"clm": clm, "mlm": good})).verdict == SUPPORTED
    assert claim_bidirectional(_rows({"clm": clm, "mlm": bad})).verdict == NOT_SUPPORTED
