"""Checks that need a CUDA GPU (``pytest -m cuda``; ``benchmarks/gpu_check.sh`` runs them):
the chunked loss on the GPU, in fp32 and under bf16 autocast, its memory, and a bf16 run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_tree
from lmobjectives.config import build_config
from lmobjectives.loss import chunked_nll_sum, token_nll_sum

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = torch.device("cuda")


def head_and_loss(chunks: int, bf16: bool, V: int = 32768, rows: int = 8192, d: int = 1024):  # noqa: ANN201
    g = torch.Generator(device=GPU).manual_seed(0)
    h = torch.randn(rows // 1024, 1024, d, device=GPU, generator=g).requires_grad_(True)
    w = torch.nn.Parameter(torch.randn(V, d, device=GPU, generator=g) * d ** -0.5)
    labels = torch.randint(0, V, (rows // 1024, 1024), device=GPU, generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        if chunks == 1:
            nll, _, _ = token_nll_sum(F.linear(h, w), labels, True)
        else:
            nll, _ = chunked_nll_sum(h, w, None, labels, True, chunks)
    (nll / rows).backward()
    torch.cuda.synchronize()
    return nll.detach(), h.grad, w.grad, torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_loss_on_the_gpu(bf16):
    tol = {"rtol": 2e-2, "atol": 2e-3} if bf16 else {"rtol": 1e-4, "atol": 1e-6}
    nll, gh, gw, peak = head_and_loss(1, bf16)
    c_nll, c_gh, c_gw, c_peak = head_and_loss(8, bf16)
    torch.testing.assert_close(c_nll, nll, rtol=1e-3 if bf16 else 1e-5, atol=0)
    torch.testing.assert_close(c_gh, gh, **tol)
    torch.testing.assert_close(c_gw, gw, **tol)
    assert c_peak <= peak / 4, (c_peak, peak)


def test_a_bf16_run_with_chunked_loss_learns(small_store, tmp_path):
    from lmobjectives.train.job import train

    tree = tiny_tree(small_store, str(tmp_path / "run"), steps=8, loss_chunks=2)
    tree["model"]["precision"] = "bf16"
    result = train(build_config(tree), progress=False, say=lambda m: None)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if not r.get("eval")]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] and math.isfinite(result.eval["loss"])


def test_prefetch_on_the_gpu_trains_as_without(small_store, tmp_path):
    """``data.prefetch: auto`` prepares the next step on a thread and copies it from pinned
    memory on a side stream: the same losses as the serial path (the first bit for bit; the
    later ones up to the GPU's non-deterministic backward reductions)."""
    from lmobjectives.train.job import train

    losses = {}
    for prefetch in ("auto", False):
        tree = tiny_tree(small_store, str(tmp_path / str(prefetch)), steps=4, grad_accum=2)
        tree["data"]["prefetch"] = prefetch
        result = train(build_config(tree), progress=False, say=lambda m: None)
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        losses[prefetch] = [r["loss"] for r in map(json.loads, lines) if not r.get("eval")]
    assert len(losses["auto"]) == 4 and losses["auto"][0] == losses[False][0]
    assert losses["auto"] == pytest.approx(losses[False], rel=1e-4)
