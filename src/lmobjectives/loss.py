"""Token cross-entropy outside the model, as a *sum* over scored tokens.

The train loop divides by the number of scored tokens in the whole optimizer step (every
micro-batch, every rank), so gradient accumulation and data parallelism give the same update
as one big batch (the torchtitan rule). Computing in float32 keeps the sum exact enough for
bit-identical resumes whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmobjectives.objectives.base import IGNORE


def aligned_labels(labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Labels aligned with the logits: with ``shift`` (decoders, HF convention) position t's
    logits score ``labels[t + 1]``; the last position scores nothing. Shifting the labels
    rather than slicing the logits keeps the (B, T, V) logits contiguous: no copy."""
    if not shift:
        return labels
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (N,) of ``x`` (B, T, ...) taken as (B·T, ...) rows: (N, ...)."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, index)


def scored_targets(labels: torch.Tensor, shift: bool, index: torch.Tensor,
                   weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Aligned labels (and weights) of the logits rows ``index`` (N,): (N,) each."""
    target = aligned_labels(labels, shift).reshape(-1).index_select(0, index)
    if weights is None:
        return target, None
    return target, aligned_labels_weights(weights, shift).reshape(-1).index_select(0, index)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool,
                  weights: torch.Tensor | None = None,
                  suppressed: tuple[int, ...] = (),
                  index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of weighted negative log-likelihoods, correct top-1 predictions, predicted tokens)
    over scored tokens. ``weights`` (B, T), aligned with ``labels``, multiply each token's
    loss; a token of weight 0 is scored (the caller's denominator counts it) but adds nothing
    and is not predicted (masked diffusion: an unmasked token carries itself over).
    ``suppressed`` ids get logit −∞ (never predicted). ``index`` (N,), the batch's
    ``scored_index``, limits the softmax to those rows of ``logits`` (sparse targets); without
    it every row is computed and unscored ones add nothing. Labels and weights may also come
    already aligned and flat, (N,), with ``shift`` False. Nothing here reads a device tensor
    on the host: no synchronisation."""
    if index is not None:
        labels, weights = scored_targets(labels, shift, index, weights)  # (N,), (N,)
        logits, shift = gather_rows(logits, index), False  # (N, V)
    V = logits.shape[-1]
    target = aligned_labels(labels, shift).reshape(-1)  # (B*T,)
    flat = logits.reshape(-1, V)  # (B*T, V), a view
    keep = target != IGNORE
    w = None
    if weights is not None:
        w = aligned_labels_weights(weights, shift).reshape(-1)  # (B*T,)
        keep = keep & (w != 0)
    flat = flat.float()
    if suppressed:
        flat = flat.index_fill(-1, torch.as_tensor(suppressed, device=flat.device), float("-inf"))
    if w is None:
        nll = F.cross_entropy(flat, target, ignore_index=IGNORE, reduction="sum")
    else:
        per_token = F.cross_entropy(flat, torch.where(keep, target, 0), reduction="none")  # (N,)
        nll = torch.where(keep, per_token * w.float(), 0.0).sum()
    return nll, top1_correct(flat.detach(), target, keep), keep.sum()


def aligned_labels_weights(weights: torch.Tensor, shift: bool) -> torch.Tensor:
    """Loss weights shifted like ``aligned_labels`` (0 where the last position scores nothing)."""
    if not shift:
        return weights
    return F.pad(weights[:, 1:], (0, 1), value=0.0)  # (B, T)


def top1_correct(flat: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Scored rows whose target logit is the largest. Comparing with ``amax`` instead of
    taking ``argmax``: on CPU ``argmax`` over (N, V) is an unvectorised pass as costly as a
    third of the cross-entropy (0.10 s vs 0.003 s for 2,048 x 8,192, one thread, measured),
    ``amax`` a vectorised reduction. A tie for the maximum counts as correct."""
    safe = torch.where(keep, target, 0)  # (N,), ignored rows point at any valid id
    hit = flat.gather(1, safe[:, None]).squeeze(1) >= flat.amax(-1)  # (N,)
    return (hit & keep).sum()


# ---------------------------------------------------------------------- chunked linear CE
# Budget of one chunk's fp32 logits. ``auto`` keeps the one-piece path while the whole (B·T, V)
# block fits in it (the default job: 8 x 256 rows x 8,192 ids = 64 MiB), and chunks beyond.
CHUNK_LOGITS_BYTES = 128 * 2**20


def resolve_chunks(setting: int | str, rows: int, vocab: int) -> int:
    """Number of row chunks for ``rows`` positions scored against ``vocab`` ids."""
    if setting == "auto":
        return max(1, -(-rows * vocab * 4 // CHUNK_LOGITS_BYTES))
    return max(1, min(int(setting), rows))


def chunked_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    labels: torch.Tensor, shift: bool, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_nll_sum`` of ``F.linear(hidden, weight, bias)`` without (B·T, V) logits.

    ``hidden`` (B, T, d) is the output projection's input. The same rows are scored as in
    ``token_nll_sum``, so the two agree to rounding; sparse targets are the caller's to gather
    first (``gather_rows``, ``scored_targets``), as no row count is read here."""
    target = aligned_labels(labels, shift).reshape(-1)  # (B*T,)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, d)
    need_grad = torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(flat, weight, bias, target, chunks, need_grad)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a linear projection, chunk by chunk over rows, with the
    gradients computed during the forward (Liger's fused linear cross-entropy, in PyTorch).

    Each chunk's logits z = h W^T + b are formed in fp32, give the loss and
    ∂(Σ nll)/∂z = softmax(z) − onehot(target) (zero on ignored rows), which is turned into
    ∂/∂h and ∂/∂W at once and dropped. Backward only scales those by the incoming scalar.
    Peak memory: one chunk's logits plus ∂/∂W (V, d) and ∂/∂h (N, d), instead of the full
    (N, V) logits, their log-softmax and their gradient; compute: the same three matmuls."""

    @staticmethod
    def forward(ctx, flat, weight, bias, target, chunks, need_grad):  # noqa: ANN001, ANN205
        grad_h = torch.zeros_like(flat) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                  if need_grad and bias is not None else None)
        nll = torch.zeros((), dtype=torch.float32, device=flat.device)
        correct = torch.zeros((), dtype=torch.int64, device=flat.device)
        step = -(-flat.shape[0] // chunks) if flat.shape[0] else 1
        for lo in range(0, flat.shape[0], step):
            h, t = flat[lo:lo + step], target[lo:lo + step]  # (n, d), (n,)
            z = F.linear(h, weight, bias).float()  # (n, V): the autocast dtype's matmul, as today
            valid = t != IGNORE
            lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
            # nll = lse - z[t]: one pass over z for the loss and the gradient alike.
            nll += ((lse[:, 0] - z.gather(1, t.clamp(min=0)[:, None])[:, 0]) * valid).sum()
            correct += ((z.argmax(-1) == t) & valid).sum()
            if not need_grad:
                continue
            # softmax(z) - onehot(t), in place in z's buffer; zero on ignored rows.
            dz = z.sub_(lse).exp_()  # (n, V)
            dz.scatter_add_(1, t.clamp(min=0)[:, None], -valid[:, None].to(dz.dtype))
            dz.mul_(valid[:, None])
            # Under autocast these matmuls run in its dtype, as the one-piece path's backward.
            grad_h[lo:lo + step] = (dz.to(weight.dtype) @ weight).to(flat.dtype)  # (n, d)
            grad_w += (dz.t().to(h.dtype) @ h).float()  # (V, d)
            if grad_b is not None:
                grad_b += dz.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return nll, correct

    @staticmethod
    def backward(ctx, g_nll, _g_correct):  # noqa: ANN001, ANN205
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("chunked_nll_sum ran without gradients (no_grad or frozen inputs)")
        gw = (grad_w * g_nll).to(ctx.dtypes[0])
        gb = None if grad_b is None else (grad_b * g_nll).to(ctx.dtypes[1])
        return grad_h * g_nll.to(grad_h.dtype), gw, gb, None, None, None
