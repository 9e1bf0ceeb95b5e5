"""Exact self-speculative decoding with multi-token-prediction heads (blockwise parallel
decoding, Stern et al. 2018 §3–§4; used on MTP models by Gloeckle et al. 2024 §3.2).

One step, for a model with n heads, after the committed tokens x_1..x_p and the base model's
own next token x_{p+1}:

1. draft: heads 2..n propose d_{p+2} .. d_{p+n} (parallel heads read position p's trunk
   state; sequential depths chain, each reading the token drafted before it);
2. verify: one forward pass of the base model over [x_{p+1}, d_{p+2}, ..., d_{p+n}] gives its
   choice after each of them;
3. accept the longest prefix of drafts the base model agrees with, plus the base model's own
   next token after it (always at least one new token per pass); roll every KV cache back to
   the accepted length (``DynamicCache.crop``).

Greedy (temperature 0): a draft is accepted iff it equals the base model's argmax, so the
output is plain greedy decoding token for token — only the number of forward passes changes.
Worked example, n = 4: committed "a b", base says next "c"; heads draft "d e x"; the base
model over [c, d, e, x] chooses [d, e, f, ·] → accept d, e (x ≠ f), emit c d e, next token
f: 3 tokens for 1 forward pass, caches cropped to "a b c d e".

Sampling (temperature > 0): speculative sampling (Leviathan et al. 2023; Chen et al. 2023):
accept draft d with probability min(1, p(d)/q(d)), p the base model's and q the head's
distribution (both after temperature and top-p); on rejection sample from
normalise(max(0, p − q)) and stop; if every draft passes, the next token comes from p. The
output distribution is the base model's, exactly (``tests/test_mtp.py`` checks it).

Trade-off: each verify pass processes n tokens and runs n − 1 extra head layers, so a pass
costs more than a one-token step; the speed-up is (tokens per pass) / (relative cost of a
pass), which is why acceptance rate alone says little (see ``benchmarks/speculative.py``).
Batch size 1; the caches are transformers' own ``DynamicCache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmobjectives.infer.generate import Generation, distribution, suppress
from lmobjectives.models.mtp import MTPModel

Pick = Callable[[torch.Tensor], tuple[int, torch.Tensor | None]]


def rollback(cache, length: int) -> None:  # noqa: ANN001 - transformers Cache
    """Drop cached positions from ``length`` on."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def accept_greedy(base_logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """(number of drafts accepted, the base model's next token after them); base_logits is
    (len(drafts) + 1, V), row j the base model's prediction after fed token j."""
    best = base_logits.argmax(-1).tolist()
    a = 0
    while a < len(drafts) and drafts[a] == best[a]:
        a += 1
    return a, best[a]


def accept_sampled(p_rows: torch.Tensor, q_rows: list[torch.Tensor], drafts: list[int],
                   gen: torch.Generator) -> tuple[int, int]:
    """Speculative sampling over a chain of drafts; p_rows (len(drafts) + 1, V) target
    distributions, q_rows the draft distributions the drafts were sampled from."""
    for j, d in enumerate(drafts):
        p, q = p_rows[j], q_rows[j]
        u = float(torch.rand((), generator=gen))
        if u * float(q[d]) < float(p[d]):  # u < p/q without dividing by a zero q
            continue
        residual = torch.clamp(p - q, min=0)  # (V,)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any sample of p is right
            residual = p
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
    return len(drafts), int(torch.multinomial(p_rows[len(drafts)], 1, generator=gen))


class ParallelDrafter:
    """Caches of the base model (trunk + head 1) and of the extra head layers, always the same
    length; drafts are the heads' predictions at the last committed position."""

    def __init__(self, model: MTPModel) -> None:
        from transformers import DynamicCache

        self.model = model
        self.base_cache = DynamicCache(config=model.config)
        self.head_cache = DynamicCache()
        self.length = 0
        self._head_logits: torch.Tensor | None = None  # (n-1, m, V) of the last forward
        self._last: torch.Tensor | None = None  # (n-1, V) at the last committed position

    def forward(self, tokens: list[int]) -> torch.Tensor:
        m = self.model
        ids = torch.tensor([tokens], device=next(m.parameters()).device)  # (1, m)
        z, ctx = m.trunk(ids, cache=self.base_cache)  # (1, m, d)
        hidden = [m.head_hidden(k, z, ctx, cache=self.base_cache if k == 1 else self.head_cache)
                  for k in range(1, m.n_heads + 1)]
        # Every head shares the final norm and unembedding: one matmul for all n * m rows reads
        # the (V, d) matrix once instead of n times (decoding small models is memory-bound).
        logits = m.logits(1, torch.cat(hidden, dim=0))  # (n, m, V)
        self._head_logits = logits[1:]
        return logits[0]

    def commit(self, keep: int) -> None:
        self.length += keep
        rollback(self.base_cache, self.length)
        rollback(self.head_cache, self.length)
        self._last = self._head_logits[:, keep - 1]

    def draft(self, next_token: int, k: int, pick: Pick) -> tuple[list[int], list[torch.Tensor | None]]:
        drafts, qs = [], []
        for j in range(k):  # head j + 2 predicts the token j + 1 places after next_token
            tok, q = pick(self._last[j])
            drafts.append(tok)
            qs.append(q)
        return drafts, qs


class SequentialDrafter:
    """Sequential (DeepSeek-V3) depths, each with its own cache. Depth j at position i reads
    h^{j-1}_i and token t_{i+j}, so its committed stream lags the main one by j positions:
    ``pending[j]`` holds committed h^{j-1} it has not consumed yet; positions whose token is
    still a draft are recomputed every step and cropped afterwards."""

    def __init__(self, model: MTPModel) -> None:
        from transformers import DynamicCache

        self.model = model
        D = model.n_heads - 1
        self.main_cache = DynamicCache(config=model.config)
        self.caches = [DynamicCache() for _ in range(D + 1)]  # index 1..D used
        self.pending: list[torch.Tensor | None] = [None] * (D + 1)  # (1, m, d) per depth
        self.done = [0] * (D + 1)  # committed length of each depth's cache
        self.seq: list[int] = []
        self._fed: list[int] = []
        self._h0: torch.Tensor | None = None

    def forward(self, tokens: list[int]) -> torch.Tensor:
        m = self.model
        ids = torch.tensor([tokens], device=next(m.parameters()).device)
        z, _ = m.trunk(ids, cache=self.main_cache)  # h^0 (1, m, d)
        self._fed, self._h0 = tokens, z
        return m.logits(1, z)[0]

    def commit(self, keep: int) -> None:
        self.seq += self._fed[:keep]
        rollback(self.main_cache, len(self.seq))
        self._append(1, self._h0[:, :keep])

    def _append(self, j: int, h: torch.Tensor) -> None:
        if j < len(self.caches):  # depth j exists (the deepest output feeds nothing)
            self.pending[j] = h if self.pending[j] is None else torch.cat([self.pending[j], h], dim=1)

    def draft(self, next_token: int, k: int, pick: Pick) -> tuple[list[int], list[torch.Tensor | None]]:
        m = self.model
        device = next(m.parameters()).device
        r = len(self.seq) - 1  # last position the main model has processed
        known = self.seq + [next_token]
        drafts: list[int] = []
        qs: list[torch.Tensor | None] = []
        tail: torch.Tensor | None = None
        for j in range(1, k + 1):
            start = self.done[j]
            parts = [t for t in (self.pending[j], tail) if t is not None and t.shape[1] > 0]
            hidden = torch.cat(parts, dim=1)  # h^{j-1} for positions start..r
            stream = known + drafts
            toks = torch.tensor([[stream[i + j] for i in range(start, r + 1)]], device=device)
            positions = torch.arange(start, r + 1, device=device)[None]
            ctx = m.context(hidden, positions, self.caches[j])
            out = m.heads[j - 1](hidden, m.embed(toks), ctx, self.caches[j])  # h^j (1, r+1-start, d)
            tok, q = pick(m.logits(j + 1, out[:, -1:])[0, -1])
            drafts.append(tok)
            qs.append(q)
            # Positions whose token t_{i+j} is committed (i <= r + 1 - j) stay; the rest is redone.
            n_commit = max(0, min(r + 2 - j, r + 1) - start)
            self._append(j + 1, out[:, :n_commit])
            tail = out[:, n_commit:]
            self.pending[j] = self.pending[j][:, n_commit:] if self.pending[j] is not None else None
            self.done[j] = start + n_commit
            rollback(self.caches[j], self.done[j])
        return drafts, qs


@dataclass
class Acceptance:
    proposed: list[int]  # per extra head: steps where it drafted
    accepted: list[int]  # per extra head: steps where its draft was in the accepted prefix
    steps: int = 0

    def record(self, n_drafts: int, n_accepted: int) -> None:
        self.steps += 1
        for j in range(n_drafts):
            self.proposed[j] += 1
            self.accepted[j] += int(j < n_accepted)

    def rates(self) -> dict[str, float]:
        return {f"head{k + 2}": a / p if p else 0.0
                for k, (a, p) in enumerate(zip(self.accepted, self.proposed))}

    def generation(self, tokens: list[int], passes: int, reason: str) -> Generation:
        return Generation(tokens, passes, reason, extras={
            "acceptance": self.rates(), "verify_steps": self.steps,
            "tokens_per_forward": len(tokens) / max(passes, 1)})


@dataclass
class Sampler:
    """Greedy picks and acceptance at temperature 0; speculative sampling above it, every
    draw from one ``torch.Generator`` in a fixed order (drafts, then verification)."""

    temperature: float
    top_p: float
    gen: torch.Generator
    suppress_ids: tuple[int, ...] = ()  # never chosen, by the drafts nor the base model

    @property
    def greedy(self) -> bool:
        return not self.temperature > 0

    def pick(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """A token from (V,) logits, and the distribution it was drawn from (None if greedy)."""
        logits = suppress(logits, self.suppress_ids)
        if self.greedy:
            return int(logits.argmax()), None
        q = distribution(logits.cpu(), self.temperature, self.top_p)
        return int(torch.multinomial(q, 1, generator=self.gen)), q

    def accept(self, base: torch.Tensor, drafts: list[int],
               qs: list[torch.Tensor | None]) -> tuple[int, int]:
        """(drafts accepted, next token) from the base model's (len(drafts) + 1, V) logits."""
        base = suppress(base, self.suppress_ids)
        if self.greedy:
            return accept_greedy(base, drafts)
        p_rows = torch.stack([distribution(row, self.temperature, self.top_p) for row in base.cpu()])
        return accept_sampled(p_rows, qs, drafts, self.gen)  # type: ignore[arg-type]


Drafter = ParallelDrafter | SequentialDrafter


def prefill(drafter: Drafter, prompt_ids: list[int], sampler: Sampler) -> int:
    """Run the prompt through the base model and every head; the first new token."""
    base = drafter.forward(list(prompt_ids))
    drafter.commit(len(prompt_ids))
    return sampler.pick(base[-1])[0]


def verify_step(drafter: Drafter, next_tok: int, n_drafts: int, sampler: Sampler,
                stats: Acceptance) -> tuple[list[int], int]:
    """Draft ``n_drafts`` tokens after ``next_tok``, verify them in one base-model pass and
    commit what is accepted: (accepted drafts, the token after them)."""
    drafts, qs = drafter.draft(next_tok, n_drafts, sampler.pick)
    base = drafter.forward([next_tok] + drafts)  # (len(drafts) + 1, V)
    a, after = sampler.accept(base, drafts, qs)
    drafter.commit(1 + a)
    stats.record(len(drafts), a)
    return drafts[:a], after


@torch.no_grad()
def speculative_generate(model: MTPModel, prompt_ids: list[int], *, max_new_tokens: int = 64,
                         temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                         stop_ids: tuple[int, ...] = (), max_drafts: int | None = None,
                         suppress_ids: tuple[int, ...] = ()) -> Generation:
    """Decode with drafts from the extra heads, verified by the base model. Greedy output is
    plain greedy decoding's; sampled output has the base model's distribution.
    ``max_drafts`` uses only the first heads (Gloeckle Table S2's "heads used");
    ``suppress_ids`` as in plain decoding (``generate.suppress``), so outputs stay equal."""
    was_training = model.training
    model.eval()
    sampler = Sampler(temperature, top_p, torch.Generator(device="cpu").manual_seed(seed),
                      suppress_ids)
    drafter = ParallelDrafter(model) if model.spec.head_design == "parallel" else SequentialDrafter(model)
    n_drafts = model.n_heads - 1 if max_drafts is None else max(0, min(max_drafts, model.n_heads - 1))
    stats = Acceptance(proposed=[0] * n_drafts, accepted=[0] * n_drafts)
    out: list[int] = []
    try:
        next_tok, passes = prefill(drafter, prompt_ids, sampler), 1
        while len(out) < max_new_tokens:
            out.append(next_tok)
            if next_tok in stop_ids:
                return stats.generation(out, passes, "eos")
            budget = max_new_tokens - len(out)
            if budget == 0:
                break
            accepted, next_tok = verify_step(drafter, next_tok, min(n_drafts, budget), sampler, stats)
            passes += 1
            for d in accepted:
                out.append(d)
                if d in stop_ids:
                    return stats.generation(out, passes, "eos")
        return stats.generation(out, passes, "length")
    finally:
        model.train(was_training)


def speculative_text(loaded, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,  # noqa: ANN001
                     top_p: float = 1.0, seed: int = 0) -> dict:
    """``lmobj generate --speculative`` on a loaded run (``infer.load.Loaded``); the caller,
    ``infer.api.generate_text``, has checked the sampling options."""
    from lmobjectives.errors import UserError
    from lmobjectives.infer.prompts import free_text_suppressed, generation_result, prompt_ids

    if not isinstance(loaded.model, MTPModel):
        raise UserError(f"{loaded.path} has no multi-token-prediction heads (no mtp_heads.json); "
                        "--speculative needs a model trained with --objective mtp")
    ids = prompt_ids(loaded, prompt)
    g = speculative_generate(loaded.model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed, stop_ids=(loaded.specials.eos,),
                             suppress_ids=free_text_suppressed(loaded.specials))
    return {**generation_result(loaded, g),
            "acceptance_per_head": g.extras["acceptance"],
            "tokens_per_forward": g.extras["tokens_per_forward"],
            "verify_steps": g.extras["verify_steps"]}
