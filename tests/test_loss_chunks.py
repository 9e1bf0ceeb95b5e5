"""Chunked linear cross-entropy: the same loss and gradients as the one-piece path (fp32,
rounding only) for every architecture and every MTP head, without (B·T, V) logits; runs with
chunks resume bit for bit; ``auto`` keeps small batches on the one-piece path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_tree
from lmobjectives.config import build_config
from lmobjectives.data.converters import IGNORE
from lmobjectives.errors import UserError
from lmobjectives.loss import chunked_nll_sum, resolve_chunks, token_nll_sum
from lmobjectives.models.output import projection_removed
from lmobjectives.models.presets import build_model
from lmobjectives.objectives.mtp import MTP
from lmobjectives.runtime import to_torch
from lmobjectives.step import StandardModule
from lmobjectives.step.mtp import MTPModule
from test_mtp import packed_batch, tiny_mtp

CPU = torch.device("cpu")


def grads_of(*tensors: torch.Tensor) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in tensors if t is not None]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("scored", [0.9, 0.2])  # dense (CLM) and sparse (MLM-like) targets
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_one_piece(shift, scored, with_bias):
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 3, 11, 16, 50
    h = torch.randn(B, T, d, generator=g, requires_grad=True)
    w = torch.randn(V, d, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if with_bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) > scored] = IGNORE
    nll, correct = token_nll_sum(F.linear(h, w, b), labels, shift)
    (nll * 0.37).backward()
    ref = grads_of(h, w, b)
    for chunks in (2, 5, 1000):
        c_nll, c_correct = chunked_nll_sum(h, w, b, labels, shift, chunks)
        (c_nll * 0.37).backward()
        torch.testing.assert_close(c_nll, nll, rtol=1e-6, atol=1e-5)
        assert int(c_correct) == int(correct)
        for got, want in zip(grads_of(h, w, b), ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_chunked_without_grad_and_with_nothing_scored():
    h, w = torch.randn(2, 4, 8), torch.randn(10, 8)
    labels = torch.full((2, 4), IGNORE)
    with torch.no_grad():
        nll, correct = chunked_nll_sum(h, w, None, labels, False, 3)
    assert float(nll) == 0.0 and int(correct) == 0


def test_resolve_chunks():
    assert resolve_chunks(1, 8192, 128_000) == 1
    assert resolve_chunks(4, 3, 100) == 3  # never more chunks than rows
    assert resolve_chunks("auto", 8 * 256, 8192) == 1  # the default job: 64 MiB of logits
    assert resolve_chunks("auto", 8192, 32768) == 8  # 1 GiB in 128 MiB chunks
    assert resolve_chunks("auto", 8192, 131072) == 32


def test_config_knob():
    tree = {"objective": "clm", "train": {"loss_chunks": "auto"}}
    assert build_config(tree).train.loss_chunks == "auto"
    assert build_config({"objective": "clm"}).train.loss_chunks == 1
    for bad in (0, "many"):
        with pytest.raises(UserError, match="loss_chunks"):
            build_config({"objective": "clm", "train": {"loss_chunks": bad}})


# ---------------------------------------------------------------------- every architecture
def arch_batch(specials, architecture: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    B, T = 2, 12
    ids = rng.integers(200, specials.vocab_size, size=(B, T))
    labels = rng.integers(200, specials.vocab_size, size=(B, T))
    batch = {"input_ids": ids, "attention_mask": np.ones((B, T), dtype=np.int64)}
    if architecture == "encoder":
        labels[rng.random((B, T)) > 0.3] = IGNORE  # sparse, as MLM
    if architecture == "encoder_decoder":
        batch["decoder_input_ids"] = rng.integers(200, specials.vocab_size, size=(B, 7))
        labels = labels[:, :7]
    batch["labels"] = labels
    return batch


def step_grads(module, batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # noqa: ANN001
    module.model.zero_grad(set_to_none=True)
    totals = torch.as_tensor(module.counts(batch), dtype=torch.float32)
    out = module.forward_backward(to_torch(batch, CPU), totals)
    return out, {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("architecture", ["decoder", "encoder", "encoder_decoder"])
def test_every_architecture_same_loss_and_gradients(specials, architecture):
    model = build_model("tiny", architecture, specials, max_positions=64, seed=0)
    batch = arch_batch(specials, architecture)
    ref_out, ref = step_grads(StandardModule(model, architecture), batch)
    out, got = step_grads(StandardModule(model, architecture, loss_chunks=3), batch)
    torch.testing.assert_close(out["nll"], ref_out["nll"], rtol=1e-6, atol=1e-5)
    assert torch.equal(out["correct"], ref_out["correct"])
    assert got.keys() == ref.keys() and len(ref) == len(list(model.parameters()))
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # The projection is back in place after the chunked forward.
    assert model.get_output_embeddings().weight.shape[0] == specials.vocab_size


def test_projection_removed_gives_the_projections_input(specials):
    model = build_model("tiny", "encoder_decoder", specials, max_positions=64, seed=0)
    batch = to_torch(arch_batch(specials, "encoder_decoder"), CPU)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    with projection_removed(model) as head:
        hidden = model(**inputs).logits  # (B, T, d), after T5's d^-0.5 rescale
    assert hidden.shape[-1] == model.config.d_model
    torch.testing.assert_close(head(hidden), logits)


@pytest.mark.parametrize("design", ["parallel", "sequential"])
def test_every_mtp_head_same_loss_and_gradients(specials, design):
    model = tiny_mtp(specials, 3, design)
    obj = MTP(specials=specials, n_heads=3, head_design=design, weights=(1.0, 0.5, 0.25))
    batch = packed_batch(specials)
    ref_out, ref = step_grads(MTPModule(model, obj), batch)
    out, got = step_grads(MTPModule(model, obj, loss_chunks=4), batch)
    torch.testing.assert_close(out["nll"], ref_out["nll"], rtol=1e-6, atol=1e-5)
    assert torch.equal(out["correct"], ref_out["correct"])
    assert got.keys() == ref.keys()
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------- runs
def losses(run_dir) -> list[dict]:  # noqa: ANN001
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if not r.get("eval")]


def test_chunked_run_tracks_one_piece_and_resumes_bit_exact(small_store, tmp_path):
    from lmobjectives.train.job import train

    def cfg(out, chunks):  # noqa: ANN001, ANN202
        tree = tiny_tree(small_store, str(out), loss_chunks=chunks)
        tree["model"]["precision"] = "fp32"
        return build_config(tree)

    quiet = {"progress": False, "say": lambda m: None}
    one = train(cfg(tmp_path / "one", 1), **quiet)
    whole = train(cfg(tmp_path / "whole", 3), **quiet)
    a, b = losses(one.run_dir), losses(whole.run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    crashed = tmp_path / "crashed"
    shutil.copytree(whole.run_dir, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-0000006")
    shutil.rmtree(crashed / "final")
    resumed = train(cfg(crashed, 3), resume=crashed, **quiet)
    assert resumed.started.startswith("resumed from step-0000003")
    keys = ("loss", "accuracy", "grad_norm", "lr", "tokens")
    assert [{k: r[k] for k in keys} for r in losses(crashed)] == [{k: r[k] for k in keys} for r in b]
