"""The "Claims" section of the comparison report: each checkable claim of the objectives
chapter's comparison table, the measurement that tests it, the numbers with 95% intervals
over seeds, and a verdict — supported, not supported, or inconclusive at this budget.

Roles, not names: a claim about "CLM" or "FIM" picks its row by what the objective declares
(``objectives.capabilities``): the plain left-to-right decoder (CLM), the FIM-prompt decoder,
the draft-head decoder (MTP), the masked-LM encoder that does not generate (MLM), the
sentinel-span objective without a mode token (span corruption) and with one (UL2), the
prefix-LM decoder (prefix LM); "bidirectional" is any encoder, encoder-decoder or prefix-LM
row.

Tests. A difference is measurable when Welch's 95% interval over seeds excludes 0
(``report.stats.welch``). "Costs essentially nothing" / "competitive" are equivalence claims:
supported when the whole interval lies inside the margin, not supported when the whole
interval lies beyond it, inconclusive otherwise. Margins: bits/byte 2% relative (the FIM
paper's "FIM-for-free", Bavarian et al. 2022 §4, reads differences of this size as free);
probe balanced accuracy 0.02. An inconclusive verdict says how many seeds would decide it:
n ≈ 2 (z₀.₉₇₅ + z₀.₈)² s² / d² per side (80% power at the observed difference d and
per-seed spread s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from lmobjectives.objectives import OBJECTIVES, capabilities
from lmobjectives.report.comparison_rows import Row, fmt, show
from lmobjectives.report.stats import Difference, welch

BPB_MARGIN = 0.02  # relative; FIM-for-free (Bavarian et al. 2022 §4)
PROBE_MARGIN = 0.02  # balanced accuracy
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive at this budget"
_POWER = (1.959964 + 0.841621) ** 2  # (z 0.975 + z 0.8)^2
BIDIRECTIONAL = ("encoder", "encoder_decoder", "prefix_lm")


@dataclass
class Claim:
    title: str
    measurement: str
    numbers: list[str]
    verdict: str
    decide: str = ""  # what budget would decide it (inconclusive only)


# ------------------------------------------------------------------------------- roles
def _caps(row: Row) -> Any:
    return capabilities(row.objective) if row.objective in OBJECTIVES else None


ROLES: dict[str, Callable[[Row, Any], bool]] = {
    "CLM": lambda r, c: r.architecture == "decoder" and c.infill == "left_to_right" and not c.drafts_tokens,
    "FIM": lambda r, c: r.architecture == "decoder" and c.infill == "fim_prompt",
    "MTP": lambda r, c: c.drafts_tokens,
    "MLM": lambda r, c: c.accuracy_key == "masked_accuracy" and c.infill == "none",
    "span": lambda r, c: c.infill == "sentinel_spans" and c.mode_token is None,
    "UL2": lambda r, c: c.infill == "sentinel_spans" and c.mode_token is not None,
    "prefix LM": lambda r, c: r.architecture == "prefix_lm" and c.infill == "left_to_right",
}


def players(rows: list[Row], name: str) -> list[Row]:
    """The rows playing ``name`` (``ROLES``), in report order."""
    return [r for r in rows if _caps(r) is not None and ROLES[name](r, _caps(r))]


def role(rows: list[Row], name: str) -> Row | None:
    """The first row playing ``name``, or None."""
    return next(iter(players(rows, name)), None)


# ----------------------------------------------------------------------------- numbers
def samples(row: Row | None, name: str) -> list[float]:
    return [] if row is None else list(row.samples.get(name, []))


def diff(a: Row, b: Row, name: str) -> Difference | None:
    xa, xb = samples(a, name), samples(b, name)
    return welch(xa, xb) if xa and xb else None


def seeds_needed(a: list[float], b: list[float], margin: float = 0.0) -> int | None:
    """Seeds per side for 80% power at the observed gap beyond ``margin`` (None: no spread)."""
    if len(a) < 2 or len(b) < 2:
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    var = (sum((x - ma) ** 2 for x in a) / (len(a) - 1) + sum((x - mb) ** 2 for x in b) / (len(b) - 1)) / 2
    gap = abs(abs(ma - mb) - margin)
    if var == 0 or gap == 0:
        return None
    return max(2, math.ceil(2 * _POWER * var / gap ** 2))


def fmt_diff(d: Difference | None, digits: int = 3, scale: float = 1.0, pct: bool = False) -> str:
    if d is None:
        return "n/a"
    f = (lambda v: f"{100 * v / scale:+.1f}%") if pct else (lambda v: f"{v / scale:+.{digits}f}")
    return f(d.diff) + ("" if d.low is None else f" [{f(d.low)}, {f(d.high)}]")


def sign(d: Difference | None) -> int:
    """+1 / -1 when measurably above / below 0, else 0."""
    if d is None or not d.significant:
        return 0
    return 1 if d.diff > 0 else -1


def within(d: Difference | None, margin: float, scale: float = 1.0) -> int:
    """+1: the interval lies inside (-inf, margin]; -1: wholly beyond margin; 0: undecided."""
    if d is None or d.low is None:
        return 0
    if d.high / scale <= margin:
        return 1
    return -1 if d.low / scale > margin else 0


def combine(parts: list[int]) -> str:
    """Verdict from part verdicts (+1 for, -1 against, 0 undecided)."""
    if any(p < 0 for p in parts):
        return NOT_SUPPORTED
    return SUPPORTED if parts and all(p > 0 for p in parts) else INCONCLUSIVE


def missing(title: str, measurement: str, what: str) -> Claim:
    return Claim(title, measurement, [], INCONCLUSIVE, f"needs {what} in --objectives")


def more_seeds(pairs: list[tuple[list[float], list[float], float]], now: int) -> str:
    need = [n for a, b, m in pairs if (n := seeds_needed(a, b, m)) is not None]
    if not need:
        return "more seeds or a longer budget (no spread between seeds to extrapolate from)"
    # The normal approximation ignores how wide t is at few seeds: never fewer than now + 1.
    return (f"about {max(max(need), now + 1)} seeds per objective at this token budget (now {now}), or a longer "
            "budget that widens the gap")


def values(row: Row, name: str, digits: int = 3) -> str:
    return f"{row.label} {show(row, name, digits)}"
