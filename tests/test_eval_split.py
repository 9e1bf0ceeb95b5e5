"""Evaluation split over processes: each share scores every world-th batch, and the sums of
the shares equal one process scoring them all (the 2-process wiring is checked in
``test_distributed.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_tree
from lmobjectives.config import build_config
from lmobjectives.evaluate.metrics import bits_per_byte, my_share, objective_eval, token_byte_lengths, val_batches
from lmobjectives.train.setup import open_run


def test_my_share_covers_every_batch_once():
    for n in range(7):
        for world in (1, 2, 3):
            got = sorted(i for r in range(world) for i in my_share(n, (r, world)))
            assert got == list(range(n))


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_shares_sum_to_the_whole(small_store, tmp_path, objective):
    tree = tiny_tree(small_store, str(tmp_path / "run"))
    tree["objective"] = objective
    run = open_run(build_config(tree), tmp_path / "run", progress=False)
    rows = val_batches(run.val_source(), 2, 3)

    def sums(fn, world: int) -> list[np.ndarray]:  # noqa: ANN001
        seen: list[np.ndarray] = []
        for rank in range(world):
            fn(share=(rank, world), reduce=lambda s: seen.append(s.copy()) or s)
        return seen

    whole = sums(lambda **kw: objective_eval(run, rows, run.model_with_loss, run.device, **kw), 1)[0]
    parts = sums(lambda **kw: objective_eval(run, rows, run.model_with_loss, run.device, **kw), 2)
    assert parts[0][2] != whole[2]  # each share scored part of the targets
    np.testing.assert_allclose(parts[0] + parts[1], whole, rtol=1e-12)
    if objective == "clm":
        lengths = token_byte_lengths(run.tokenizer)

        def bpb(**kw):  # noqa: ANN003, ANN202
            return bits_per_byte(run.model, rows, run.specials, lengths, run.device, by_position=True, **kw)

        whole, parts = sums(bpb, 1)[0], sums(bpb, 2)
        np.testing.assert_allclose(parts[0] + parts[1], whole, rtol=1e-12)


def test_large_vocabulary_eval_applies_the_head_in_chunks(small_store, tmp_path, monkeypatch):
    """Past the logits budget, bits/byte is scored from hidden states a few rows at a time:
    the head never sees the whole batch at once, and the numbers equal the one-piece path."""
    import lmobjectives.loss as loss
    from lmobjectives.models.output import output_projection

    run = open_run(build_config(tiny_tree(small_store, str(tmp_path / "run"))), tmp_path / "run",
                   progress=False)
    rows = val_batches(run.val_source(), 4, 2)
    lengths = token_byte_lengths(run.tokenizer)
    whole = bits_per_byte(run.model, rows, run.specials, lengths, run.device, by_position=True)
    import torch.nn.functional as F

    head = output_projection(run.model)
    plain_linear, seen = F.linear, []

    def linear(x, weight, bias=None):  # noqa: ANN001, ANN202 - records the head's row counts
        if weight is head.weight:
            seen.append(x.shape[0])
        return plain_linear(x, weight, bias)

    monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", 1)  # every row its own chunk
    monkeypatch.setattr(F, "linear", linear)
    chunked = bits_per_byte(run.model, rows, run.specials, lengths, run.device, by_position=True)
    monkeypatch.undo()
    assert seen and max(seen) == 1  # one row of the batch per head call, never (B, T, V)
    assert chunked["bits_per_byte"] == pytest.approx(whole["bits_per_byte"], rel=1e-6)
    assert chunked["bytes"] == whole["bytes"]
    assert chunked["loss_by_position"].keys() == whole["loss_by_position"].keys()
    for bucket, nll in whole["loss_by_position"].items():
        assert chunked["loss_by_position"][bucket] == pytest.approx(nll, rel=1e-5)
