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
from lmobjectives.train.module import StandardModule, to_torch

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
    from lmobjectives.train.api import train

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
