"""Exact self-speculative decoding with multi-token-prediction heads: drafts with rolled-back
caches, greedy and sampled speculative decoding equal to plain decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmobjectives.data.converters import to_decoder
from lmobjectives.infer.generate import distribution, generate
from lmobjectives.infer.speculative import (ParallelDrafter, SequentialDrafter, accept_greedy,
                                            accept_sampled, speculative_generate)
from lmobjectives.models.mtp import MTPModel
from lmobjectives.objectives.base import Rows
from lmobjectives.objectives.mtp import MTP
from lmobjectives.runtime import to_torch
from lmobjectives.step.mtp import MTPModule
from mtp_util import DESIGNS, tiny_mtp

CPU = torch.device("cpu")


def reference_drafts(model: MTPModel, seq: list[int], next_token: int, k: int) -> list[torch.Tensor]:
    """Draft logits recomputed from scratch (no cache) over the committed sequence."""
    ids = torch.tensor([seq])
    z, ctx = model.trunk(ids)
    r = len(seq) - 1
    out = []
    if model.spec.head_design == "parallel":
        for j in range(k):
            out.append(model.logits(j + 2, model.head_hidden(j + 2, z, ctx))[0, r])
        return out
    stream, h = seq + [next_token], z
    for j in range(1, k + 1):
        toks = torch.tensor([[stream[i + j] for i in range(r + 1)]])
        h = model.head_hidden(j + 1, h, ctx, tokens=toks)
        logits = model.logits(j + 1, h)[0, r]
        stream.append(int(logits.argmax()))
        out.append(logits)
    return out


@pytest.mark.parametrize("design", DESIGNS)
@torch.no_grad()
def test_drafts_with_rolled_back_caches_equal_recomputation(specials, design):
    """Cache bookkeeping: after any pattern of accepted lengths the drafts are those of a
    fresh forward over the committed tokens."""
    model = tiny_mtp(specials, 4, design)
    drafter = ParallelDrafter(model) if design == "parallel" else SequentialDrafter(model)
    rng = np.random.default_rng(1)
    seq = [specials.eos] + rng.integers(200, 500, size=4).tolist()
    drafter.forward(seq)
    drafter.commit(len(seq))
    recorded: list[torch.Tensor] = []

    def pick(logits):
        recorded.append(logits)
        return int(logits.argmax()), None

    for _ in range(8):
        nxt = int(rng.integers(200, 500))
        k = int(rng.integers(1, 4))
        recorded.clear()
        drafts, _ = drafter.draft(nxt, k, pick)
        for got, want in zip(recorded, reference_drafts(model, seq, nxt, k), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        fed = [nxt] + drafts
        drafter.forward(fed)
        keep = int(rng.integers(1, len(fed) + 1))
        drafter.commit(keep)
        seq += fed[:keep]


def fit_cycles(model: MTPModel, specials, steps: int = 30) -> MTPModel:
    """Train on a few repeating cycles so that heads agree with the base model (acceptance)."""
    cycles = [[300, 301, 302, 303, 304], [400, 410, 420], [350, 351, 352, 353, 354, 355, 356]]
    rows = [[specials.eos] + (c * 20)[:47] for c in cycles]
    batch = to_decoder(MTP(specials=specials)(Rows.from_tokens(np.array(rows), specials.eos),
                                              np.random.default_rng(0)), specials)
    module = MTPModule(model, MTP(specials=specials, n_heads=model.n_heads, head_design=model.spec.head_design))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    totals = torch.as_tensor(module.counts(batch), dtype=torch.float32)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        module.forward_backward(to_torch(batch, CPU), totals)
        opt.step()
    return model.eval()


@pytest.mark.parametrize("design", DESIGNS)
def test_greedy_speculative_equals_plain_greedy(specials, design):
    untrained = tiny_mtp(specials, 4, design, seed=3)
    trained = fit_cycles(tiny_mtp(specials, 4, design, seed=4), specials)
    prompts = [[specials.eos, 300, 301], [specials.eos, 400, 410],
               [specials.eos, 250, 260, 270, 280, 290]]
    accepted_any = False
    for model in (untrained, trained):
        for prompt in prompts:
            plain = generate(model, prompt, max_new_tokens=20)
            spec = speculative_generate(model, prompt, max_new_tokens=20)
            assert spec.tokens == plain.tokens
            assert spec.forward_passes <= plain.forward_passes
            rates = spec.extras["acceptance"]
            assert set(rates) == {"head2", "head3", "head4"}
            accepted_any |= rates["head2"] > 0.5
    assert accepted_any  # the accept-and-roll-back path ran, not only rejections
    cut = speculative_generate(trained, prompts[0], max_new_tokens=7)
    assert cut.tokens == generate(trained, prompts[0], max_new_tokens=7).tokens and len(cut.tokens) == 7


@pytest.mark.parametrize("design", DESIGNS)
def test_suppressed_tokens_never_come_and_speculative_still_equals_plain(specials, design):
    """``lmobj generate`` suppresses the reserved tokens; the tokens a model would emit are
    suppressed here so the mask decides, and both decoders still agree token for token."""
    model = fit_cycles(tiny_mtp(specials, 4, design, seed=4), specials)
    prompt = [specials.eos, 300, 301]
    free = generate(model, prompt, max_new_tokens=20).tokens
    banned = tuple(sorted(set(free[:4])))
    plain = generate(model, prompt, max_new_tokens=20, suppress_ids=banned)
    spec = speculative_generate(model, prompt, max_new_tokens=20, suppress_ids=banned)
    assert spec.tokens == plain.tokens and not set(banned) & set(plain.tokens)
    assert plain.tokens[0] != free[0]
    for seed in range(10):  # sampled, both ways: never a suppressed token
        for g in (generate(model, prompt, max_new_tokens=8, temperature=1.5, seed=seed, suppress_ids=banned),
                  speculative_generate(model, prompt, max_new_tokens=8, temperature=1.5, seed=seed,
                                       suppress_ids=banned)):
            assert not set(banned) & set(g.tokens)


def test_free_text_suppresses_every_reserved_token_but_eos(specials):
    from lmobjectives.infer.prompts import free_text_suppressed

    ids = free_text_suppressed(specials)
    assert specials.eos not in ids and specials.fim_middle in ids and specials.nlg in ids
    assert set(ids) | {specials.eos} == set(specials.all_ids())


def test_speculative_stops_at_eos_like_plain(specials):
    model = fit_cycles(tiny_mtp(specials, 3, "parallel", seed=5), specials, steps=40)
    prompt = [specials.eos, 400, 410]
    stop = (generate(model, prompt, max_new_tokens=12).tokens[5],)  # a token it will emit
    plain = generate(model, prompt, max_new_tokens=30, stop_ids=stop)
    spec = speculative_generate(model, prompt, max_new_tokens=30, stop_ids=stop)
    assert spec.tokens == plain.tokens and spec.stopped_by == plain.stopped_by == "eos"


def test_accept_greedy():
    logits = torch.eye(6)[[2, 3, 5, 1]]  # base argmax after each fed token: 2, 3, 5, 1
    assert accept_greedy(logits, [2, 3, 4]) == (2, 5)
    assert accept_greedy(logits, [0, 3, 5]) == (0, 2)
    assert accept_greedy(logits, [2, 3, 5]) == (3, 1)


def test_speculative_sampling_keeps_the_target_distribution():
    """Two chained drafts over 4 tokens: the emitted pair follows p(x1) p(x2 | x1) exactly,
    although the draft distributions are far from it."""
    V = 4
    gen = torch.Generator().manual_seed(0)
    p1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p2 = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25],
                       [0.0, 0.5, 0.5, 0.0], [0.1, 0.0, 0.0, 0.9]])  # p(x2 | x1)
    q1 = torch.tensor([0.6, 0.3, 0.1, 0.0])
    q2 = torch.tensor([0.1, 0.1, 0.1, 0.7])
    n = 6000
    counts = torch.zeros(V, V)
    for _ in range(n):
        d1 = int(torch.multinomial(q1, 1, generator=gen))
        d2 = int(torch.multinomial(q2, 1, generator=gen))
        p_rows = torch.stack([p1, p2[d1], torch.full((V,), 1 / V)])
        a, nxt = accept_sampled(p_rows, [q1, q2], [d1, d2], gen)
        x1 = d1 if a >= 1 else nxt
        x2 = d2 if a >= 2 else (nxt if a == 1 else None)
        if x2 is None:  # only x1 decided this step: draw x2 from the target as the next step would
            x2 = int(torch.multinomial(p2[x1], 1, generator=gen))
        counts[x1, x2] += 1
    want = p1[:, None] * p2
    tv = 0.5 * (counts / n - want).abs().sum()
    assert tv < 0.04, tv  # sampling noise for 16 cells and 6000 draws: ~0.015


@torch.no_grad()
def test_sampled_speculative_decoding_matches_plain_sampling(specials):
    """End to end, small vocabulary: the second sampled token (the first one a draft proposes)
    has the distribution of plain sampling, computed exactly from the model."""
    V = 8
    from dataclasses import replace

    sp = replace(specials, vocab_size=V, eos=0, pad=1)
    model = tiny_mtp(sp, 2, "parallel", seed=7, initializer_range=0.5)
    prompt = [0, 3, 5]
    p1 = distribution(model(input_ids=torch.tensor([prompt])).logits[0, -1], 1.0, 1.0)
    p2 = torch.stack([distribution(model(input_ids=torch.tensor([prompt + [x]])).logits[0, -1], 1.0, 1.0)
                      for x in range(V)])
    want = p1[:, None] * p2  # (V, V)
    n = 500
    second = torch.zeros(V)
    for seed in range(n):
        g = speculative_generate(model, prompt, max_new_tokens=2, temperature=1.0, seed=seed)
        second[g.tokens[1]] += 1
    want = p1 @ p2  # marginal of the second token, the one the draft competes for: (V,)
    tv = 0.5 * (second / n - want).abs().sum()
    # Accepting every draft would give the head's distribution instead; make sure that is far.
    z, ctx = model.trunk(torch.tensor([prompt]))
    q = distribution(model.logits(2, model.head_hidden(2, z, ctx))[0, -1], 1.0, 1.0)
    assert 0.5 * (q - want).abs().sum() > 0.3
    assert tv < 0.12, tv  # sampling noise for 8 cells and 500 draws: ~0.05


def test_compare_times_an_mtp_run_with_its_own_step(specials, monkeypatch):
    """``lmobj compare``'s train tokens/s times the step training ran: every MTP head, not
    the plain next-token step of the same trunk (which read as fast as CLM)."""
    from types import SimpleNamespace

    from lmobjectives.compare import measure
    from lmobjectives.step import StandardModule

    model = tiny_mtp(specials, 4, "parallel")
    rows = Rows.from_tokens(np.random.default_rng(0).integers(200, 500, size=(2, 32)), specials.eos)
    subject = SimpleNamespace(model=model, architecture="decoder", specials=specials,
                              transform=MTP(specials=specials, n_heads=4))
    bench = SimpleNamespace(rows_of=lambda length: rows, device=CPU, seq_len=32)
    calls = {"mtp": 0}
    real = MTPModule.forward_backward

    def counted(self, *a, **kw):  # noqa: ANN001,ANN002,ANN003,ANN202
        calls["mtp"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(MTPModule, "forward_backward", counted)
    monkeypatch.setattr(StandardModule, "forward_backward",
                        lambda *a, **kw: pytest.fail("timed the plain next-token step"))
    out = measure._throughput(subject, bench)
    assert calls["mtp"] == measure.THROUGHPUT_STEPS + 1
    assert out["value"] == pytest.approx(rows.tokens.size / out["seconds_per_step"])
