"""A small family of model shapes for sizing a model to a time budget, and the rule that
picks one.

Each shape fixes width, depth, heads, feed-forward width and a row length; the vocabulary is
whatever the tokenizer has. Shapes are named ``d<width>-l<layers>`` and are valid presets for
every architecture (an encoder-decoder splits the layers over its two stacks). The peak
learning rate is 3e-3 (the ``small`` preset's tested value) up to width 384 and scales as
384/width beyond it (with Adam the stable step of hidden matrices shrinks roughly as 1/width:
Yang et al. 2022, "Tensor Programs V", μP). Narrower models did not gain from a higher peak
here: ``d128-l4`` on the default corpus (FIM, 8 x 128 tokens a step, WSD) reached held-out
2.17 bits/byte after 0.5 M tokens at 3e-3 and 2.55 at 9e-3; with 24 rows a step and 9e-3,
2.42 after 1 M tokens (measured, 1 thread).

The rule (``predicted_loss``) is the parametric fit of Hoffmann et al. 2022 ("Training
Compute-Optimal Large Language Models", §3.3, eq. 10, Approach 3):

    L(N, D) = E + A / N^alpha + B / D^beta,  E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28

with N the parameter count and D the tokens the budget buys at the *measured* throughput of
that shape on this machine. At large scale its minimum sits near 20 tokens per parameter for
a fixed FLOP count; on a CPU small models run far below the matmul peak, so measuring tokens/s
per shape (instead of assuming FLOPs) is what moves the choice to the right size. Worked
example (240 s of training): a 0.6 M shape at 9 K tokens/s (D = 2.2 M) predicts 13.0, a
2.1 M shape at 5 K tokens/s (D = 1.2 M) 12.7, a 3.9 M shape at 2.5 K tokens/s (D = 0.6 M)
13.9: the 2.1 M shape wins.
"""

from __future__ import annotations

from dataclasses import dataclass

# Hoffmann et al. 2022, §3.3 eq. (10): the fitted parametric loss (Approach 3).
CHINCHILLA_E, CHINCHILLA_A, CHINCHILLA_B = 1.69, 406.4, 410.7
CHINCHILLA_ALPHA, CHINCHILLA_BETA = 0.34, 0.28
# Hoffmann et al. 2022, Table 3: compute-optimal models see about 20 tokens per parameter.
TOKENS_PER_PARAMETER = 20

LR_AT_384 = 3e-3  # the `small` preset's peak learning rate (width 384)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    ff: int
    seq_len: int  # row length: short rows for small models (more rows, same tokens per step)
    batch_size: int  # rows per micro-batch

    @property
    def lr(self) -> float:
        """Peak learning rate: 3e-3, times 384/width above width 384 (see the module docstring)."""
        return LR_AT_384 * min(1.0, 384 / self.hidden)

    def parameters(self, vocab: int) -> int:
        """Llama-style decoder with tied embeddings: embeddings + per layer attention (4 d^2)
        and a gated MLP (3 d ff) + norms."""
        d = self.hidden
        return vocab * d + self.layers * (4 * d * d + 3 * d * self.ff + 2 * d) + d


def _shape(hidden: int, layers: int, seq_len: int, batch_size: int) -> Shape:
    heads = max(hidden // 64, 2) if hidden >= 128 else 2  # head width 32-64
    return Shape(f"d{hidden}-l{layers}", hidden, layers, heads, 4 * hidden, seq_len, batch_size)


# Smallest first: calibration measures them in this order and stops at the first that is too
# slow for its time box. Rows of 128 tokens up to width 192, 256 beyond. Small models take
# small steps of 1 K tokens: a short budget buys few tokens, and more optimizer steps on them
# learned more (see the module docstring: 8 rows a step beat 24).
SHAPES: dict[str, Shape] = {s.name: s for s in (
    _shape(64, 2, 128, 8),
    _shape(96, 3, 128, 8),
    _shape(128, 4, 128, 8),
    _shape(192, 4, 128, 8),
    _shape(256, 6, 256, 12),
    _shape(384, 8, 256, 8),
    _shape(512, 8, 256, 8),
    _shape(768, 12, 256, 8),
)}


def predicted_loss(parameters: int, tokens: float) -> float:
    """Hoffmann et al. 2022 eq. (10): loss of ``parameters`` trained on ``tokens``."""
    if tokens <= 0:
        return float("inf")
    return (CHINCHILLA_E + CHINCHILLA_A / parameters ** CHINCHILLA_ALPHA
            + CHINCHILLA_B / tokens ** CHINCHILLA_BETA)


def choose_shape(measured: list[dict], seconds: float) -> dict:
    """The candidate (``{"shape", "parameters", "tokens_per_second"}``) with the lowest
    predicted loss for ``seconds`` of training; adds ``planned_tokens`` and ``predicted_loss``
    to every candidate."""
    if not measured:
        raise ValueError("no candidate was measured")
    for c in measured:
        c["planned_tokens"] = int(c["tokens_per_second"] * seconds)
        c["predicted_loss"] = round(predicted_loss(c["parameters"], c["planned_tokens"]), 4)
    return min(measured, key=lambda c: c["predicted_loss"])
