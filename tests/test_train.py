"""End-to-end CLM training: exact resume, accumulation, export, eval, generate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_tree
from lmobjectives.config import build_config
from lmobjectives.train.job import train


def losses(run_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if not rec.get("eval"):
            out.append((rec["step"], rec[key]))
    return out


def interrupt_after_first_checkpoint(src: Path, dst: Path) -> None:
    """``dst``: the run ``src`` as a crash after its step-3 checkpoint (and one more logged
    step) leaves it: later checkpoints, the export and later metric lines gone."""
    shutil.copytree(src, dst)
    for later in sorted((dst / "checkpoints").glob("step-*"))[1:]:
        shutil.rmtree(later)
    shutil.rmtree(dst / "final")
    cut = [l for l in (dst / "metrics.jsonl").read_text().splitlines() if json.loads(l)["step"] <= 4]
    (dst / "metrics.jsonl").write_text("\n".join(cut) + "\n")  # a line past the checkpoint too


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


# Every objective family, each on its default architecture (span on the encoder-decoder).
RESUME_OBJECTIVES = [("clm", None), ("fim", None), ("mlm", None), ("span", "encoder_decoder"),
                     ("ul2", None), ("prefix", None)]


@pytest.mark.parametrize("objective,architecture", RESUME_OBJECTIVES, ids=[o for o, _ in RESUME_OBJECTIVES])
def test_resume_is_bit_identical(small_store, tmp_path, objective, architecture):
    """Resumed from step 3: every later loss and gradient norm, the final weights and the Adam
    moments of the last checkpoint are bit for bit those of the uninterrupted run."""
    from safetensors.torch import load_file

    def tree(out: Path) -> dict:
        t = {**tiny_tree(small_store, str(out)), "objective": objective}
        return {**t, "architecture": architecture} if architecture else t

    a = train(build_config(tree(tmp_path / "a")), progress=False)
    b_dir = tmp_path / "b"
    interrupt_after_first_checkpoint(a.run_dir, b_dir)
    res = train(build_config(tree(b_dir)), resume=b_dir, progress=False)
    assert res.started == "resumed from step-0000003"
    assert losses(a.run_dir) == losses(b_dir)  # exact floats, every step
    assert losses(a.run_dir, "grad_norm") == losses(b_dir, "grad_norm")
    assert [s for s, _ in losses(b_dir)] == [1, 2, 3, 4, 5, 6]
    assert_same_tensors(load_file(a.run_dir / "final" / "model.safetensors"),
                        load_file(b_dir / "final" / "model.safetensors"), "final weights")
    last = "checkpoints/step-0000006/optimizer.pt"
    opt_a, opt_b = (torch.load(d / last, weights_only=True)["state"] for d in (a.run_dir, b_dir))
    assert opt_a.keys() == opt_b.keys() and len(opt_a) > 0
    for i in opt_a:
        assert_same_tensors({k: opt_a[i][k] for k in ("exp_avg", "exp_avg_sq")},
                            {k: opt_b[i][k] for k in ("exp_avg", "exp_avg_sq")}, f"Adam moments of parameter {i}")


def test_accumulation_equals_big_batch(small_store, tmp_path):
    """Two micro-batches of 2 rows make the update of one batch of 4: the same losses, the
    same gradient norms before clipping (a gradient-scale error, e.g. dividing by one
    micro-batch's count, doubles the norm even where AdamW's normalisation hides it in the
    loss) and the same weights after the last step. In fp32: under bf16 autocast ("auto" on a
    CPU that has it) the two differ by bf16 rounding, 5e-5 on the first gradient norm."""
    def fp32(tree: dict) -> dict:
        return {**tree, "model": {**tree["model"], "precision": "fp32"}}

    big = train(build_config(fp32(tiny_tree(small_store, str(tmp_path / "big"), batch_size=4, steps=3))),
                progress=False)
    acc = train(build_config(fp32(tiny_tree(small_store, str(tmp_path / "acc"), batch_size=2, grad_accum=2,
                                            steps=3))), progress=False)
    for key in ("loss", "grad_norm"):
        la, lb = losses(big.run_dir, key), losses(acc.run_dir, key)
        assert [s for s, _ in la] == [s for s, _ in lb] == [1, 2, 3]
        assert [v for _, v in la] == pytest.approx([v for _, v in lb], rel=1e-5), key
    from safetensors.torch import load_file

    a, b = (load_file(r.run_dir / "final" / "model.safetensors") for r in (big, acc))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_export_loads_in_transformers_with_equal_logits(small_store, tmp_path):
    import transformers as tf

    from lmobjectives.checkpoint import load_checkpoint
    from lmobjectives.train.setup import open_run

    res = train(build_config(tiny_tree(small_store, str(tmp_path / "r"), steps=3)), progress=False)
    hf = tf.AutoModelForCausalLM.from_pretrained(res.run_dir / "final").eval()
    run = open_run(build_config(tiny_tree(small_store, str(res.run_dir), steps=3)), res.run_dir, progress=False)
    load_checkpoint(res.run_dir / "checkpoints" / "step-0000003", run.model, None)
    ids = torch.tensor([[5, 900, 33, 401, 7, 0, 80, 81]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, run.model.eval()(ids).logits)
    tok = tf.AutoTokenizer.from_pretrained(res.run_dir / "final")
    assert tok.decode(tok("def f(x):\n  return x")["input_ids"]) == "def f(x):\n  return x"


def test_packed_documents_do_not_see_each_other():
    from lmobjectives.models.presets import build_model
    from lmobjectives.tokenizer.special import SpecialIds

    sp = SpecialIds.default(512)
    model = build_model("tiny", "decoder", sp, 64, seed=0).eval()
    # Training runs without a KV cache (open_run sets use_cache=False); only then does
    # transformers turn restarting position ids into a block-diagonal mask.
    doc1, doc2 = [300, 301, 302, sp.eos], [400, 401, 402, 403]
    packed = torch.tensor([doc1 + doc2])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad():
        both = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0, 4:]
        alone = model(input_ids=torch.tensor([doc2]), use_cache=False).logits[0]
    assert torch.allclose(both, alone, atol=1e-5)


def test_loss_matches_transformers_own_loss():
    from lmobjectives.data.converters import to_decoder
    from lmobjectives.loss import token_nll_sum
    from lmobjectives.models.presets import build_model
    from lmobjectives.objectives import CLM, Rows
    from lmobjectives.tokenizer.special import SpecialIds

    sp = SpecialIds.default(512)
    model = build_model("tiny", "decoder", sp, 64, seed=1).eval()
    rows = Rows.from_tokens(np.array([[300, 301, 302, 303, 304, 305, sp.eos, 1]]), sp.eos)
    batch = to_decoder(CLM(specials=sp)(rows, np.random.default_rng(0)), sp)
    ids, labels = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["labels"])
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=labels).loss
        nll, _ = token_nll_sum(model(input_ids=ids).logits, labels, shift=True)
    n = int((labels[:, 1:] != -100).sum())
    assert n == 6  # seven real tokens; the first is never a target, PAD never is
    assert torch.allclose(nll / n, hf_loss, atol=1e-6)


def test_eval_generate_and_final_artifacts(small_store, tmp_path):
    from lmobjectives.evaluate.run import evaluate_dir
    from lmobjectives.infer.api import generate_text

    res = train(build_config(tiny_tree(small_store, str(tmp_path / "r"), steps=4, eval_every=2)),
                progress=False)
    d = res.run_dir
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "final/config.json", "eval.json"):
        assert (d / name).is_file(), name
    records = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if not r.get("eval")]
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_second"):
        assert all(key in r for r in train_recs), key
    assert any(r.get("eval") for r in records)
    ev = evaluate_dir(d, n_batches=2)
    assert set(ev) >= {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"}
    assert ev["perplexity"] == pytest.approx(np.exp(ev["loss"]))
    assert 0 < ev["bits_per_byte"] < 20
    g1 = generate_text(str(d), "def ", max_new_tokens=8)
    g2 = generate_text(str(d), "def ", max_new_tokens=8)
    assert g1 == g2 and len(g1["tokens"]) <= 8 and g1["forward_passes"] == len(g1["tokens"])


def test_kv_cache_generation_equals_full_recompute():
    from lmobjectives.infer.generate import generate
    from lmobjectives.models.presets import build_model
    from lmobjectives.tokenizer.special import SpecialIds

    sp = SpecialIds.default(512)
    model = build_model("tiny", "decoder", sp, 64, seed=2).eval()
    prompt = [0, 300, 301, 302]
    got = generate(model, prompt, max_new_tokens=10).tokens
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_export_command_writes_any_checkpoint(small_store, tmp_path):
    import transformers as tf

    from lmobjectives.export import export_checkpoint

    res = train(build_config(tiny_tree(small_store, str(tmp_path / "r"), steps=6)), progress=False)
    out = export_checkpoint(res.run_dir / "checkpoints" / "step-0000003", tmp_path / "x")
    early = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    final = tf.AutoModelForCausalLM.from_pretrained(res.run_dir / "final").eval()
    ids = torch.tensor([[5, 900, 33, 401]])
    with torch.no_grad():
        assert not torch.equal(early(ids).logits, final(ids).logits)  # step 3, not step 6
    assert (out / "tokenizer.json").is_file()
