"""Masked diffusion end to end: the weighted loss keeps the frame's rule (accumulation gives
the big batch's gradient), the Monte Carlo ELBO matches an exact computation on a tiny
vocabulary, the reverse sampler fills exactly the masks, and a trained tiny model exports,
loads with the HF Auto class, and fills masks."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmobjectives.data.converters import CONVERTERS
from lmobjectives.evaluate.diffusion import elbo_bound, token_nll
from lmobjectives.infer.diffusion import reverse_diffusion
from lmobjectives.objectives.base import Rows
from lmobjectives.objectives.mdlm import MDLM
from lmobjectives.tokenizer.special import SPECIAL_TOKENS, SpecialIds
from lmobjectives.runtime import to_torch
from lmobjectives.step.standard import StandardModule

SP = SpecialIds.default(len(SPECIAL_TOKENS) + 4)  # four ordinary tokens
WORDS = list(range(len(SPECIAL_TOKENS), SP.vocab_size))


class Toy(torch.nn.Module):
    """A bidirectional "model" on rows of length L: each position's logits are a fixed random
    linear function of the one-hot of the whole input row."""

    def __init__(self, length: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        V = SP.vocab_size
        self.w = torch.nn.Parameter(torch.randn(length, V, length, V, generator=g))
        self.config = SimpleNamespace(layer_types=None)

    def forward(self, input_ids, attention_mask=None, position_ids=None):  # noqa: ANN001, ANN201
        onehot = torch.nn.functional.one_hot(input_ids, SP.vocab_size).float()  # (B, L, V)
        return SimpleNamespace(logits=torch.einsum("bjv,jvlw->blw", onehot, self.w))


def exact_bound(model: Toy, x: list[int], eps: float) -> float:
    """(1/(1-eps)) ∫_eps^1 (1/t) E_{mask ~ t}[Σ_masked −log p(x_i | z)] dt, summed exactly
    over every mask pattern S: ∫ t^{|S|-1} (1-t)^{L-|S|} dt is a polynomial integral."""
    from numpy.polynomial import polynomial as P

    L, total = len(x), 0.0
    for pattern in itertools.product([False, True], repeat=L):
        s = sum(pattern)
        if s == 0:
            continue
        z = np.array([SP.mask if m else tok for tok, m in zip(x, pattern)])
        f = SimpleNamespace(inputs=z[None])
        batch = {"input_ids": f.inputs, "labels": np.where(np.array(pattern), x, -100)[None]}
        nll, _ = token_nll(model, batch, (SP.mask,), torch.device("cpu"))
        poly = P.polymul(P.polypow([0, 1], s - 1), P.polypow([1, -1], L - s))
        integral = P.polyval(1.0, P.polyint(poly)) - P.polyval(eps, P.polyint(poly))
        total += float(nll.sum()) * integral
    return total / (1 - eps)


def test_monte_carlo_elbo_matches_the_exact_bound():
    model = Toy(length=3)
    xs = [[WORDS[0], WORDS[1], WORDS[2]], [WORDS[3], WORDS[3], WORDS[0]]]
    rows = Rows.from_tokens(np.array(xs * 8), SP.eos)  # 16 rows, each text 8 times
    obj = MDLM(specials=SP, eps=1e-3)
    est = elbo_bound(model, obj, "encoder", [rows], np.ones(SP.vocab_size, dtype=np.int64),
                     samples=200, seed=0)
    exact = 8 * sum(exact_bound(model, x, 1e-3) for x in xs)  # nats over all 16 rows
    total = est["loss_bound"] * est["tokens"]
    se = est["bits_per_byte_bound_se"] * est["bytes"] * np.log(2)
    assert est["tokens"] == est["bytes"] == 48
    assert abs(total - exact) < 4 * se, (total, exact, se)
    assert se < 0.05 * exact  # the estimate is tight enough for the check to mean something


def test_accumulation_gives_the_big_batch_gradient():
    """Weighted sums over micro-batches divided by the step's scored-token count: two halves
    with the global count give the same gradient as the whole batch at once."""
    model = Toy(length=6)
    rng = np.random.default_rng(0)
    rows = Rows.from_tokens(rng.choice(WORDS + [SP.eos], size=(4, 6)), SP.eos)
    batch = CONVERTERS["encoder"](MDLM(specials=SP)(rows, rng), SP)
    module = StandardModule(model, "encoder", suppressed=(SP.mask,))
    total = torch.as_tensor(module.counts(batch), dtype=torch.float32)
    module.forward_backward(to_torch(batch, torch.device("cpu")), total)
    whole = model.w.grad.clone()
    model.w.grad = None
    for half in (slice(0, 2), slice(2, 4)):
        part = {k: v[half] for k, v in batch.items()}
        module.forward_backward(to_torch(part, torch.device("cpu")), total)
    assert torch.allclose(model.w.grad, whole, atol=1e-6)
    assert float(whole.abs().sum()) > 0


@pytest.mark.parametrize("steps", [1, 3, 50])
def test_sampler_fills_exactly_the_masks(steps):
    model = Toy(length=8)
    ids = [WORDS[0], SP.mask, WORDS[1], SP.mask, SP.mask, WORDS[2], SP.mask, WORDS[3]]
    out = reverse_diffusion(model, ids, "encoder", SP, steps=steps, temperature=1.0, seed=3)
    assert SP.mask not in out.tokens
    assert [a for a, b in zip(out.tokens, ids) if b != SP.mask] == [b for b in ids if b != SP.mask]
    assert 1 <= out.forward_passes <= min(steps, 4)  # no call in a step that reveals nothing
    again = reverse_diffusion(model, ids, "encoder", SP, steps=steps, temperature=1.0, seed=3)
    assert again.tokens == out.tokens


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
    from conftest import tiny_tree
    from lmobjectives.config import build_config
    from lmobjectives.train.job import train

    tree = tiny_tree(small_store, str(tmp_path_factory.mktemp("mdlm") / "run"), steps=8, lr=1e-2)
    tree["objective"] = "mdlm"
    return train(build_config(tree), progress=False).run_dir


def test_export_loads_with_the_auto_class_and_fill_works(trained):
    import transformers as tf

    from lmobjectives.infer.load import load_model

    assert json.loads((trained / "run.json").read_text())["architecture"] == "encoder"
    hf = tf.AutoModelForMaskedLM.from_pretrained(trained / "final").eval()
    loaded = load_model(trained)
    ids = torch.tensor([loaded.tokenizer.encode("def f(x): return x").ids])
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5)
    text = loaded.tokenizer.encode("import os<|mask|><|mask|> sys").ids
    out = reverse_diffusion(loaded.model, text, loaded.architecture, loaded.specials, steps=2)
    filled = [t for t, s in zip(out.tokens, text) if s == loaded.specials.mask]
    assert len(filled) == 2 and not loaded.specials.is_special(np.array(filled)).any()


def test_resumed_run_is_bit_identical(trained, small_store, tmp_path):
    """Rewind a copy of the trained run to its older kept checkpoint (step 6 of 8), resume it: every logged
    number of every step (masks, times and weights redrawn from the seed) is the same."""
    import shutil

    from conftest import tiny_tree
    from lmobjectives.config import build_config
    from lmobjectives.train.job import train

    crashed = tmp_path / "crashed"
    shutil.copytree(trained, crashed)
    for late in sorted((crashed / "checkpoints").iterdir())[1:]:
        shutil.rmtree(late)
    shutil.rmtree(crashed / "final")
    tree = tiny_tree(small_store, str(crashed), steps=8, lr=1e-2)
    tree["objective"] = "mdlm"
    res = train(build_config(tree), resume=crashed, progress=False)
    assert res.started.startswith("resumed from step-0000006")
    lines = lambda d: [{k: r[k] for k in ("step", "loss", "accuracy", "grad_norm", "targets")}  # noqa: E731
                       for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                       if not r.get("eval")]
    assert lines(trained) == lines(crashed)
    assert [r["step"] for r in lines(crashed)] == list(range(1, 9))


@pytest.mark.parametrize("architecture", MDLM.architectures)
def test_packed_documents_never_see_each_other(architecture):
    """A document's logits inside a packed row equal its logits alone, for both backbones;
    rows longer than ModernBERT's local window (128) check that its sliding layers keep
    their window under the document mask (``models.presets.forward_inputs``)."""
    from lmobjectives.models.presets import build_model, forward_inputs

    sp = SpecialIds.default(512)
    model = build_model("tiny", architecture, sp, max_positions=512, seed=0).eval()
    rng = np.random.default_rng(0)
    a = rng.integers(len(SPECIAL_TOKENS), 512, 170).tolist() + [sp.eos]
    b = rng.integers(len(SPECIAL_TOKENS), 512, 150).tolist() + [sp.eos]
    from lmobjectives.infer.diffusion import model_batch

    def logits(ids: list[int], positions: np.ndarray | None = None) -> torch.Tensor:
        batch = model_batch(np.array(ids), architecture, sp)
        if positions is not None:  # a packed row: documents told apart by their positions
            f = MDLM(specials=sp).at_times(Rows(np.array([ids], dtype=np.int32), positions[None]),
                                           np.array([1e-3]), np.random.default_rng(0))
            batch = CONVERTERS[architecture](f, sp)
            batch["input_ids"] = np.array([ids])
        inputs = {k: torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad():
            return model(**forward_inputs(model, inputs)).logits[0]

    packed = logits(a + b, np.r_[np.arange(len(a)), np.arange(len(b))].astype(np.int32))
    assert torch.allclose(packed[:len(a)], logits(a), atol=1e-4)
    assert torch.allclose(packed[len(a):], logits(b), atol=1e-4)
    if architecture == "encoder":  # one document: the same as transformers' own 2-D path
        with torch.no_grad():
            plain = model(input_ids=torch.tensor([a])).logits[0]
        assert torch.allclose(plain, logits(a), atol=1e-4)


def test_cli_eval_generate_infill(trained):
    from runs_util import run_cli

    code, out, err = run_cli(["eval", str(trained), "--batches", "1", "--infill-samples", "2"])
    assert code == 0, err
    assert "bits_per_byte_bound: ≤ " in out and " ± " in out and "perplexity_bound: ≤ " in out
    assert "infill_samples: 2" in out
    code, out, _ = run_cli(["eval", str(trained), "--batches", "1", "--json"])
    res = json.loads(out)
    assert res["bits_per_byte"] is None and res["bits_per_byte_bound"] > 0
    assert "perplexity" not in res and res["perplexity_bound"] > 1
    assert res["bits_per_byte_bound_se"] > 0 and res["bound_samples"] == 4
    assert 0 <= res["masked_accuracy_t0.15"] <= 1 and 0 <= res["masked_accuracy_t0.5"] <= 1
    code, out, err = run_cli(["generate", str(trained), "--prompt", "import", "--max-new-tokens", "6",
                              "--diffusion-steps", "3", "--json"])
    assert code == 0, err
    g = json.loads(out)
    assert len(g["tokens"]) == 6 and 1 <= g["forward_passes"] <= 3 and g["diffusion_steps"] == 3
    code, out, err = run_cli(["infill", str(trained), "--text", "a <|mask|> b<|mask|><|mask|> c", "--json"])
    assert code == 0, err
    f = json.loads(out)
    assert len(f["tokens"]) == 3 and "<|mask|>" not in f["text"]
    code, _, err = run_cli(["infill", str(trained), "--prefix", "a", "--suffix", "b"])
    assert code == 2 and "<|mask|>" in err and "Traceback" not in err
    code, _, err = run_cli(["generate", str(trained), "--diffusion-steps", "0"])
    assert code == 2 and "--diffusion-steps" in err


def test_compare_row_with_a_bound(small_store, tmp_path):
    """mdlm is a row of `lmobj compare`: its bits/byte is the bound, printed "≤"; its
    masked-token accuracy and single-line infill are measured."""
    from lmobjectives.compare import compare

    out = tmp_path / "cmp"
    compare(["clm", "mdlm"], store=small_store, out=out, preset="tiny", seq_len=32, batch_size=2,
            steps=4, seeds=1, sets=["train.checkpoint_every=4"], progress=False, say=lambda m: None)
    md = (out / "report.md").read_text()
    part = md.split("## Measured comparison", 1)[1].split("\n## ", 1)[0]
    lines = next(b for b in part.split("\n\n") if b.startswith("|")).splitlines()
    rows = [[c.strip() for c in l.strip("|").split(" | ")] for l in lines]
    cell = {(r[0], h): v for r in rows[2:] for h, v in zip(rows[0], r)}
    assert cell[("mdlm", "held-out bits/byte")].startswith("≤ ")
    assert not cell[("clm", "held-out bits/byte")].startswith("≤")
    assert not cell[("mdlm", "masked-token acc.")].startswith("n/a")
    assert not cell[("mdlm", "infill exact match")].startswith("n/a")
    m = json.loads((out / "runs" / "mdlm" / "seed-0" / "measure.json").read_text())["metrics"]
    assert m["bits_per_byte"]["bound"] is True and m["bits_per_byte"]["se"] > 0
