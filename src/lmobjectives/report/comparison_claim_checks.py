"""The five claims the comparison report checks (see ``comparison_claims`` for the roles,
tests and margins). Each function reads the aggregated rows and returns one ``Claim``."""

from __future__ import annotations

from lmobjectives.report.comparison_claims import (BIDIRECTIONAL, BPB_MARGIN, INCONCLUSIVE,
                                                   PROBE_MARGIN, SUPPORTED, Claim, combine, diff,
                                                   fmt_diff, missing, more_seeds, players, role,
                                                   samples,
                                                   sign, values, within)
from lmobjectives.report.comparison_rows import Row, fmt, show
from lmobjectives.report.stats import interval

# Claim 1's expected shares: BERT §3.1 selects 15% of tokens; T5 §3.1.4 corrupts 15% in spans
# of mean length 3, so targets (sentinels + spans) are a fraction of the inputs.
CLM_MIN_SIGNAL = 0.9
MASKED_SIGNAL = (0.10, 0.25)
SPAN_MAX_RATIO = 0.5


def _seeds(rows: list[Row]) -> int:
    return max((len(r.seeds) for r in rows), default=1)


def _ratio(row: Row) -> float | None:
    got = [s.extras.get("signal", {}).get("target_input_ratio") for s in (row.seeds or [row])]
    got = [g for g in got if g is not None]
    return sum(got) / len(got) if got else None


def claim_signal(rows: list[Row]) -> Claim:
    title = "Training signal per token: CLM ~100%, MLM ~15%, span ~15% with targets much shorter than inputs, prefix LM = its suffix share"
    how = ("the run's own objective applied to the same held-out rows: scored target tokens / "
           "real corpus tokens, and mean target length / mean input length")
    clm, mlm, span, prefix = (role(rows, n) for n in ("CLM", "MLM", "span", "prefix LM"))
    if clm is None:
        return missing(title, how, "a CLM run")
    numbers, parts = [], []
    v = clm.values.get("signal")
    numbers.append(f"CLM ({clm.label}): {fmt(v, 3)}")
    parts.append(0 if v is None else (1 if v >= CLM_MIN_SIGNAL else -1))
    for r, lo_hi in ((mlm, MASKED_SIGNAL), (span, MASKED_SIGNAL)):
        if r is None:
            continue
        v, ratio = r.values.get("signal"), _ratio(r)
        numbers.append(f"{r.label}: {fmt(v, 3)}" + ("" if ratio is None else f", target/input {ratio:.3f}"))
        ok = v is not None and lo_hi[0] <= v <= lo_hi[1]
        if r is span:
            ok = ok and ratio is not None and ratio <= SPAN_MAX_RATIO
        parts.append(1 if ok else -1)
    if prefix is not None and (ratio := _ratio(prefix)) is not None:
        v = prefix.values.get("signal")
        share = ratio / (1 + ratio)  # suffix / (prefix + suffix)
        numbers.append(f"{prefix.label}: {fmt(v, 3)}, suffix share {share:.3f}")
        parts.append(1 if v is not None and abs(v - share) <= 0.05 else -1)
    verdict = combine(parts)
    return Claim(title, how, numbers, verdict,
                 "" if verdict != INCONCLUSIVE else "runs of every objective the claim names")


def claim_bidirectional(rows: list[Row]) -> Claim:
    title = "Bidirectional objectives (MLM, span, UL2, prefix LM) beat CLM on right-context probes and not on left-context ones"
    how = ("token-probe balanced accuracy per family, each bidirectional run minus CLM (Welch "
           f"95% interval over seeds); 'not on left' = left gap at most {PROBE_MARGIN}")
    clm = role(rows, "CLM")
    bidi = [r for r in rows if r.architecture in BIDIRECTIONAL]
    if clm is None or not bidi:
        return missing(title, how, "a CLM run and at least one bidirectional run")
    numbers, parts, pairs = [], [], []
    for r in bidi:
        dr, dl = diff(r, clm, "probe_right"), diff(r, clm, "probe_left")
        numbers.append(f"{r.label} − {clm.label}: right {fmt_diff(dr)}, left {fmt_diff(dl)}")
        right, left = sign(dr), within(dl, PROBE_MARGIN)
        parts.append(-1 if right < 0 or left < 0 else (1 if right > 0 and left > 0 else 0))
        pairs += [(samples(r, "probe_right"), samples(clm, "probe_right"), 0.0),
                  (samples(r, "probe_left"), samples(clm, "probe_left"), PROBE_MARGIN)]
    numbers.append("per run: " + "; ".join(
        f"{values(r, 'probe_right')} right, {show(r, 'probe_left', 3)} left" for r in [clm, *bidi]))
    verdict = combine(parts)
    return Claim(title, how, numbers, verdict,
                 more_seeds(pairs, _seeds(rows)) if verdict == INCONCLUSIVE else "")


def claim_fim(rows: list[Row]) -> Claim:
    title = "FIM at rate 0.5 costs essentially nothing in left-to-right bits/byte (≤ 2% relative) while adding infilling"
    how = ("held-out bits/byte FIM − CLM relative to CLM (Welch interval), and single-line infill "
           "exact match: FIM with its FIM prompt vs CLM continuing the prefix alone")
    clm, fim = role(rows, "CLM"), role(rows, "FIM")
    if clm is None or fim is None:
        return missing(title, how, "a CLM and a FIM run")
    scale = clm.values.get("bits_per_byte") or 1.0
    d_bpb, d_em = diff(fim, clm, "bits_per_byte"), diff(fim, clm, "infill_exact_match")
    numbers = [f"bits/byte: {values(fim, 'bits_per_byte')}, {values(clm, 'bits_per_byte')}; "
               f"FIM − CLM {fmt_diff(d_bpb, scale=scale, pct=True)}",
               f"infill exact match: {values(fim, 'infill_exact_match')}, {values(clm, 'infill_exact_match')}; "
               f"FIM − CLM {fmt_diff(d_em)}"]
    parts = [within(d_bpb, BPB_MARGIN, scale), sign(d_em) if sign(d_em) >= 0 else -1]
    verdict = combine(parts)
    pairs = [(samples(fim, "bits_per_byte"), samples(clm, "bits_per_byte"), BPB_MARGIN * scale),
             (samples(fim, "infill_exact_match"), samples(clm, "infill_exact_match"), 0.0)]
    return Claim(title, how, numbers, verdict,
                 more_seeds(pairs, _seeds(rows)) if verdict == INCONCLUSIVE else "")


def claim_mtp(rows: list[Row]) -> Claim:
    title = "MTP heads speed up decoding (exact outputs) and do not hurt next-token bits/byte"
    how = ("self-speculative over plain greedy decoding, same prompts and token count (wall-clock "
           "speedup, acceptance per head, tokens per forward, outputs compared token by token); "
           "held-out bits/byte MTP − CLM relative to CLM, margin 2%")
    clm, mtp = role(rows, "CLM"), role(rows, "MTP")
    if mtp is None:
        return missing(title, how, "an MTP run")
    speed = samples(mtp, "speculative_speedup")
    iv = interval(speed) if speed else None
    seeds = mtp.seeds or [mtp]
    exact = all(s.extras.get("speculative_speedup", {}).get("identical_output", False) for s in seeds)
    acc: dict[str, list[float]] = {}
    for s in seeds:
        for h, v in s.extras.get("speculative_speedup", {}).get("acceptance", {}).items():
            acc.setdefault(h, []).append(v)
    tpf = [t for s in seeds if (t := s.extras.get("speculative_speedup", {}).get("tokens_per_forward"))]
    numbers = [f"speedup {values(mtp, 'speculative_speedup', 2)}; identical outputs: {'yes' if exact else 'NO'}",
               "acceptance " + ", ".join(f"{h} {sum(v) / len(v):.2f}" for h, v in acc.items())
               + (f"; tokens per forward {sum(tpf) / len(tpf):.2f}" if tpf else "")]
    speed_part = 0 if iv is None or iv.low is None else (1 if iv.low > 1 else (-1 if iv.high < 1 else 0))
    parts = [speed_part, 1 if exact else -1]
    pairs = []
    if clm is not None:
        scale = clm.values.get("bits_per_byte") or 1.0
        d = diff(mtp, clm, "bits_per_byte")
        numbers.append(f"bits/byte: {values(mtp, 'bits_per_byte')}, {values(clm, 'bits_per_byte')}; "
                       f"MTP − CLM {fmt_diff(d, scale=scale, pct=True)}")
        parts.append(within(d, BPB_MARGIN, scale))
        pairs.append((samples(mtp, "bits_per_byte"), samples(clm, "bits_per_byte"), BPB_MARGIN * scale))
    else:
        parts.append(0)
    verdict = combine(parts)
    decide = ""
    if verdict == INCONCLUSIVE:
        decide = more_seeds(pairs, _seeds(rows)) + ("" if clm is not None else "; and a CLM run")
    return Claim(title, how, numbers, verdict, decide)


def claim_ul2(rows: list[Row]) -> Claim:
    title = "UL2's mixture gives a model competitive at both generation (bits/byte) and understanding (probes)"
    how = (f"'competitive' = within {BPB_MARGIN:.0%} of CLM's held-out bits/byte (relative) and "
           f"within {PROBE_MARGIN} of the best other bidirectional run's right-context probe")
    # A UL2 run on a decoder (ul2@prefix_lm) scores text left to right: prefer it.
    ul2s = players(rows, "UL2")
    ul2 = next((r for r in ul2s if r.values.get("bits_per_byte") is not None), ul2s[0] if ul2s else None)
    clm = role(rows, "CLM")
    if ul2 is None:
        return missing(title, how, "a UL2 run")
    others = [r for r in rows if r.architecture in BIDIRECTIONAL and r is not ul2
              and r.values.get("probe_right") is not None]
    numbers, parts, pairs = [], [], []
    if ul2.values.get("bits_per_byte") is None or clm is None:
        numbers.append(f"bits/byte: n/a for {ul2.label} ({ul2.architecture.replace('_', '-')} "
                       "cannot score text left to right)" if clm is not None else "no CLM run")
        parts.append(0)
    else:
        scale = clm.values["bits_per_byte"] or 1.0
        d = diff(ul2, clm, "bits_per_byte")
        numbers.append(f"bits/byte: {values(ul2, 'bits_per_byte')}, {values(clm, 'bits_per_byte')}; "
                       f"UL2 − CLM {fmt_diff(d, scale=scale, pct=True)}")
        parts.append(within(d, BPB_MARGIN, scale))
        pairs.append((samples(ul2, "bits_per_byte"), samples(clm, "bits_per_byte"), BPB_MARGIN * scale))
    if others:
        best = max(others, key=lambda r: r.values["probe_right"])
        d = diff(best, ul2, "probe_right")
        numbers.append(f"right-context probe: {values(ul2, 'probe_right')}, best other "
                       f"{values(best, 'probe_right')}; best − UL2 {fmt_diff(d)}")
        parts.append(within(d, PROBE_MARGIN))
        pairs.append((samples(best, "probe_right"), samples(ul2, "probe_right"), PROBE_MARGIN))
    else:
        parts.append(0)
    verdict = combine(parts)
    if ul2.values.get("bits_per_byte") is None:
        # The claim is about one model good at both; a model that cannot be scored on
        # generation leaves it open, whatever its probes say (shown above).
        verdict = INCONCLUSIVE
    decide = ""
    if verdict == INCONCLUSIVE:
        decide = more_seeds(pairs, _seeds(rows))
        if ul2.values.get("bits_per_byte") is None:
            decide += f"; bits/byte needs UL2 on a decoder: add {ul2.objective}@prefix_lm to --objectives"
    return Claim(title, how, numbers, verdict, decide)


CLAIMS = (claim_signal, claim_bidirectional, claim_fim, claim_mtp, claim_ul2)


def check_claims(rows: list[Row]) -> list[Claim]:
    return [check(rows) for check in CLAIMS]


__all__ = ["CLAIMS", "SUPPORTED", "check_claims"]
