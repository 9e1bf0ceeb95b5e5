"""lm-eval-harness on a trained run, offline: the shipped local task (examples/lm_eval) through
lm-eval's own hf backend, checked against the same log-likelihood choice computed here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import runs_util as ru
from conftest import tiny_tree


TASK = Path(__file__).resolve().parent.parent / "examples" / "lm_eval" / "python_completion.yaml"
TASK_NAME = "lmobj_python_completion"
LIMIT = 6


@pytest.fixture(scope="module")
def decoder_run(small_store, tmp_path_factory) -> Path:
    from lmobjectives.config import build_config
    from lmobjectives.train.job import train

    out = tmp_path_factory.mktemp("lm_eval") / "run"
    train(build_config(tiny_tree(small_store, str(out), steps=2)), progress=False)
    return out


def _own_choices(final: Path, docs: list[dict]) -> list[int]:
    """The choice with the highest summed log-probability, as lm-eval's loglikelihood
    defines it: trailing spaces of the context move to the continuation, whose tokens are
    those of ``context + continuation`` past the context's."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(str(final))
    model = tf.AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32).eval()
    picks = []
    for doc in docs:
        scores = []
        context = doc["context"].rstrip()
        for choice in doc["choices"]:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            whole = tok(doc["context"] + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0]  # (T, V)
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


def test_lm_eval_on_a_run_equals_our_own_loglikelihood_choice(decoder_run):
    code, out, err = ru.run_cli(["eval", str(decoder_run), "--lm-eval", str(TASK),
                                 "--lm-eval-limit", str(LIMIT)])
    assert code == 0, err
    assert TASK_NAME in out and "acc" in out  # lm-eval's table
    saved = json.loads((decoder_run / "lm_eval.json").read_text())
    acc = saved["results"][TASK_NAME]["acc,none"]
    docs = [json.loads(line) for line in TASK.with_suffix(".jsonl").read_text().splitlines()][:LIMIT]
    picks = _own_choices(decoder_run / "final", docs)
    assert acc == pytest.approx(sum(p == d["label"] for p, d in zip(picks, docs)) / LIMIT)


def test_encoder_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ModernBertForMaskedLM"]}))
    code, _, err = ru.run_cli(["eval", str(tmp_path), "--lm-eval", str(TASK)])
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: {tmp_path} holds a ModernBertForMaskedLM, not a causal LM: lm-eval's hf backend "
        "scores decoders only (train a decoder, e.g. --architecture decoder)"]


def test_missing_lm_eval_names_the_extra(decoder_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = ru.run_cli(["eval", str(decoder_run), "--lm-eval", str(TASK)])
    assert code == 2
    assert err.strip() == "error: --lm-eval needs the lm-eval package: pip install 'lmobjectives[lm-eval]'"


def test_task_yaml_must_exist_and_name_a_task(decoder_run, tmp_path):
    code, _, err = ru.run_cli(["eval", str(decoder_run), "--lm-eval", str(tmp_path / "nope.yaml")])
    assert (code, err.strip()) == (2, f"error: task file {tmp_path / 'nope.yaml'} does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_type: multiple_choice\n")
    code, _, err = ru.run_cli(["eval", str(decoder_run), "--lm-eval", str(bad)])
    assert (code, err.strip()) == (2, f"error: {bad}: a task YAML needs a 'task: NAME' key")
