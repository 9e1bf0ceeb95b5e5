"""The train module of multi-token prediction: one loss term per head, and a backward pass
that never holds more than one head's logits.

Loss: ``sum_k w_k * NLL_k / N_k``, where NLL_k sums head k's negative log-likelihood over
its valid targets and N_k counts them in the whole optimizer step — each depth normalised by
its own count, since deeper heads lose k - 1 targets at every document end
(``objectives.mtp.depth_targets``).

Memory (Gloeckle et al. 2024 §2, Fig. 2; App. B Fig. S11): logits are (B, T, V) per head, so
computing all n heads and calling one backward holds n of them (plus their gradients).
Instead the trunk runs once, its output z is detached, and each head runs forward *and*
backward on its own, accumulating ∂L/∂z; the trunk then backpropagates once with that
gradient. Peak memory goes from O(nV + d) to O(V + d) per token, at the price of n small
backward calls instead of one. For the sequential design the chain h^0 → h^1 → ... is built
first without a graph, then walked from the deepest head back: each depth's block is run
again with its graph, and its own loss gradient is added to the one flowing back from the
depths after it (Fig. S11). That costs one extra forward of each depth's block (not of the
trunk) and keeps one depth's activations alive instead of n − 1.

Worked example (parallel, n = 2): z = trunk(x); z' = z.detach() with grad; loss_1(head_1(z'))
.backward() frees head 1's logits and leaves g_1 in z'.grad; loss_2(head_2(z')).backward()
adds g_2; z.backward(g_1 + g_2) — the same gradients as (loss_1 + loss_2).backward(), which
``strategy="naive"`` computes for comparison (tests check they agree).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lmobjectives.data.converters import IGNORE
from lmobjectives.errors import UserError
from lmobjectives.loss import chunked_nll_sum, resolve_chunks, token_nll_sum
from lmobjectives.models.presets import DECODER_PRESETS, check_preset
from lmobjectives.models.init import materialise
from lmobjectives.models.mtp import (HEAD_SEED_OFFSET, MTPModel, MTPSpec, init_heads, load_heads,
                                    read_heads_spec)
from lmobjectives.objectives.mtp import MTP, depth_targets
from lmobjectives.rundir import init_dir
from lmobjectives.runtime import autocast


def depth_labels(labels: torch.Tensor, position_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Torch twin of ``objectives.mtp.depth_targets`` on an HF batch: (B, T) targets of head k
    aligned to the position that predicts them, ``IGNORE`` across documents and at row ends."""
    out = torch.full_like(labels, IGNORE)
    if k >= labels.shape[1]:
        return out
    same_doc = position_ids[:, k:] == position_ids[:, :-k] + k  # (B, T-k)
    ahead = labels[:, k:]  # (B, T-k)
    out[:, :-k] = torch.where(same_doc & (ahead != IGNORE), ahead, torch.full_like(ahead, IGNORE))
    return out


def shift_tokens(input_ids: torch.Tensor, j: int, pad: int) -> torch.Tensor:
    """Tokens j places ahead, PAD past the row end: (B, T). Whatever a sequential depth reads
    across a document boundary only feeds positions whose targets are ignored."""
    out = torch.full_like(input_ids, pad)
    out[:, :-j] = input_ids[:, j:]
    return out


def head_names(n_heads: int) -> tuple[str, ...]:
    return ("loss",) + tuple(f"depth{k}" for k in range(2, n_heads + 1))


class MTPModule:
    """TrainModule for ``MTPModel``: terms ``loss`` (head 1, the next-token loss reported as
    the run's loss), ``depth2`` ... ``depthN``."""

    # It calls the model's parts, not its forward: DDP's hooks would not fire, so data
    # parallelism sums the gradients itself (``train/summed_gradients.py``); under FSDP the
    # blocks' own hooks fire and the root's parameters are gathered here (``root_gathered``).
    calls_model_parts = True

    def __init__(self, model: MTPModel, objective: MTP, bf16: bool = False, strategy: str = "sequential",
                 loss_chunks: int | str = 1) -> None:
        if strategy not in ("sequential", "naive"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.model = model
        self.loss_chunks = loss_chunks
        self.objective = objective
        self.bf16 = bf16
        self.strategy = strategy
        self.terms = head_names(model.n_heads)
        self.progress = 0.0
        self._last_backward: Callable[[], None] = lambda: None  # set per micro-batch by root_gathered

    def begin_step(self, step: int, total_steps: int) -> None:
        """The loop says where training is, for a scheduled loss weight."""
        self.progress = step / max(total_steps, 1)

    @property
    def weights(self) -> tuple[float, ...]:
        return self.objective.loss_weights(self.progress)

    def counts(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        labels, positions = batch["labels"], batch["position_ids"]
        return np.array([(depth_targets(labels, labels != IGNORE, positions, k) != IGNORE).sum()
                         for k in range(1, self.model.n_heads + 1)], dtype=np.int64)

    # ------------------------------------------------------------------ the step
    def forward_backward(self, batch: dict[str, torch.Tensor], totals: torch.Tensor,
                         backward: bool = True) -> dict[str, torch.Tensor]:
        with root_gathered(self.model) as self._last_backward:
            if self.strategy == "naive":
                return self._naive(batch, totals, backward)
            if self.model.spec.head_design == "parallel":
                return self._parallel(batch, totals, backward)
            return self._sequential(batch, totals, backward)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _score(self, k: int, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.model.lm.lm_head
        chunks = resolve_chunks(self.loss_chunks, labels.numel(), head.out_features)
        with autocast(self._device(), self.bf16):
            if chunks > 1:  # head k's logits never held whole either
                x = self.model.projection_input(k, hidden)  # (B, T, d)
                return chunked_nll_sum(x, head.weight, head.bias, labels, False, chunks)
            logits = self.model.logits(k, hidden)  # (B, T, V)
        nll, correct, _ = token_nll_sum(logits, labels, shift=False)
        return nll, correct

    def _scale(self, k: int, totals: torch.Tensor) -> float | torch.Tensor:
        return self.weights[k - 1] / totals[k - 1].clamp(min=1)

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batch["input_ids"], batch["position_ids"], batch["labels"]

    def _parallel(self, batch, totals, backward):  # noqa: ANN001, ANN202
        ids, pos, labels = self._inputs(batch)
        n = self.model.n_heads
        with autocast(self._device(), self.bf16):
            z, ctx = self.model.trunk(ids, pos)  # (B, T, d)
        z_in = z.detach().requires_grad_(True) if backward else z
        nll, correct = [], []
        for k in range(1, n + 1):
            with autocast(self._device(), self.bf16):
                h = self.model.head_hidden(k, z_in, ctx)  # (B, T, d)
            s, c = self._score(k, h, depth_labels(labels, pos, k))
            if backward and self.weights[k - 1] > 0:
                (s * self._scale(k, totals)).backward()  # frees head k's logits now
            nll.append(s.detach())
            correct.append(c.detach())
        if backward and z_in.grad is not None:
            self._last_backward()
            z.backward(z_in.grad)
        return {"nll": torch.stack(nll), "correct": torch.stack(correct)}

    def _sequential(self, batch, totals, backward):  # noqa: ANN001, ANN202
        ids, pos, labels = self._inputs(batch)
        n, pad = self.model.n_heads, self.model.config.pad_token_id or 0
        device = self._device()
        with autocast(device, self.bf16):
            z, ctx = self.model.trunk(ids, pos)  # h^0: (B, T, d)
        tokens = [None, None] + [shift_tokens(ids, k - 1, pad) for k in range(2, n + 1)]
        # The chain h^1 .. h^{n-1} without a graph: each depth's block is run again, with its
        # graph, when the walk back reaches it (activation recomputation), so at most one
        # depth's activations and one head's logits are alive at a time.
        hidden = [z]
        with torch.no_grad(), autocast(device, self.bf16):
            for k in range(2, n + 1):
                hidden.append(self.model.head_hidden(k, hidden[-1].detach(), ctx, tokens=tokens[k]))
        nll: list[Any] = [None] * n
        correct: list[Any] = [None] * n
        grad_from_deeper = None  # dL/dh^{k-1} from depths k and deeper
        for k in range(n, 0, -1):  # deepest head first (Gloeckle Fig. S11)
            if k >= 2 and backward:
                x = hidden[k - 2].detach().requires_grad_(True)
                with autocast(device, self.bf16):
                    h = self.model.head_hidden(k, x, ctx, tokens=tokens[k])  # (B, T, d), with graph
            else:
                x, h = None, hidden[k - 1]
            h_in = h.detach().requires_grad_(True) if backward else h
            s, c = self._score(k, h_in, depth_labels(labels, pos, k))
            nll[k - 1], correct[k - 1] = s.detach(), c.detach()
            if not backward:
                continue
            if self.weights[k - 1] > 0:
                (s * self._scale(k, totals)).backward()  # frees head k's logits now
            grads = [g for g in (h_in.grad, grad_from_deeper) if g is not None]
            if grads:
                if k == 1:
                    self._last_backward()
                h.backward(grads[0] if len(grads) == 1 else grads[0] + grads[1])  # depth k's block, or the trunk
            grad_from_deeper = x.grad if x is not None else None
        return {"nll": torch.stack(nll), "correct": torch.stack(correct)}

    def _naive(self, batch, totals, backward):  # noqa: ANN001, ANN202
        """Every head's logits alive at once and one backward: the reference for tests and the
        memory benchmark."""
        ids, pos, labels = self._inputs(batch)
        n, pad = self.model.n_heads, self.model.config.pad_token_id or 0
        sequential = self.model.spec.head_design == "sequential"
        with autocast(self._device(), self.bf16):
            z, ctx = self.model.trunk(ids, pos)
        total = z.new_zeros((), dtype=torch.float32)
        nll, correct, prev = [], [], z
        for k in range(1, n + 1):
            with autocast(self._device(), self.bf16):
                tokens = shift_tokens(ids, k - 1, pad) if sequential and k > 1 else None
                h = self.model.head_hidden(k, prev if sequential else z, ctx, tokens=tokens)
            prev = h
            s, c = self._score(k, h, depth_labels(labels, pos, k))
            total = total + s * self._scale(k, totals)
            nll.append(s.detach())
            correct.append(c.detach())
        if backward:
            self._last_backward()
            total.backward()
        return {"nll": torch.stack(nll), "correct": torch.stack(correct)}


@contextlib.contextmanager
def root_gathered(model: torch.nn.Module) -> Iterator[Callable[[], None]]:
    """Under FSDP2, the root's own parameters (embedding = tied output head, final norm) whole
    for the length of one micro-batch; nothing otherwise. Yields a function to call just
    before the micro-batch's last backward.

    The step calls the model's parts, never the root's forward, so the root's hooks that
    would all-gather those parameters never run. Every block is an FSDP unit of its own
    (``models.init.repeated_blocks``: trunk layers and the heads' layers), whose hooks gather
    and free it around each call and its backward, as in a plain forward. The root is
    gathered here once and kept whole across the per-head backward calls
    (``reshard_after_backward`` off); its gradients accumulate unsharded (gradient sync off)
    until the last backward, after which FSDP's end-of-backward callback reduce-scatters them
    once, as after one plain backward."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not isinstance(model, FSDPModule):
        yield lambda: None
        return
    # What the root's first forward does: claim the nested units, so that their forwards do
    # not each set up as a root (private in torch 2.13; tests cover it).
    fully_shard.state(model)._lazy_init()
    model.set_reshard_after_backward(False, recurse=False)
    model.set_requires_gradient_sync(False, recurse=False)
    model.unshard()
    try:
        yield lambda: model.set_requires_gradient_sync(True, recurse=False)
    finally:
        model.reshard()
        model.set_requires_gradient_sync(True, recurse=False)
        model.set_reshard_after_backward(True, recurse=False)


# ---------------------------------------------------------------------- building
def base_overrides(objective: MTP, preset: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Config overrides of the wrapped model: with ``compute_matched`` the trunk is one layer
    shorter per extra head, so the total matches the next-token model (Gloeckle §3)."""
    if not objective.compute_matched or objective.n_heads == 1:
        return overrides
    check_preset(preset, "decoder")
    layers = int(overrides.get("num_hidden_layers", DECODER_PRESETS[preset][1]))
    base = layers - (objective.n_heads - 1)
    # Parallel: the base holds the trunk and head 1, so it needs 2 layers for a 1-layer trunk.
    need = 2 if objective.head_design == "parallel" else 1
    if base < need:
        raise UserError(f"compute_matched with n_heads={objective.n_heads} needs a model of at least "
                        f"{need + objective.n_heads - 1} layers; this one has {layers} "
                        "(choose a larger preset or fewer heads)")
    return {**overrides, "num_hidden_layers": base}


def wrap_model(lm: torch.nn.Module, objective: MTP, seed: int, init_from: str | None = None) -> MTPModel:
    """Add the objective's heads to ``lm``. From ``init_from``: its own heads when it has
    matching ones, else heads that start as copies of its last layer. A backbone on the meta
    device gets meta heads, which ``models.init.materialise`` initialises with it (FSDP)."""
    spec = MTPSpec(n_heads=objective.n_heads, head_design=objective.head_design)
    if init_from is not None:
        if objective.compute_matched:
            raise UserError("compute_matched removes trunk layers of a model built from a preset; "
                            "it cannot apply to --init-from")
        src = init_dir(init_from)
        if read_heads_spec(src) == spec:
            return load_heads(lm, src, spec)
        model = MTPModel(lm, spec)
        init_heads(model, seed + HEAD_SEED_OFFSET, copy_last_layer=True)
        return model
    device = next(lm.parameters()).device
    with torch.device("meta"):  # the heads' values come from materialise, as on every layout
        model = MTPModel(lm, spec)
    if device.type != "meta":
        materialise(model, seed, device)
    return model
