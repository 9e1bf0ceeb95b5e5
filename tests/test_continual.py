"""Continual pre-training: init-from, re-warm, mixing with replay, tokenizer extension with
mean-initialised rows, context extension, and the forgetting report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmobjectives.cli import app
from lmobjectives.config import REWARM_FRACTION, build_config, parse_mix
from lmobjectives.errors import UserError
from lmobjectives.evaluate.forgetting import forgetting_report
from lmobjectives.evaluate.positions import PositionLoss, bucket_edges
from lmobjectives.models.resize import add_token_rows
from lmobjectives.store.prepare import prepare_store
from lmobjectives.tokenizer import default_tokenizer_dir, encode_data, load_tokenizer, train_tokenizer
from lmobjectives.tokenizer.extend import EXTENSION_FILE, extend_tokenizer_dir, load_extension
from lmobjectives.train.job import train

TINY = {"steps": 3, "batch_size": 4, "eval_every": 0, "checkpoint_every": 0, "eval_batches": 1}
EMBED = "model.embed_tokens.weight"

WORDS = ("the model reads a page of text and learns which word comes next; a longer "
         "context helps it remember names, numbers and the shape of an argument").split()


def _prose(i: int) -> str:
    rng = np.random.default_rng(i)
    return "\n\n".join(" ".join(rng.choice(WORDS, size=40)) + "." for _ in range(6))


def _code(i: int) -> str:
    # identifiers the shipped tokenizer splits into several pieces, used over and over
    names = ["frobnicate_widget", "zyxquux_total", "gronk_buffer", "plumbus_index"]
    body = [f"def {names[j % 4]}_{i}(gronk_buffer, plumbus_index):\n"
            f"    zyxquux_total = frobnicate_widget(gronk_buffer[plumbus_index])\n"
            f"    return zyxquux_total + {j}\n" for j in range(12)]
    return "\n".join(body)


def _quiet(msg: str) -> None:
    pass


def _train(tree: dict) -> Path:
    result = train(build_config({"objective": "clm", **tree}), progress=False, say=_quiet)
    return result.run_dir


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpora")
    out = {}
    for kind, make in (("prose", _prose), ("code", _code)):
        d = root / kind
        d.mkdir()
        for i in range(8):
            (d / f"{kind}{i}.txt").write_text(make(i))
        out[kind] = d
    return out


@pytest.fixture(scope="module")
def base_run(corpora, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    return _train({"model": {"preset": "tiny"},
                   "data": {"corpus": [str(corpora["prose"])], "tokenizer": str(default_tokenizer_dir()),
                            "seq_len": 32, "val_fraction": 0.25},
                   "train": {**TINY, "lr": 2e-3}, "out": str(out)})


@pytest.fixture(scope="module")
def extended(corpora, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ext") / "tok"
    extend_tokenizer_dir(None, [str(corpora["code"])], 12, out)
    return out


# ------------------------------------------------------------------------------ start
def test_init_from_hf_gpt2_dir(corpora, tmp_path):
    import transformers as tf

    src = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=8192, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)).save_pretrained(src)
    before = load_file(src / "model.safetensors")
    tree = {"model": {"init_from": str(src)}, "data": {"corpus": [str(corpora["prose"])],
            "tokenizer": str(default_tokenizer_dir()), "seq_len": 32}, "train": {**TINY, "steps": 2}}
    run = _train({**tree, "out": str(tmp_path / "run")})
    info = json.loads((run / "run.json").read_text())
    assert info["init"]["model_type"] == "gpt2" and info["init"]["source_run"] is None
    assert info["init"]["model_dir"] == str(src.resolve())
    model = tf.AutoModelForCausalLM.from_pretrained(run / "final")
    assert type(model).__name__ == "GPT2LMHeadModel"
    after = model.state_dict()
    assert not torch.equal(after["transformer.h.0.mlp.c_fc.weight"], before["transformer.h.0.mlp.c_fc.weight"])
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1  # fresh start, not a resume
    with pytest.raises(UserError, match="source run of ours"):  # its peak is unknown
        _train({**tree, "train": {**TINY, "lr_scale": 0.5}, "out": str(tmp_path / "run2")})
    with pytest.raises(UserError, match="absolute positions"):
        _train({**tree, "data": {**tree["data"], "seq_len": 128}, "out": str(tmp_path / "run3")})


def test_eval_and_export_work_after_the_init_from_source_is_gone(corpora, tmp_path):
    """``lmobj eval`` and ``lmobj export`` open the run's spec, not the run: the directory it was
    initialised from may be moved or deleted."""
    import shutil

    import transformers as tf

    from lmobjectives.evaluate.run import evaluate_dir
    from lmobjectives.export import export_checkpoint

    src = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=8192, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)).save_pretrained(src)
    run = _train({"model": {"init_from": str(src)}, "out": str(tmp_path / "run"),
                  "data": {"corpus": [str(corpora["prose"])], "tokenizer": str(default_tokenizer_dir()),
                           "seq_len": 32, "val_fraction": 0.25}, "train": {**TINY, "steps": 2}})
    shutil.rmtree(src)
    res = evaluate_dir(run, n_batches=1, infill_samples=0)
    assert res["loss"] > 0 and res["bits_per_byte"] > 0
    out = export_checkpoint(run / "checkpoints" / "step-0000002", tmp_path / "hf")
    assert load_file(out / "model.safetensors").keys() == load_file(run / "final" / "model.safetensors").keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(out / "model.safetensors").values(),
                                                 load_file(run / "final" / "model.safetensors").values()))


def test_init_from_our_run_rewarms_scales_lr_and_extends_context(base_run, corpora, tmp_path):
    import transformers as tf

    run = _train({"model": {"init_from": str(base_run), "rope_theta": 1e5},
                  "data": {"corpus": [str(corpora["prose"])], "seq_len": 96, "val_fraction": 0.25},
                  "train": {**TINY, "steps": 2, "lr_scale": 0.5}, "out": str(tmp_path / "long")})
    cfg = build_config(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.lr_scale is None
    assert cfg.train.warmup_fraction == REWARM_FRACTION
    init = json.loads((run / "run.json").read_text())["init"]
    assert init["source_run"] == str(base_run.resolve())
    assert init["source_peak_lr"] == 2e-3 and init["lr_scale"] == 0.5 and init["peak_lr"] == pytest.approx(1e-3)
    exported = json.loads((run / "final" / "config.json").read_text())
    assert exported["rope_parameters"]["rope_theta"] == 1e5
    assert exported["max_position_embeddings"] >= 96
    model = tf.AutoModelForCausalLM.from_pretrained(run / "final")
    d = model.config.hidden_size // model.config.num_attention_heads
    want = 1.0 / (1e5 ** (torch.arange(0, d, 2, dtype=torch.float) / d))
    assert torch.allclose(model.model.rotary_emb.inv_freq, want)
    ev = json.loads((run / "eval.json").read_text())
    assert list(ev["loss_by_position"]) == ["0-15", "16-31", "32-63", "64-95"]


def test_position_buckets_worked_example():
    assert bucket_edges(64) == [0, 16, 32, 64]
    assert bucket_edges(16384) == [0, 1024, 2048, 4096, 8192, 16384]
    acc = PositionLoss(64)
    acc.add(np.array([3, 20, 40, 41]), np.array([2.0, 1.0, 0.5, 0.7]))
    assert acc.result() == pytest.approx({"0-15": 2.0, "16-31": 1.0, "32-63": 0.6})


# ------------------------------------------------------------------------------ mixing
def test_mix_serves_exact_shares_and_logs_tokens_by_source(corpora, tmp_path):
    out = tmp_path / "mix"
    res = CliRunner().invoke(app, ["train", "--objective", "clm", "--preset", "tiny", "--mix", f"{corpora['prose']}=0.75",
                                   "--mix", f"{corpora['code']}=0.25", "--tokenizer", str(default_tokenizer_dir()),
                                   "--steps", "4", "--seq-len", "32", "--batch-size", "4", "--out", str(out),
                                   "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--json"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "tokens_by_source" in r]
    assert len(recs) == 4
    for r in recs:
        rows = r["step"] * 4
        served = {k: v / 32 for k, v in r["tokens_by_source"].items()}  # no epoch ends here: full rows
        assert served == {"prose": 0.75 * rows, "code": 0.25 * rows}
    with pytest.raises(UserError, match="PATH=WEIGHT"):
        parse_mix(["nothing"])
    assert parse_mix(["domain/=0.8", "a=b=0.2"]) == [{"path": "domain/", "weight": 0.8},
                                                     {"path": "a=b", "weight": 0.2}]


def test_store_made_with_another_tokenizer_is_refused_with_a_fix(base_run, corpora, tmp_path):
    other = train_tokenizer([_code(i) for i in range(4)], 400)
    store = prepare_store([str(corpora["code"])], other, tmp_path / "store", progress=False)
    with pytest.raises(UserError) as err:
        _train({"model": {"init_from": str(base_run)},
                "data": {"mix": [{"path": str(store.path), "weight": 1.0}], "seq_len": 32},
                "train": TINY, "out": str(tmp_path / "run")})
    msg = str(err.value)
    assert "different tokenizer" in msg and "lmobj prepare" in msg and f"--corpus {corpora['code']}" in msg
    assert f"--tokenizer {base_run / 'final'}" in msg  # re-tokenize with the model's tokenizer


# ------------------------------------------------------------------------------ tokenizer
def test_extend_keeps_old_ids_and_shortens_the_domain(extended, corpora):
    old, new = load_tokenizer(None), load_tokenizer(str(extended))
    ext = load_extension(extended)
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert all(new_vocab[t] == i for t, i in old_vocab.items())
    assert [a.id for a in ext.added] == list(range(8192, 8192 + len(ext.added))) and len(ext.added) == 12
    assert ext.base_fingerprint != ext.fingerprint and ext.base_vocab_size == 8192
    for a in ext.added:  # each new token is a string the old tokenizer split into its pieces
        assert len(a.pieces) >= 2 and old.decode(list(a.pieces)) == a.text
    assert any("frobnicate" in a.text or "zyxquux" in a.text for a in ext.added)
    st_ = ext.stats
    assert st_["tokens_after"] <= st_["tokens_before"] - sum(a.saved for a in ext.added)
    assert st_["bytes_per_token_after"] > st_["bytes_per_token_before"]
    text = _code(99)
    assert len(encode_data(new, [text])[0]) < len(encode_data(old, [text])[0])
    assert json.loads((extended / EXTENSION_FILE).read_text())["base"]["vocab_size"] == 8192


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["frobnicate_widget", "gronk", "_buffer", "zyx", "quux", " ", "\n    ",
                                 "(", ")", "return", "é", "plumbus", "x"]), max_size=30))
def test_extension_never_lengthens_and_round_trips(extended, parts):
    old, new = load_tokenizer(None), load_tokenizer(str(extended))
    text = "".join(parts)
    ids = encode_data(new, [text])[0]
    assert len(ids) <= len(encode_data(old, [text])[0])
    assert new.decode(ids) == text


# ------------------------------------------------------------------------------ embeddings
def test_mean_init_values_exact():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg)
    E0 = model.get_input_embeddings().weight.detach().clone()
    H0 = model.get_output_embeddings().weight.detach().clone()
    ids = add_token_rows(model, {50: [3, 7], 51: [1, 2, 9]})
    E, H = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert ids == [50, 51] and E.shape == (52, 8) and H.shape == (52, 8) and model.config.vocab_size == 52
    assert torch.equal(E[:50], E0) and torch.equal(H[:50], H0)
    assert torch.allclose(E[50], (E0[3] + E0[7]) / 2, atol=0, rtol=1e-6)
    assert torch.allclose(E[51], (E0[1] + E0[2] + E0[9]) / 3, atol=0, rtol=1e-6)
    assert torch.allclose(H[51], (H0[1] + H0[2] + H0[9]) / 3, atol=0, rtol=1e-6)
    # a padded vocabulary: the new id lands on an existing untrained row, which is set too
    add_token_rows(model, {40: [0, 1]})
    assert model.get_input_embeddings().weight.shape[0] == 52
    assert torch.allclose(E[40], (E0[0] + E0[1]) / 2, atol=0, rtol=1e-6)
    with pytest.raises(UserError, match="pieces"):
        add_token_rows(model, {60: [99]})


def test_extended_run_steps0_then_new_rows_first(base_run, extended, corpora, tmp_path):
    tree = {"model": {"init_from": str(base_run)},
            "data": {"corpus": [str(corpora["code"])], "tokenizer": str(extended), "seq_len": 32},
            "train": {**TINY, "steps": 0}}
    base = load_file(base_run / "final" / "model.safetensors")
    ext = load_extension(extended)
    r0 = _train({**tree, "out": str(tmp_path / "s0")})
    w0 = load_file(r0 / "final" / "model.safetensors")
    assert w0[EMBED].shape[0] == 8192 + len(ext.added)
    assert torch.equal(w0[EMBED][:8192], base[EMBED])
    for a in ext.added:
        assert torch.allclose(w0[EMBED][a.id], base[EMBED][list(a.pieces)].mean(0), atol=0, rtol=1e-6)
    info = json.loads((r0 / "run.json").read_text())["init"]
    assert info["new_token_ids"] == len(ext.added)
    r2 = _train({**tree, "train": {**TINY, "steps": 2, "new_embeddings_first": 2}, "out": str(tmp_path / "k")})
    w2 = load_file(r2 / "final" / "model.safetensors")
    assert torch.equal(w2[EMBED][:8192], base[EMBED])
    assert all(torch.equal(w2[k], base[k]) for k in base if k != EMBED)
    assert not torch.equal(w2[EMBED][8192:], w0[EMBED][8192:])  # the new rows did learn
    recs = [json.loads(x) for x in (r2 / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("update") == "new_rows_only" for r in recs if not r.get("eval"))


# ------------------------------------------------------------------------------ forgetting
def test_forgetting_report_keys_and_cli(base_run, corpora, tmp_path):
    run = _train({"model": {"init_from": str(base_run)},
                  "data": {"mix": [{"path": str(corpora["code"]), "weight": 0.8},
                                   {"path": str(corpora["prose"]), "weight": 0.2}],
                           "seq_len": 32, "val_fraction": 0.25},
                  "train": {**TINY, "steps": 2}, "out": str(tmp_path / "cpt")})
    rep = forgetting_report(run, {"prose": str(corpora["prose"]), "code": str(corpora["code"])},
                            base_run, batches=1)
    assert set(rep["datasets"]) == {"prose", "code"}
    for d in rep["datasets"].values():
        assert {"bpb", "baseline_bpb", "gain", "retention", "documents", "split", "bytes",
                "loss_by_position"} <= set(d)
        assert d["retention"] == pytest.approx(d["baseline_bpb"] / d["bpb"])
        assert d["gain"] == pytest.approx(d["baseline_bpb"] - d["bpb"])
        assert d["bytes"] == d["baseline_bytes"] and math.isfinite(d["bpb"])
    assert Path(rep["chart"]).is_file() and (run / "forgetting.json").is_file()
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(run), "--data", f"prose={corpora['prose']}", "--baseline",
                              str(base_run), "--batches", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{"):])["datasets"]["prose"]["retention"] > 0
    res = runner.invoke(app, ["eval", str(run), "--data", str(corpora["code"]), "--batches", "1", "--json"])
    assert res.exit_code == 0, res.output
    single = json.loads(res.stdout[res.stdout.index("{"):])
    assert "bits_per_byte" in single and "loss_by_position" in single


def test_init_from_a_foreign_model_with_its_own_tokenizer(tmp_path, small_corpus):
    """A GPT-2 with its own byte-level tokenizer (no reserved tokens): they are appended,
    the embeddings grow to match, old ids keep their rows, and the result exports."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmobjectives.config import build_config
    from lmobjectives.train.job import train

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src = tmp_path / "gpt2"
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(src)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2,
                                             n_head=2, n_positions=64))
    model.save_pretrained(src)
    old_rows = model.get_input_embeddings().weight.detach().clone()
    res = train(build_config({"objective": "clm", "model": {"init_from": str(src)}, "data": {"corpus": [small_corpus], "seq_len": 32},
                              "train": {"steps": 0, "batch_size": 2}, "out": str(tmp_path / "run")}),
                progress=False)
    out = tf.AutoModelForCausalLM.from_pretrained(res.run_dir / "final")
    new = tf.AutoTokenizer.from_pretrained(res.run_dir / "final")
    assert "<|mask|>" in new.get_vocab() and new.convert_tokens_to_ids("<|endoftext|>") == tok.token_to_id("<|endoftext|>")
    rows = out.get_input_embeddings().weight
    assert rows.shape[0] == len(new) > old_rows.shape[0]
    assert torch.equal(rows[: old_rows.shape[0]], old_rows)  # --steps 0: old rows untouched
