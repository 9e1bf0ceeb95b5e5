"""Multi-token prediction: per-depth targets, the memory-saving backward, resume and export
(self-speculative decoding: ``test_mtp_decoding.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmobjectives.data.converters import IGNORE, to_decoder
from lmobjectives.errors import UserError
from lmobjectives.models.mtp import MTPModel
from lmobjectives.models.presets import build_model
from lmobjectives.objectives import build_objective
from lmobjectives.objectives.base import Rows
from lmobjectives.objectives.mtp import MTP, depth_targets, loss_weights
from lmobjectives.runtime import to_torch
from lmobjectives.step.mtp import MTPModule, base_overrides, depth_labels, head_names
from mtp_util import DESIGNS, tiny_mtp

CPU = torch.device("cpu")


def packed_batch(specials, B: int = 2, T: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    toks = rng.integers(200, specials.vocab_size, size=(B, T))
    toks[0, 7] = specials.eos
    toks[1, 15] = specials.eos
    toks[1, -3:] = specials.pad
    rows = Rows.from_tokens(toks, specials.eos)
    return to_decoder(MTP(specials=specials)(rows, rng), specials)


# ---------------------------------------------------------------------- targets per depth
def test_depth_targets_worked_example():
    tokens = np.array([[5, 6, 7, 0, 8, 9, 0, 1]])
    positions = np.array([[0, 1, 2, 3, 0, 1, 2, 0]])
    mask = np.array([[0, 1, 1, 1, 0, 1, 1, 0]], dtype=bool)
    assert depth_targets(tokens, mask, positions, 1).tolist() == [[6, 7, 0, -100, 9, 0, -100, -100]]
    assert depth_targets(tokens, mask, positions, 2).tolist() == [[7, 0, -100, -100, 0, -100, -100, -100]]
    assert (depth_targets(tokens, mask, positions, 8) == IGNORE).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=6), st.integers(1, 5), st.integers(0, 10))
def test_depth_targets_stay_in_their_document(doc_lengths, k, n_pad):
    """Brute force: the target of depth k at t is token t+k when both lie in one document and
    t+k is scored; the numpy and torch versions agree."""
    EOS, PAD = 0, 1
    row = []
    for i, n in enumerate(doc_lengths):
        row += [10 + i] * n + [EOS]
    row += [PAD] * n_pad
    tokens = np.array([row])
    positions = Rows.from_tokens(tokens, EOS).positions
    doc_id = np.cumsum(np.r_[0, (tokens[0, :-1] == EOS)])  # document of each token
    mask = (positions > 0) & (tokens != PAD)
    got = depth_targets(tokens, mask, positions, k)
    T = tokens.shape[1]
    for t in range(T):
        want = tokens[0, t + k] if t + k < T and doc_id[t + k] == doc_id[t] and mask[0, t + k] else IGNORE
        assert got[0, t] == want
        if got[0, t] != IGNORE:
            assert tokens[0, t + k] == tokens[0, t] or tokens[0, t + k] == EOS  # same document's token
    labels = np.where(mask, tokens, IGNORE)
    twin = depth_labels(torch.from_numpy(labels), torch.from_numpy(positions.astype(np.int64)), k)
    assert twin.numpy().tolist() == got.tolist()


def test_counts_per_depth(specials):
    batch = packed_batch(specials)
    model = tiny_mtp(specials, 3, "parallel")
    counts = MTPModule(model, MTP(specials=specials, n_heads=3)).counts(batch)
    # Row 0: documents of 8 and 16 tokens; row 1: 16 and 5 tokens then 3 PAD.
    docs = [8, 16, 16, 5]
    assert counts.tolist() == [sum(max(n - k, 0) for n in docs) for k in (1, 2, 3)]


# ---------------------------------------------------------------------- objective params
def test_objective_params_and_weights(specials):
    obj = build_objective("mtp", {}, specials)
    assert (obj.n_heads, obj.head_design, obj.compute_matched) == (4, "parallel", False)
    assert obj.loss_weights(0.0) == (1.0, 1.0, 1.0, 1.0)
    seq = build_objective("mtp", {"head_design": "sequential", "n_heads": 3}, specials)
    assert seq.loss_weights(0.9) == pytest.approx((1.0, 0.15, 0.15))
    sched = build_objective("mtp", {"n_heads": 2, "weight_schedule": "deepseek"}, specials)
    assert sched.loss_weights(0.5) == pytest.approx((1.0, 0.3))
    assert sched.loss_weights(0.7) == pytest.approx((1.0, 0.1))
    assert build_objective("mtp", {"n_heads": 2, "weights": [1, 0.5]}, specials).loss_weights(0.3) == (1.0, 0.5)
    assert loss_weights(1, "parallel", None, "constant", 0.0) == (1.0,)
    for bad in ({"n_heads": 0}, {"head_design": "tree"}, {"weights": [1.0, 2.0]},
                {"n_heads": 2, "weights": [1, 1], "weight_schedule": "deepseek"}, {"heads": 2}):
        with pytest.raises(UserError):
            build_objective("mtp", bad, specials)


def test_compute_matched_removes_one_trunk_layer_per_extra_head(specials):
    obj = MTP(specials=specials, n_heads=4, compute_matched=True)
    assert base_overrides(obj, "small", {})["num_hidden_layers"] == 8 - 3
    assert base_overrides(MTP(specials=specials, n_heads=4), "small", {}) == {}
    with pytest.raises(UserError, match="at least 5 layers"):
        base_overrides(obj, "tiny", {})


# ---------------------------------------------------------------------- the backward
@pytest.mark.parametrize("design", DESIGNS)
def test_sequential_backward_equals_naive(specials, design):
    model = tiny_mtp(specials, 3, design)
    obj = MTP(specials=specials, n_heads=3, head_design=design, weights=(1.0, 0.5, 0.25))
    batch = packed_batch(specials)
    grads, outs = {}, {}
    for strategy in ("sequential", "naive"):
        module = MTPModule(model, obj, strategy=strategy)
        model.zero_grad(set_to_none=True)
        totals = torch.as_tensor(module.counts(batch), dtype=torch.float32)
        outs[strategy] = module.forward_backward(to_torch(batch, CPU), totals)
        grads[strategy] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert torch.equal(outs["sequential"]["nll"], outs["naive"]["nll"])
    assert grads["sequential"].keys() == grads["naive"].keys()
    assert len(grads["naive"]) == len(list(model.parameters()))  # every head and the trunk learn
    for name, g in grads["naive"].items():
        torch.testing.assert_close(grads["sequential"][name], g, rtol=1e-5, atol=1e-6, msg=name)


def peak_saved_bytes(model: torch.nn.Module, step) -> int:  # noqa: ANN001
    """Peak bytes of tensors autograd keeps for backward (parameters left out), tracked with
    saved-tensor hooks: a deterministic stand-in for peak activation memory."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live = {"now": 0, "peak": 0}

    class Held:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t
            self.n = 0 if t.untyped_storage().data_ptr() in params else t.numel() * t.element_size()
            live["now"] += self.n
            live["peak"] = max(live["peak"], live["now"])

        def __del__(self) -> None:
            live["now"] -= self.n

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        step()
    return live["peak"]


@pytest.mark.parametrize("design", DESIGNS)
def test_peak_memory_is_flat_in_the_number_of_heads(design):
    """Logits dominate (V = 8192 against d = 64): the naive backward holds every head's, ours
    one at a time (Gloeckle §2: O(nV + d) -> O(V + d))."""
    from lmobjectives.tokenizer.special import SpecialIds

    sp = SpecialIds.default(vocab_size=8192)
    batch = packed_batch(sp, B=2, T=64)
    peaks = {}
    for n in (1, 4):
        model = tiny_mtp(sp, n, design).train()
        for strategy in ("sequential", "naive"):
            module = MTPModule(model, MTP(specials=sp, n_heads=n, head_design=design), strategy=strategy)
            totals = torch.as_tensor(module.counts(batch), dtype=torch.float32)
            peaks[n, strategy] = peak_saved_bytes(
                model, lambda: module.forward_backward(to_torch(batch, CPU), totals))
    assert peaks[4, "sequential"] < 1.25 * peaks[1, "sequential"]
    assert peaks[4, "naive"] > 2.5 * peaks[1, "naive"]
    assert peaks[1, "sequential"] <= 1.05 * peaks[1, "naive"]


# ---------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("mtp")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "value", "for", "in", "range", "if", "else", "print", "x", "y"]
    for i in range(40):
        lines = [" ".join(rng.choice(words, size=6)) for _ in range(int(rng.integers(2, 8)))]
        (corpus / f"doc{i}.py").write_text("\n".join(lines) + "\n")
    return prepare_store([str(corpus)], load_tokenizer(None), root / "store", val_fraction=0.1,
                         progress=False).path


def run_config(store: Path, out: Path, steps: int, **objective):
    from lmobjectives.config import build_config

    return build_config({
        "objective": "mtp", "objective_params": objective, "out": str(out),
        "model": {"preset": "tiny", "precision": "fp32"},
        "data": {"store": str(store), "seq_len": 32},
        "train": {"steps": steps, "batch_size": 2, "checkpoint_every": 3, "eval_every": 0,
                  "eval_batches": 1, "lr": 3e-3},
    })


def metric_lines(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if not r.get("eval")]


TRAJECTORY_KEYS = ("loss", "depth2", "depth3", "depth2_acc", "accuracy", "grad_norm", "lr", "tokens")


def test_resumed_mtp_run_is_bit_identical(store, tmp_path):
    """Train 6 steps (checkpoints at 3 and 6); rewind a copy to its step-3 checkpoint as if it
    had crashed there, resume it, and compare every logged number."""
    import shutil

    from lmobjectives.train.job import train

    params = {"n_heads": 3, "head_design": "sequential", "weight_schedule": "deepseek"}
    cfg = run_config(store, tmp_path / "whole", 6, **params)
    whole = train(cfg, progress=False, say=lambda m: None)
    crashed = tmp_path / "crashed"
    shutil.copytree(whole.run_dir, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-0000006")
    shutil.rmtree(crashed / "final")
    resumed = train(cfg.model_copy(update={"out": str(crashed)}), resume=crashed, progress=False,
                    say=lambda m: None)
    assert resumed.started.startswith("resumed from step-0000003")
    a, b = metric_lines(whole.run_dir), metric_lines(crashed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in TRAJECTORY_KEYS} == {k: rb[k] for k in TRAJECTORY_KEYS}
    assert "depth4" not in a[0] and "loss_acc" not in a[0]


def test_export_loads_as_plain_causal_lm_and_heads_load_back(store, tmp_path):
    import transformers as tf

    from lmobjectives.infer.api import generate_text
    from lmobjectives.infer.load import load_model
    from lmobjectives.train.job import train

    run = train(run_config(store, tmp_path / "run", 3), progress=False, say=lambda m: None)
    final = run.run_dir / "final"
    meta = json.loads((final / "mtp_heads.json").read_text())
    assert (meta["n_heads"], meta["head_design"]) == (4, "parallel")
    plain = tf.AutoModelForCausalLM.from_pretrained(str(final))
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.num_hidden_layers == 2
    loaded = load_model(run.run_dir)
    assert isinstance(loaded.model, MTPModel) and loaded.model.n_heads == 4
    from lmobjectives.checkpoint import list_checkpoints
    from safetensors.torch import load_file

    saved = load_file(str(list_checkpoints(run.run_dir)[-1] / "model.safetensors"))
    for name, p in loaded.model.heads.named_parameters():
        assert torch.equal(p, saved[f"heads.{name}"]), name
    ids = torch.tensor([[0, 300, 301, 302]])
    assert torch.equal(plain(input_ids=ids).logits, loaded.model(input_ids=ids).logits)

    # Continued pre-training from this run keeps its heads.
    from lmobjectives.step.mtp import wrap_model

    again = wrap_model(plain, MTP(specials=loaded.specials), seed=1, init_from=str(run.run_dir))
    for name, p in again.heads.named_parameters():
        assert torch.equal(p, saved[f"heads.{name}"]), name

    res = generate_text(str(run.run_dir), "def f", max_new_tokens=12, speculative=True)
    assert set(res) >= {"text", "tokens", "forward_passes", "acceptance_per_head", "tokens_per_forward"}
    assert res["tokens"] == generate_text(str(run.run_dir), "def f", max_new_tokens=12)["tokens"]
    assert res["tokens_per_forward"] == pytest.approx(len(res["tokens"]) / res["forward_passes"])


def test_speculative_needs_heads(specials, tmp_path):
    from lmobjectives.export import export_model
    from lmobjectives.infer.api import generate_text
    from lmobjectives.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    from lmobjectives.tokenizer.special import SpecialIds

    sp = SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size())
    export_model(build_model("tiny", "decoder", sp, max_positions=64, seed=0), tok, tmp_path / "plain")
    with pytest.raises(UserError, match="no multi-token-prediction heads"):
        generate_text(str(tmp_path / "plain"), "x", speculative=True)


def test_head_names():
    assert head_names(1) == ("loss",)
    assert head_names(3) == ("loss", "depth2", "depth3")


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_bits_per_byte_scores_an_mtp_model_by_its_next_token_head(specials, monkeypatch, chunk_bytes):
    """Evaluation finds the wrapped model's output head (one piece, or applied in chunks)
    and scores exactly what the wrapped causal LM scores."""
    from lmobjectives import loss
    from lmobjectives.evaluate.metrics import bits_per_byte

    if chunk_bytes is not None:
        monkeypatch.setattr(loss, "CHUNK_LOGITS_BYTES", chunk_bytes)  # force row chunks
    model = tiny_mtp(specials, 3, "parallel")
    rng = np.random.default_rng(0)
    rows = [Rows.from_tokens(rng.integers(200, specials.vocab_size, size=(2, 16)), specials.eos)]
    lengths = np.ones(specials.vocab_size, dtype=np.int64)
    got = bits_per_byte(model, rows, specials, lengths, CPU)["bits_per_byte"]
    want = bits_per_byte(model.lm, rows, specials, lengths, CPU)["bits_per_byte"]
    assert got == pytest.approx(want, rel=1e-6)
