"""Infilling: FIM prompts, stop rules, sentinel infilling, the exact-match metric, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_tree
from lmobjectives.config import build_config
from lmobjectives.errors import UserError
from lmobjectives.evaluate.infill import infill_exact_match, line_tasks
from lmobjectives.infer.api import infill, read_line, showcase
from lmobjectives.infer.infill import (MiddleStop, fim_prompt, fit_context, parse_spans,
                                       sentinel_count)
from lmobjectives.tokenizer import load_tokenizer
from lmobjectives.tokenizer.special import SpecialIds
from lmobjectives.train.job import train

TOY_DOC = "x = 1\n"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def sp(tok) -> SpecialIds:
    return SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size())


@pytest.fixture(scope="module")
def fim_run(tmp_path_factory, tok) -> Path:
    """A tiny decoder trained with FIM only, on one short document repeated: 100 steps are
    enough for it to fill the document's middle back in and close it with EOS (at 40 the
    answer depended on the initial draw)."""
    from lmobjectives.store.prepare import prepare_store

    root = tmp_path_factory.mktemp("fim")
    for i in range(64):
        (root / "corpus").mkdir(exist_ok=True)
        (root / "corpus" / f"d{i}.py").write_text(TOY_DOC)
    prepare_store([str(root / "corpus")], tok, root / "store", val_fraction=0.0, progress=False)
    tree = tiny_tree(str(root / "store"), str(root / "run"), steps=100, batch_size=8, lr=1e-2,
                     seed=1, checkpoint_every=0, warmup_fraction=0.1)
    tree.update(objective="fim", objective_params={"fim_rate": 1.0})
    return train(build_config(tree), progress=False).run_dir


def span_run(store: str, out: Path, objective: str, architecture: str) -> Path:
    tree = tiny_tree(store, str(out), steps=2, checkpoint_every=0)
    tree.update(objective=objective, architecture=architecture)
    return train(build_config(tree), progress=False).run_dir


# ------------------------------------------------------------------------------ prompts
def test_psm_and_spm_prompts_are_exact(tok, sp):
    assert (sp.fim_prefix, sp.fim_middle, sp.fim_suffix) == (103, 104, 105)
    prefix, suffix = tok.encode("def").ids, tok.encode(" x").ids
    assert (prefix, suffix) == ([570], [950])
    assert fim_prompt(prefix, suffix, sp, "psm") == [103, 570, 105, 950, 104]
    assert fim_prompt(prefix, suffix, sp, "spm") == [103, 105, 950, 104, 570]
    assert fim_prompt([], [], sp, "psm") == [103, 105, 104]
    with pytest.raises(ValueError, match="psm"):
        fim_prompt(prefix, suffix, sp, "mps")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 30), st.integers(0, 30), st.integers(0, 70))
def test_fit_context_keeps_the_tokens_nearest_the_middle(n_pre, n_suf, budget):
    pre, suf = list(range(n_pre)), list(range(100, 100 + n_suf))
    p, s = fit_context(pre, suf, budget)
    assert p == pre[len(pre) - len(p):] and s == suf[:len(s)]  # a tail and a head
    assert len(p) + len(s) == min(budget, n_pre + n_suf)  # the whole budget used
    if len(p) < n_pre and len(s) < n_suf:
        assert abs(len(p) - len(s)) <= 1  # both cut: an even split


def test_middle_stop_rules(tok, sp):
    ids = lambda text: tok.encode(text).ids  # noqa: E731
    stop = MiddleStop(tok, sp, suffix="\n    return total\n")
    assert stop(ids("a + b")) is None
    assert stop(ids("a + b") + [sp.eos]) == "eos"
    assert stop(ids("a") + [sp.fim_prefix]) == "special"
    ran_on = ids("a + b\n    return total\n")
    assert stop(ran_on) == "suffix" and stop.middle(ran_on) == "a + b"
    line = MiddleStop(tok, sp, suffix="\n", single_line=True, max_chars=3)
    assert line(ids("ab\ncd")) == "line" and line.middle(ids("ab\ncd")) == "ab"
    assert line(ids("abcd")) == "max_chars"
    assert MiddleStop(tok, sp, suffix="\n)").anchor is None  # too short to mean anything


# ------------------------------------------------------------------------------ FIM runs
def test_tiny_fim_run_infills_and_stops_at_eos(fim_run, sp):
    for mode in ("psm", "spm"):
        res = infill(str(fim_run), prefix="x = ", suffix="\n", mode=mode, max_new_tokens=16)
        assert res["stopped_by"] == "eos" and res["tokens"][-1] == sp.eos
        assert res["forward_passes"] == len(res["tokens"]) < 16
        assert res["text"] == "x = " + res["middle"] + "\n"
    assert "x = " + infill(str(fim_run), prefix="x = ", suffix="\n")["middle"] + "\n" == TOY_DOC
    shown = showcase(str(fim_run), max_new_tokens=4)
    assert set(shown) == {"generation", "infill"} and shown["infill"]["kind"] == "fim"


def test_file_line_through_the_cli(fim_run, tmp_path):
    from typer.testing import CliRunner

    from lmobjectives.cli import app

    f = tmp_path / "code.py"
    f.write_text("y = 2\nx = 1\nz = 3")
    assert read_line(str(f), 2) == ("y = 2\n", "x = 1", "\nz = 3")
    assert read_line(str(f), 3) == ("y = 2\nx = 1\n", "z = 3", "")
    with pytest.raises(UserError, match="3 lines"):
        read_line(str(f), 4)
    out = CliRunner().invoke(app, ["infill", str(fim_run), "--file", str(f), "--line", "2", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output)
    assert res["expected"] == "x = 1" and "\n" not in res["middle"]
    assert res["exact_match"] == (res["middle"] == "x = 1")
    assert res["stopped_by"] in ("eos", "line", "special", "suffix", "length")


@pytest.mark.parametrize("kwargs,words", [
    ({"text": "a <extra_id_0> b"}, "--text fills"),
    ({"prefix": "a", "text": "b"}, "give one of"),
    ({"file": "x.py"}, "go together"),
    ({"prefix": "a", "mode": "pms"}, "psm or spm"),
    ({"prefix": "a", "max_new_tokens": 0}, "at least 1"),
])
def test_options_that_do_not_fit_are_user_errors(fim_run, kwargs, words):
    with pytest.raises(UserError, match=words):
        infill(str(fim_run), **kwargs)


# ------------------------------------------------------------------------------ metric
class OracleLM(torch.nn.Module):
    """Stands in for a decoder: reads the PSM prompt, finds the document it came from and
    answers its middle token by token, then EOS (``wrong``: answers "?!" instead)."""

    def __init__(self, tok, sp: SpecialIds, documents: list[str], wrong: bool = False) -> None:
        import transformers as tf

        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = tf.LlamaConfig(vocab_size=sp.vocab_size, hidden_size=8, num_hidden_layers=1,
                                     num_attention_heads=1, intermediate_size=8)
        self.tok, self.sp, self.documents, self.wrong = tok, sp, documents, wrong
        self.answer: list[int] = []

    def forward(self, input_ids, **_):  # noqa: ANN001, ANN201
        ids = input_ids[0].tolist()
        if len(ids) > 1:  # a prefill: a new prompt
            s, m = ids.index(self.sp.fim_suffix), ids.index(self.sp.fim_middle)
            prefix, suffix = self.tok.decode(ids[1:s]), self.tok.decode(ids[s + 1:m])
            doc = next(d for d in self.documents if d.startswith(prefix) and d.endswith(suffix))
            middle = "?!" if self.wrong else doc[len(prefix):len(doc) - len(suffix)]
            self.answer = self.tok.encode(middle).ids + [self.sp.eos]
        logits = torch.zeros(1, len(ids), self.sp.vocab_size)
        logits[0, -1, self.answer.pop(0)] = 1.0
        return type("Out", (), {"logits": logits})()


def test_exact_match_is_one_for_an_oracle_and_zero_for_a_wrong_model(tok, sp):
    from lmobjectives.infer.load import Loaded

    docs = ["def f(a):\n    return a + 1\n\n\nprint(f(2))\n", "import os\n\nx = os.sep\n"]
    for wrong, expected in ((False, 1.0), (True, 0.0)):
        loaded = Loaded(model=OracleLM(tok, sp, docs, wrong), tokenizer=tok, specials=sp,
                        architecture="decoder", path=Path("."), run_dir=None)
        res = infill_exact_match(loaded, docs, n=5, seed=3)
        assert res == {"exact_match": expected, "samples": 5, "hits": 5 * int(expected)}


def test_line_tasks_are_deterministic_distinct_and_eligible():
    docs = ["a\n\nbb\n" + "c" * 90 + "\nd", "only line"]
    tasks = line_tasks(docs, n=10, seed=1)
    assert tasks == line_tasks(docs, n=10, seed=1)
    assert sorted((t.doc, t.middle) for t in tasks) == [(0, "a"), (0, "bb"), (0, "d"), (1, "only line")]
    for t in tasks:  # the cut gives the document back, the line without its newline
        assert t.prefix + t.middle + t.suffix == docs[t.doc] and "\n" not in t.middle
    assert [t.doc for t in tasks[:2]] == [0, 1]  # round robin over documents


# ------------------------------------------------------------------------------ sentinels
def test_sentinel_parsing():
    sp = SpecialIds.default()
    s0, s1, s2 = sp.sentinels[:3]
    assert parse_spans([s0, 307, 308, s1, 309, sp.eos, 305], sp, 2) == [[307, 308], [309]]
    assert parse_spans([306, s1, 309, s2, 304], sp, 2) == [None, [309]]  # s2 is past the text's spans
    assert sentinel_count("a <extra_id_0> b <extra_id_1>") == 2
    with pytest.raises(ValueError, match="in order"):
        sentinel_count("a <extra_id_1> b")


def test_encoder_decoder_cached_decoding_equals_full_recompute():
    from lmobjectives.infer.generate import decode_until
    from lmobjectives.infer.infill import encoder_decoder_rungs
    from lmobjectives.models.presets import build_model

    sp = SpecialIds.default(512)
    model = build_model("tiny", "encoder_decoder", sp, 64, seed=3).eval()
    prompt = [300, 301, sp.sentinels[0], 302, sp.eos]
    got = decode_until(*encoder_decoder_rungs(model, prompt, sp.pad), lambda _: None,
                       max_new_tokens=6).tokens
    dec = [sp.pad]
    with torch.no_grad():
        for _ in range(6):  # the reference: the whole decoder input again for every token
            logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([dec])).logits
            dec.append(int(logits[0, -1].argmax()))
    assert got == dec[1:]


def test_sentinel_infill_on_tiny_span_runs(small_store, tmp_path, sp):
    text = "def add(a, b):\n    return<extra_id_0>\n\nprint(<extra_id_1>)\n"
    for arch, name in (("encoder_decoder", "t5"), ("decoder", "plm")):
        run = span_run(small_store, tmp_path / name, "span", arch)
        want = "encoder_decoder" if arch == "encoder_decoder" else "prefix_lm"
        assert json.loads((run / "run.json").read_text())["architecture"] == want
        res = infill(str(run), text=text, max_new_tokens=12)
        assert res["kind"] == "sentinels" and len(res["spans"]) == 2
        assert res["stopped_by"] in ("eos", "complete", "length")
        assert "<extra_id_" not in res["text"]
        assert res["text"].startswith("def add(a, b):\n    return")
        assert res["forward_passes"] == len(res["tokens"])
        with pytest.raises(UserError, match="--text with <extra_id_N>"):
            infill(str(run), prefix="a", suffix="b")
        with pytest.raises(UserError, match="no sentinel"):
            infill(str(run), text="no gaps here")


def test_decoder_is_an_alias_of_prefix_lm_for_span_objectives():
    assert build_config({"objective": "span", "architecture": "decoder"}).architecture == "prefix_lm"
    assert build_config({"objective": "ul2", "architecture": "decoder"}).architecture == "prefix_lm"
    assert build_config({"objective": "clm", "architecture": "decoder"}).architecture == "decoder"
    with pytest.raises(UserError, match="mlm"):
        build_config({"objective": "mlm", "architecture": "decoder"})
    assert build_config({}).objective == "fim"  # the default job is a code model
