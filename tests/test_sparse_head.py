"""Sparse prediction: with fewer than half the positions scored, the output head sees only the
scored rows (gathered by the host-computed ``scored_index``), with the loss, accuracy and
gradients of the full-logits path; and the micro-batch path never reads a device tensor."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmobjectives
from lmobjectives.data.converters import (CAUSAL_SHIFT, IGNORE, SCORED_INDEX, convert_for_loss,
                                          scored_index)
from lmobjectives.models.presets import build_model
from lmobjectives.objectives import build_objective
from lmobjectives.objectives.base import Features, Rows
from lmobjectives.runtime import to_torch
from lmobjectives.step import StandardModule

CPU = torch.device("cpu")


def features(specials, objective: str, seed: int, B: int = 3, seq_len: int = 32) -> Features:  # noqa: ANN001
    obj = build_objective(objective, {}, specials)
    rng = np.random.default_rng(seed)
    rows = Rows.from_tokens(rng.integers(200, specials.vocab_size, size=(B, obj.row_length(seq_len))),
                            specials.eos)
    return obj(rows, np.random.default_rng([seed, 1]))


def padded_targets(f: Features, specials, factor: int = 3) -> Features:  # noqa: ANN001
    """Seq2seq features whose decoder side is padded to ``factor`` times its length (a batch
    padded to a fixed decoder length): most decoder positions score nothing."""
    B, T = f.targets.shape
    targets = np.full((B, T * factor), specials.pad, dtype=f.targets.dtype)
    targets[:, :T] = f.targets
    mask = np.zeros(targets.shape, dtype=bool)
    mask[:, :T] = f.target_mask
    return Features(targets=targets, target_mask=mask, inputs=f.inputs, input_lengths=f.input_lengths,
                    target_lengths=f.target_lengths)


def sparse_batch(specials, objective: str, architecture: str) -> dict[str, np.ndarray]:  # noqa: ANN001
    """The first seed whose batch takes the sparse path (diffusion's masked share varies)."""
    for seed in range(20):
        f = features(specials, objective, seed)
        if objective == "span" and architecture == "encoder_decoder":
            f = padded_targets(f, specials)
        batch = convert_for_loss(architecture, f, specials)
        if 0 < len(batch[SCORED_INDEX]) * 2 < batch["labels"].size:
            return batch
    raise AssertionError(f"no sparse {objective} batch in 20 seeds")


def head_rows(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """A list that records the number of rows (positions) of every call of the output head."""
    rows: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: rows.append(args[0].numel() // args[0].shape[-1]))
    return rows, handle


def run(module: StandardModule, batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
    module.model.zero_grad(set_to_none=True)
    totals = torch.as_tensor(module.counts(batch), dtype=torch.float32)
    out = module.forward_backward(to_torch(batch, CPU), totals)
    return out, {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


CASES = {  # name: (objective, architecture, module options)
    "mlm": ("mlm", "encoder", {}),
    "mlm-chunked": ("mlm", "encoder", {"loss_chunks": 3}),
    "mlm-suppressed": ("mlm", "encoder", {"suppressed": "mask"}),
    "span-encoder-decoder": ("span", "encoder_decoder", {}),
    "span-decoder": ("span", "prefix_lm", {}),
    "diffusion-weighted": ("mdlm", "encoder", {"suppressed": "mask"}),
}


@pytest.mark.parametrize("case", CASES)
def test_sparse_head_equals_full_logits(specials, case, monkeypatch):
    import lmobjectives.step.standard as standard

    chunked_rows = []  # rows the chunked kernel sees (it reads the head's weight, not the module)
    real = standard.chunked_nll_sum
    monkeypatch.setattr(standard, "chunked_nll_sum", lambda h, *a: chunked_rows.append(
        h.numel() // h.shape[-1]) or real(h, *a))
    objective, architecture, options = CASES[case]
    if "suppressed" in options:
        options = {**options, "suppressed": (specials.mask,)}
    model = build_model("tiny", architecture, specials, max_positions=256, seed=0)
    module = StandardModule(model, architecture, **options)
    batch = sparse_batch(specials, objective, architecture)
    rows, hook = head_rows(model)
    full_out, full = run(module, {k: v for k, v in batch.items() if k != SCORED_INDEX})
    out, got = run(module, batch)
    hook.remove()
    n_rows, n_scored = batch["labels"].size, len(batch[SCORED_INDEX])
    if "loss_chunks" in options:
        assert rows == [] and chunked_rows == [n_rows, n_scored]
    else:
        assert rows == [n_rows, n_scored]  # the full head, then the scored rows only
    torch.testing.assert_close(out["nll"], full_out["nll"], rtol=1e-5, atol=0)
    assert torch.equal(out["correct"], full_out["correct"])
    assert torch.equal(out["predicted"], full_out["predicted"])
    assert got.keys() == full.keys() and len(full) == len(list(model.parameters()))
    for name, g in full.items():
        atol = 1e-6 * float(g.abs().max())  # elements near zero: rounding relative to the tensor
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=atol, msg=name)


def test_mlm_head_sees_only_the_masked_rows(specials):
    """Fails if the vocabulary head runs over every position of an MLM batch."""
    model = build_model("tiny", "encoder", specials, max_positions=256, seed=0)
    batch = convert_for_loss("encoder", features(specials, "mlm", 0, B=4, seq_len=128), specials)
    rows, _ = head_rows(model)
    run(StandardModule(model, "encoder"), batch)
    scored = int((batch["labels"] != IGNORE).sum())
    assert rows == [scored] and scored < 0.25 * batch["labels"].size


def test_scored_index_on_literal_labels():
    labels = np.array([[5, IGNORE, 6, 7], [IGNORE, IGNORE, 8, IGNORE]])
    assert scored_index(labels, shift=False).tolist() == [0, 2, 3, 6]
    assert scored_index(labels, shift=True).tolist() == [1, 2, 5]  # row t scores labels[t + 1]
    weights = np.array([[1.0, 0, 0, 2.0], [0, 0, 3.0, 0]], dtype=np.float32)
    assert scored_index(labels, shift=False, weights=weights).tolist() == [0, 3, 6]  # weight 0: out
    assert scored_index(np.full((2, 3), IGNORE), shift=False).shape == (0,)


@pytest.mark.parametrize("architecture", sorted(CAUSAL_SHIFT))
def test_convert_for_loss_indexes_the_aligned_scored_labels(specials, architecture):
    objective = {"decoder": "clm", "prefix_lm": "prefix", "encoder": "mlm",
                 "encoder_decoder": "span", "bidirectional_decoder": "mdlm"}[architecture]
    batch = convert_for_loss(architecture, features(specials, objective, 0), specials)
    labels = batch["labels"]
    aligned = np.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE) \
        if CAUSAL_SHIFT[architecture] else labels
    scored = aligned != IGNORE
    if "loss_weights" in batch:
        w = batch["loss_weights"]
        scored &= (np.pad(w[:, 1:], ((0, 0), (0, 1))) if CAUSAL_SHIFT[architecture] else w) != 0
    assert batch[SCORED_INDEX].tolist() == np.flatnonzero(scored).tolist()


# ---------------------------------------------------------------------- no host sync
LIBRARY = str(Path(lmobjectives.__file__).parent)
SYNCING = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "any", "all")


class HostSync(AssertionError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    """Every Tensor method that reads a value on the host (or, as boolean-mask indexing and
    ``nonzero`` do, sizes its output by one) raises when the library calls it. On CUDA each
    of these waits for the device; on CPU they are free, so they are caught by who calls."""

    def guard(real):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if sys._getframe(1).f_code.co_filename.startswith(LIBRARY):
                raise HostSync(f"{real.__name__} called from {sys._getframe(1).f_code.co_filename}")
            return real(*args, **kwargs)
        return wrapped

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, guard(getattr(torch.Tensor, name)))
    for name in ("nonzero", "masked_select", "unique"):
        monkeypatch.setattr(torch, name, guard(getattr(torch, name)))
    real_getitem = torch.Tensor.__getitem__

    def getitem(self, index):  # noqa: ANN001, ANN202
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts) and \
                sys._getframe(1).f_code.co_filename.startswith(LIBRARY):
            raise HostSync("boolean-mask indexing")
        return real_getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)


def test_the_sync_detector_catches_a_host_read(no_host_sync):
    """The detector can fail: the old ``int(keep.sum())`` of loss.py, run as library code."""
    keep = torch.ones(4, dtype=torch.bool)
    library_line = compile("int(keep.sum())", str(Path(LIBRARY) / "loss.py"), "eval")
    with pytest.raises(HostSync):
        eval(library_line, {"keep": keep})
    with pytest.raises(HostSync):
        eval(compile("torch.zeros(4)[keep]", str(Path(LIBRARY) / "loss.py"), "eval"),
             {"keep": keep, "torch": torch})


@pytest.mark.parametrize("objective,architecture,chunks", [
    ("mlm", "encoder", 1), ("mlm", "encoder", 3), ("clm", "decoder", 1), ("clm", "decoder", 3),
    ("span", "encoder_decoder", 1), ("mdlm", "encoder", 1)])
def test_forward_backward_never_syncs(specials, objective, architecture, chunks, no_host_sync):
    model = build_model("tiny", architecture, specials, max_positions=256, seed=0)
    suppressed = (specials.mask,) if objective == "mdlm" else ()
    module = StandardModule(model, architecture, loss_chunks=chunks, suppressed=suppressed)
    for seed in range(3):  # diffusion batches fall on both sides of the sparse threshold
        batch = convert_for_loss(architecture, features(specials, objective, seed), specials)
        totals = torch.as_tensor(module.counts(batch), dtype=torch.float32)
        out = module.forward_backward(to_torch(batch, CPU), totals)
    assert out["nll"].shape == (1,) and model.get_output_embeddings().weight.grad is not None
