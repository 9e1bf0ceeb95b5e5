"""Encoder, encoder-decoder and prefix-LM objectives end to end: train, export to the standard
HF class with equal logits, evaluate, serve; the prefix-LM attention mask; the statistics a
user can check with ``lmobj show`` over many seeds."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import tiny_tree
from lmobjectives.config import build_config
from lmobjectives.data.converters import IGNORE, to_prefix_lm
from lmobjectives.objectives.base import Features
from lmobjectives.tokenizer.special import SpecialIds
from lmobjectives.train.job import train

AUTO = {"encoder": "AutoModelForMaskedLM", "encoder_decoder": "AutoModelForSeq2SeqLM",
        "prefix_lm": "AutoModelForCausalLM"}
HF_CLASS = {"encoder": "ModernBertForMaskedLM", "encoder_decoder": "T5ForConditionalGeneration",
            "prefix_lm": "LlamaForCausalLM"}


# ------------------------------------------------------------------------ prefix-LM mask


def prefix_batch(sp: SpecialIds) -> dict[str, np.ndarray]:
    """Two rows: split 5 with 4 suffix tokens, and split 3 with 2 suffix tokens then PAD."""
    inputs = np.array([[200, 201, 202, 203, 204], [210, 211, 212, sp.pad, sp.pad]], np.int32)
    targets = np.array([[300, 301, 302, 303], [310, 311, sp.pad, sp.pad]], np.int32)
    f = Features(targets=targets, target_mask=targets != sp.pad, inputs=inputs,
                 input_lengths=np.array([5, 3], np.int32), target_lengths=np.array([4, 2], np.int32))
    return to_prefix_lm(f, sp)


def tiny_prefix_models(sp: SpecialIds, tmp_path):
    """The model as training builds it, and as the standard Auto class loads its export."""
    import transformers as tf

    from lmobjectives.models.presets import build_model

    built = build_model("tiny", "prefix_lm", sp, 64, seed=0).eval()
    built.save_pretrained(tmp_path / "m")
    return {"built": built, "exported": tf.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()}


def test_prefix_lm_mask_bidirectional_prefix_causal_suffix(tmp_path):
    sp = SpecialIds.default(512)
    batch = prefix_batch(sp)
    n_in, n_all = [5, 3], [9, 5]
    # Loss on the suffix only: labels are -100 over the prefix and the padding.
    assert batch["labels"][0].tolist() == [IGNORE] * 5 + [300, 301, 302, 303]
    assert batch["labels"][1].tolist() == [IGNORE] * 3 + [310, 311] + [IGNORE] * 4
    for name, model in tiny_prefix_models(sp, tmp_path).items():
        def logits(ids: np.ndarray) -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=torch.from_numpy(ids),
                             attention_mask=torch.from_numpy(batch["attention_mask"]),
                             position_ids=torch.from_numpy(batch["position_ids"])).logits  # (B, L, V)

        base = logits(batch["input_ids"])
        for b in range(2):
            # A later prefix token changes every earlier prefix position's output.
            ids = batch["input_ids"].copy()
            ids[b, n_in[b] - 1] += 1
            diff = (logits(ids) - base).abs().amax(-1)  # (B, L)
            assert (diff[b, : n_in[b] - 1] > 1e-4).all(), (name, b, diff[b])
            assert (diff[1 - b] == 0).all()  # rows never see each other
            # A suffix token never changes any earlier position, and does change its own.
            for j in range(n_in[b], n_all[b]):
                ids = batch["input_ids"].copy()
                ids[b, j] += 1
                diff = (logits(ids) - base).abs().amax(-1)
                assert (diff[b, :j] == 0).all(), (name, b, j, diff[b])
                assert diff[b, j] > 1e-4


def test_prefix_generate_reads_the_prompt_as_prefix():
    from lmobjectives.infer.generate import generate, prefill
    from lmobjectives.models.presets import build_model

    sp = SpecialIds.default(512)
    model = build_model("tiny", "prefix_lm", sp, 64, seed=3).eval()
    prompt = [sp.eos, 300, 301, 302, 303]
    got = generate(model, prompt, max_new_tokens=6, bidirectional_prompt=True).tokens
    # Greedy by full recompute, each step through the training converter's mask.
    out: list[int] = []
    for _ in range(6):
        tg = np.array([out or [sp.pad]], np.int32)
        f = Features(targets=tg, target_mask=np.ones_like(tg, bool), inputs=np.array([prompt], np.int32),
                     input_lengths=np.array([len(prompt)], np.int32),
                     target_lengths=np.array([len(out)], np.int32))
        b = to_prefix_lm(f, sp)
        with torch.no_grad():
            lg = model(input_ids=torch.from_numpy(b["input_ids"]),
                       attention_mask=torch.from_numpy(b["attention_mask"])).logits
        out.append(int(lg[0, -1].argmax()))
    assert got == out
    causal, _ = prefill(model, torch.tensor(prompt))
    both, _ = prefill(model, torch.tensor(prompt), bidirectional=True)
    assert not torch.allclose(causal, both)  # the mask reaches the model


# ------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("objective,architecture", [
    ("mlm", "encoder"), ("span", "encoder_decoder"), ("ul2", "encoder_decoder"),
    ("prefix", "prefix_lm"), ("span", "prefix_lm"),
])
def test_train_export_eval_serve(objective, architecture, small_store, tmp_path):
    import transformers as tf

    from lmobjectives.checkpoint import load_checkpoint
    from lmobjectives.evaluate.metrics import val_batches
    from lmobjectives.evaluate.run import evaluate_dir
    from lmobjectives.runtime import to_torch
    from lmobjectives.train.setup import open_run

    tree = {**tiny_tree(small_store, str(tmp_path / "r"), steps=3, eval_batches=1),
            "objective": objective, "architecture": architecture}
    tree["data"]["seq_len"] = 48
    cfg = build_config(tree)
    res = train(cfg, progress=False)
    assert np.isfinite(res.eval["loss"]) and res.eval["targets"] > 0
    final = res.run_dir / "final"

    # Export: the standard Auto class loads it, with the training model's logits.
    hf = getattr(tf, AUTO[architecture]).from_pretrained(final).eval()
    assert type(hf).__name__ == HF_CLASS[architecture]
    run = open_run(cfg, res.run_dir, progress=False)
    load_checkpoint(res.run_dir / "checkpoints" / "step-0000003", run.model, None)
    rows = val_batches(run.val_source(), 2, 1)[0]
    batch = to_torch(run.converter(run.objective(rows, np.random.default_rng(0)), run.specials),
                     run.device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(hf(**inputs).logits, run.model.eval()(**inputs).logits,
                                   rtol=0, atol=1e-6)

    ev = evaluate_dir(res.run_dir, n_batches=1)
    assert np.isfinite(ev["loss"]) and ev["tokens"] > 0
    if architecture == "prefix_lm":
        assert ev["bits_per_byte"] > 0 and "bits_per_byte_reason" not in ev
    else:
        assert ev["bits_per_byte"] is None and ev["bits_per_byte_reason"]
    if objective == "mlm":
        assert 0 <= ev["masked_accuracy"] <= 1 and "accuracy" not in ev
    else:
        assert 0 <= ev["accuracy"] <= 1
    serve(architecture, res.run_dir, hf)


def serve(architecture: str, run_dir, hf) -> None:  # noqa: ANN001
    """Inference on the exported model, the way each architecture is used."""
    if architecture == "encoder":
        serve_fill_mask(run_dir)
    elif architecture == "prefix_lm":
        from lmobjectives.infer.api import generate_text

        g = generate_text(str(run_dir), "def add(a, b):", max_new_tokens=5)
        assert 1 <= len(g["tokens"]) <= 5 and g["forward_passes"] == len(g["tokens"])
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(run_dir / "final")
        ids = tok("def add(a, <extra_id_0>):<|endoftext|>", return_tensors="pt")["input_ids"]
        out = hf.generate(ids, max_new_tokens=4, do_sample=False)
        with torch.no_grad():
            first = hf(input_ids=ids, decoder_input_ids=out[:, :1]).logits[0, -1].argmax()
        assert out[0, 0] == hf.config.decoder_start_token_id and out[0, 1] == first


def serve_fill_mask(run_dir) -> None:  # noqa: ANN001
    from transformers import pipeline
    from typer.testing import CliRunner

    from lmobjectives.cli import app
    from lmobjectives.infer.fill_mask import fill_mask_text

    text = "def add(a, b):\n    return a <|mask|> b"
    ours = fill_mask_text(run_dir, text, top_k=3)
    # def|Ġadd|(|a|,|Ġb|):|ĊĠĠĠ|Ġreturn|Ġa|MASK|Ġb: the space before the mask is the mask's.
    assert [m["index"] for m in ours["masks"]] == [10] and len(ours["masks"][0]["predictions"]) == 3
    # transformers' pipeline on the exported directory; given our input, the same scores.
    pipe = pipeline("fill-mask", model=str(run_dir / "final"))
    theirs = pipe("<|endoftext|>def add(a, b):\n    return a<|mask|> b<|endoftext|>", top_k=3)
    assert [p["token"] for p in theirs] == [p["token"] for p in ours["masks"][0]["predictions"]]
    assert np.allclose([p["score"] for p in theirs], [p["score"] for p in ours["masks"][0]["predictions"]],
                       atol=1e-6)
    cli = CliRunner().invoke(app, ["fill-mask", str(run_dir), "--text", text, "--top-k", "2", "--json"])
    assert cli.exit_code == 0, cli.output
    got = json.loads(cli.stdout)
    assert [p["token"] for p in got["masks"][0]["predictions"]] == \
        [p["token"] for p in ours["masks"][0]["predictions"][:2]]


def test_fill_mask_user_errors(tmp_path):
    from lmobjectives.errors import UserError
    from lmobjectives.infer.fill_mask import fill_mask
    from lmobjectives.models.presets import build_model
    from lmobjectives.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    sp = SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size())
    model = build_model("tiny", "encoder", sp, 64, seed=0).eval()
    with pytest.raises(UserError, match="no <\\|mask\\|>"):
        fill_mask(model, tok, sp, "no mask here")
    with pytest.raises(UserError, match="top-k"):
        fill_mask(model, tok, sp, "a <|mask|>", top_k=0)
    two = fill_mask(model, tok, sp, "<|mask|> = <|mask|>", top_k=4)
    assert [m["index"] for m in two["masks"]] == [0, 2]
    for m in two["masks"]:
        scores = [p["score"] for p in m["predictions"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


# ------------------------------------------------------------------------ show statistics

TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon "
    "sun. A library is a collection of books, and a module is a file of Python definitions "
    "and statements. Functions return values; classes bundle data with the methods that act "
    "on it. When the interpreter starts, it reads the standard library from disk, compiles "
    "each module to byte code and caches the result, so the next start is faster. Errors "
    "should never pass silently, unless explicitly silenced. In the face of ambiguity, "
    "refuse the temptation to guess. There should be one obvious way to do it. Now is better "
    "than never, although never is often better than right now. Namespaces are one honking "
    "great idea; let us do more of those. Simple is better than complex, and complex is "
    "better than complicated. Readability counts."
)
SEEDS = 300


@pytest.fixture(scope="module")
def shown():
    """``lmobj show NAME --text TEXT --seed N --json`` for many seeds, as a user would run it."""
    from lmobjectives.show import show
    from lmobjectives.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    return lambda name, **kw: [show(name, TEXT, tok, seed=s, seq_len=128, **kw) for s in range(SEEDS)]


def test_show_mlm_rate_and_80_10_10(shown):
    counts = Counter()
    for out in shown("mlm"):
        sp = out["special_tokens"]
        specials = set(sp.values())
        labels, inputs = np.array(out["labels"]), np.array(out["input_ids"])
        original = np.where(labels != IGNORE, labels, inputs)
        picked = labels != IGNORE
        counts["eligible"] += int(sum(t not in specials for t in original))
        counts["picked"] += int(picked.sum())
        counts["mask"] += int((inputs[picked] == sp["mask"]).sum())
        counts["kept"] += int((inputs[picked] == labels[picked]).sum())
        assert not any(t in specials for t in labels[picked])  # specials are never selected
    assert counts["eligible"] > 30_000
    assert counts["picked"] / counts["eligible"] == pytest.approx(0.15, abs=0.01)
    mask, kept = counts["mask"] / counts["picked"], counts["kept"] / counts["picked"]
    assert mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.015)
    assert 1 - mask - kept == pytest.approx(0.1, abs=0.015)  # random replacements


def test_show_span_density_and_mean_span(shown):
    noise = real = spans = 0
    lengths: Counter = Counter()
    starts: set[int] = set()
    for out in shown("span"):
        sp = out["special_tokens"]
        sentinels = {v for k, v in sp.items() if k.startswith("extra_id_")}
        labels = [t for t in out["labels"] if t != IGNORE]
        assert labels[0] in sentinels and labels[-1] == sp["eos"]
        inputs = [t for t in out["input_ids"] if t != sp["pad"]]
        n_spans = sum(t in sentinels for t in labels)
        n_noise = len(labels) - n_spans - 1  # minus the EOS after the targets
        noise, spans = noise + n_noise, spans + n_spans
        real += len(inputs) - n_spans - 1 + n_noise  # inputs: sentinels and EOS replace noise
        run = 0
        for t in labels[1:]:
            if t in sentinels or t == sp["eos"]:
                lengths[run] += 1
                run = 0
            else:
                run += 1
        starts.add(inputs.index(min(sentinels & set(inputs))))
    assert noise / real == pytest.approx(0.15, abs=0.005)
    assert noise / spans == pytest.approx(3.0, abs=0.1)
    assert lengths[1] > 0 and max(lengths) >= 6 and 0 not in lengths  # random span lengths
    assert len(starts) > 20  # the first span moves from seed to seed


def test_show_ul2_every_mode_and_denoiser(shown):
    outs = shown("ul2")
    sp = outs[0]["special_tokens"]
    modes = Counter(out["input_ids"][0] for out in outs)
    assert set(modes) == {sp["nlu"], sp["nlg"], sp["s2s"]}
    # Uniform over seven denoisers: R 2/7, X 4/7, S 1/7.
    for mode, share in ((sp["nlu"], 2 / 7), (sp["nlg"], 4 / 7), (sp["s2s"], 1 / 7)):
        assert modes[mode] / SEEDS == pytest.approx(share, abs=0.08)
    assert {out["extras"]["denoiser"] for out in outs} == set(range(7))


def test_show_prefix_split_is_uniform(shown):
    splits = []
    for out in shown("prefix"):
        labels = out["labels"]
        scored = [i for i, t in enumerate(labels) if t != IGNORE]
        n = sum(t != out["special_tokens"]["pad"] for t in out["input_ids"])
        assert scored == list(range(scored[0], n))  # the whole suffix, nothing else
        splits.append(scored[0] / n)
    assert min(splits) < 0.1 and max(splits) > 0.9
    assert np.mean(splits) == pytest.approx(0.5, abs=0.05)
