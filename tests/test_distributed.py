"""Several processes (gloo on CPU): 2 ranks make the updates of 1 process with twice the
accumulation, resume bit-exactly, refuse or reshard another world size, and a failure on one
rank ends both with its message.

One torchrun start (``distributed_jobs.py``) trains every 2-process run in one process
group; the 1-process references train here, while it runs.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import lmobjectives
from lmobjectives.config import build_config
from lmobjectives.errors import UserError
from lmobjectives.objectives import OBJECTIVES
from lmobjectives.rundir import load_run_config
from lmobjectives.train.job import train
from lmobjectives.train.distributed import World, parallelize, reshard_loader_state
from lmobjectives.train.launch import should_launch
from lmobjectives.train.loop import Trainer
from lmobjectives.train.setup import open_run

HERE = Path(__file__).parent
SRC = Path(lmobjectives.__file__).parents[1]
STEPS = 4
# Objectives whose rows carry a variable number of scored tokens: the global count matters.
VARIABLE_TARGETS = [o for o in ("mlm", "span") if o in OBJECTIVES]
WORDS = ("the a model learns to predict tokens from text data while training runs on many "
         "machines with care and speed").split()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_store(root: Path) -> Path:
    """~750 training tokens: the 32 rows of 32 tokens that 4 steps read cross the end of an
    epoch, so some rows end in PAD."""
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(14):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 70)))
        (corpus / f"doc{i:02d}.txt").write_text(words + ".\n")
    prepare_store([str(corpus)], load_tokenizer(None), root / "store", val_fraction=0.1, progress=False)
    return root / "store"


# 2-process equivalence runs beyond CLM: every objective family on the decoder, the
# encoder(-decoder) ones on theirs, and both MTP head designs (two heads).
MTP_PARAMS = {"mtp-parallel": {"n_heads": 2, "head_design": "parallel"},
              "mtp-sequential": {"n_heads": 2, "head_design": "sequential"}}
EQUIVALENCE = [*VARIABLE_TARGETS, *[o for o in ("fim", "ul2", "prefix") if o in OBJECTIVES],
               *(MTP_PARAMS if "mtp" in OBJECTIVES else [])]


def config(store: Path, objective: str = "clm", strategy: str = "ddp", **train_keys) -> dict:
    params = MTP_PARAMS.get(objective)
    objective = "mtp" if params else objective
    return {"objective": objective, "objective_params": params or {},
            "data": {"store": str(store), "seq_len": 32},
            "model": {"preset": "tiny", "precision": "fp32"},
            "train": {"steps": STEPS, "batch_size": 4, "checkpoint_every": 2, "eval_batches": 3,
                      "warmup_fraction": 0.0, "lr": 1e-2, **train_keys},
            "distributed": {"strategy": strategy}}


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if not r.get("eval")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    store = make_store(root)
    out = {name: root / name for name in ("ddp-clm", "fsdp-clm", "ddp-clm-resumed", "fsdp-clm-resumed")}
    jobs = [{"out": str(out["ddp-clm"]), "config": config(store)},
            {"out": str(out["fsdp-clm"]), "config": config(store, strategy="fsdp")}]
    for strategy in ("ddp", "fsdp"):  # the chunked loss through each wrapper's forward
        out[f"{strategy}-clm-chunked"] = root / f"{strategy}-clm-chunked"
        jobs.append({"out": str(out[f"{strategy}-clm-chunked"]),
                     "config": config(store, strategy=strategy, loss_chunks=3)})
    out["ddp-clm-prefetch"] = root / "ddp-clm-prefetch"  # each rank prepares its next step
    prefetching = config(store)
    prefetching["data"]["prefetch"] = True
    jobs.append({"out": str(out["ddp-clm-prefetch"]), "config": prefetching})
    for objective in EQUIVALENCE:
        out[f"ddp-{objective}"] = root / f"ddp-{objective}"
        jobs.append({"out": str(out[f"ddp-{objective}"]), "config": config(store, objective)})
    for objective in MTP_PARAMS if "mtp" in OBJECTIVES else []:  # the model's parts under FSDP
        out[f"fsdp-{objective}"] = root / f"fsdp-{objective}"
        jobs.append({"out": str(out[f"fsdp-{objective}"]), "config": config(store, objective, strategy="fsdp")})
    if "mlm" in OBJECTIVES:  # the head applied to the scored rows, after FSDP's forward
        out["fsdp-mlm"] = root / "fsdp-mlm"
        jobs.append({"out": str(out["fsdp-mlm"]), "config": config(store, "mlm", strategy="fsdp")})
    for strategy in ("ddp", "fsdp"):
        jobs.append({"out": str(out[f"{strategy}-clm-resumed"]), "config": config(store, strategy=strategy),
                     "resume_from": str(out[f"{strategy}-clm"])})
    spec = root / "jobs.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node=2", str(HERE / "distributed_jobs.py"), str(spec)],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for objective in ["clm", *EQUIVALENCE]:  # the references, meanwhile
            out[f"one-{objective}"] = root / f"one-{objective}"
            tree = {**config(store, objective, grad_accum=2), "out": str(out[f"one-{objective}"])}
            train(build_config(tree), progress=False, say=lambda m: None)
        log, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]
    out["store"] = store
    return out


def test_the_runs_read_padded_rows(runs):
    """The 2 * STEPS global micro-batches the CLM runs train on include PAD."""
    from lmobjectives.data.loader import Loader, PackedSource
    from lmobjectives.store.store import TokenStore
    from lmobjectives.tokenizer import load_tokenizer
    from lmobjectives.tokenizer.special import SpecialIds

    tok = load_tokenizer(None)
    pad = SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size()).pad
    src = PackedSource(TokenStore(runs["store"]).split("train"), 32, seed=0, pad=pad)
    loader = Loader([src], batch_size=4)
    assert any((loader.batch(g)[0].tokens == pad).any() for g in range(2 * STEPS))


@pytest.mark.parametrize("name", ["ddp-clm", "fsdp-clm", "ddp-clm-chunked", "fsdp-clm-chunked",
                                  *[f"ddp-{o}" for o in EQUIVALENCE],
                                  *[f"fsdp-{o}" for o in MTP_PARAMS if "mtp" in OBJECTIVES],
                                  *(["fsdp-mlm"] if "mlm" in OBJECTIVES else []),
                                  *[pytest.param(f"ddp-{o}", marks=pytest.mark.skip(
                                      reason=f"objective '{o}' is not registered in this tree"))
                                    for o in ("mlm", "span", "fim", "ul2", "prefix", "mtp")
                                    if o not in OBJECTIVES]])
def test_two_processes_make_the_updates_of_one_with_twice_the_accumulation(runs, name):
    """Loss alone would hide a gradient-scale error (AdamW normalises it away, clipping caps
    it): the gradient norm before clipping and the weights after the last step must agree too."""
    reference = runs[f"one-{name.split('-', 1)[1].removesuffix('-chunked')}"]
    two, one = losses(runs[name]), losses(reference)
    assert sorted(two) == list(range(1, STEPS + 1)) == sorted(one)
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), f"loss at step {step}"
    norm2, norm1 = losses(runs[name], "grad_norm"), losses(reference, "grad_norm")
    for step in one:
        assert norm2[step] == pytest.approx(norm1[step], rel=1e-4), f"grad_norm at step {step}"
    files = ["model.safetensors", *(["mtp_heads.safetensors"] if "mtp" in name else [])]
    a = {f"{f}:{k}": v for f in files for k, v in load_file(runs[name] / "final" / f).items()}
    b = {f"{f}:{k}": v for f in files for k, v in load_file(reference / "final" / f).items()}
    assert a.keys() == b.keys()
    for k in a:
        if name.endswith("-chunked"):
            # The chunked loss sums the head's gradient in another order; AdamW's normalisation
            # can turn that rounding into an lr-sized step where a gradient is near zero, so
            # single elements may differ: compare each tensor as a whole.
            assert float((a[k] - b[k]).norm() / b[k].norm()) < 1e-3, k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert one[STEPS] < one[1]  # it trained


@pytest.mark.parametrize("name", ["ddp-clm", "fsdp-clm", *[f"ddp-{o}" for o in VARIABLE_TARGETS]])
def test_evaluation_on_two_processes_equals_one(runs, name):
    """Under DDP each rank scores its share of the 3 evaluation batches (2 + 1) and the sums
    are all-reduced; under FSDP both score all 3. Either way: one process's numbers."""
    two = json.loads((runs[name] / "eval.json").read_text())
    one = json.loads((runs[f"one-{name.split('-', 1)[1]}"] / "eval.json").read_text())
    assert two.keys() == one.keys() and "loss" in one
    for key, value in one.items():
        if isinstance(value, float):
            assert two[key] == pytest.approx(value, rel=1e-5), key
        elif key != "loss_by_position":
            assert two[key] == value, key
    for bucket, value in one.get("loss_by_position", {}).items():
        assert two["loss_by_position"][bucket] == pytest.approx(value, rel=1e-5), bucket


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_on_the_same_world_size_is_bit_exact(runs, strategy):
    whole, resumed = runs[f"{strategy}-clm"], runs[f"{strategy}-clm-resumed"]
    assert losses(resumed) == losses(whole)  # steps 1-2 kept, 3-4 redone: equal floats
    assert_same_weights(whole / "final", resumed / "final")


def test_two_processes_prefetching_train_as_without(runs):
    """Each rank prepares its own next step in the background: the same floats, bit for bit."""
    assert losses(runs["ddp-clm-prefetch"]) == losses(runs["ddp-clm"])
    assert losses(runs["ddp-clm-prefetch"], "grad_norm") == losses(runs["ddp-clm"], "grad_norm")
    assert_same_weights(runs["ddp-clm-prefetch"] / "final", runs["ddp-clm"] / "final")


def test_the_gathered_fsdp_export_matches_ddp(runs):
    a, b = (load_file(runs[name] / "final" / "model.safetensors") for name in ("ddp-clm", "fsdp-clm"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_a_sharded_checkpoint_exports_as_the_final_model(runs, tmp_path):
    from lmobjectives.export import export_checkpoint

    export_checkpoint(runs["fsdp-clm"] / "checkpoints" / f"step-{STEPS:07d}", tmp_path / "hf")
    assert_same_weights(runs["fsdp-clm"] / "final", tmp_path / "hf")


def resume_here(run_dir: Path, copy: Path, allow_reshard: bool = False) -> Trainer:
    """Resume a 2-process run in this single process (a world of one)."""
    sys.path.insert(0, str(HERE))
    from distributed_jobs import copy_without_last_checkpoint

    copy_without_last_checkpoint(run_dir, copy)
    run = open_run(load_run_config(copy), copy, progress=False)
    parallelize(run, World())
    trainer = Trainer(run, progress=False)
    trainer.resume(allow_reshard=allow_reshard)
    return trainer


def test_another_world_size_is_refused(runs, tmp_path):
    with pytest.raises(UserError, match=r"written by 2 process\(es\), this run has 1.*--allow-reshard"):
        resume_here(runs["ddp-clm"], tmp_path / "copy")


def test_fsdp_reshards_to_one_process_when_allowed(runs, tmp_path):
    trainer = resume_here(runs["fsdp-clm"], tmp_path / "copy", allow_reshard=True)
    assert trainer.step == 2 and trainer.loader.counter == 2 * 2  # global micro-batches 0-3 done
    assert "resharded from 2 to 1" in trainer.reshard_note
    ddp = load_file(runs["ddp-clm"] / "checkpoints" / "step-0000002" / "model.safetensors")
    state = trainer.run.model.state_dict()
    for k in ddp:
        torch.testing.assert_close(state[k], ddp[k], rtol=1e-4, atol=1e-5)
    # The Adam moments came through: equal to the 2-process DDP run's at step 2 (a fresh
    # optimizer would have none; FSDP vs DDP differ by reduction order only).
    saved = torch.load(runs["ddp-clm"] / "checkpoints" / "step-0000002" / "optimizer.pt", weights_only=True)
    restored = trainer.optimizer.state_dict()["state"]
    assert sorted(restored) == sorted(saved["state"]) and len(restored) > 0
    for i, moments in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(restored[i][key], moments[key], rtol=1e-4, atol=1e-7)
        assert float(restored[i]["step"]) == 2
    trainer.fit()  # and it trains on
    assert trainer.step == STEPS
    assert (tmp_path / "copy" / "checkpoints" / f"step-{STEPS:07d}" / ".metadata").is_file()


def test_lmobj_verify_checks_a_sharded_checkpoint_and_names_a_damaged_file(runs, tmp_path):
    """``lmobj verify`` on a 2-process FSDP run passes; one flipped byte in a shard file makes
    it fail (exit 2) naming that file."""
    import shutil

    run = tmp_path / "fsdp"
    shutil.copytree(runs["fsdp-clm"], run)
    lmobj = [sys.executable, "-m", "lmobjectives.cli", "verify", "--json", str(run)]
    ok = subprocess.run(lmobj, env=env(), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    kinds = [r["kind"] for r in report["checkpoints"]]
    assert report["ok"] and kinds == ["checkpoint"] * (STEPS // 2) + ["model"]  # + final/
    ckpt = run / "checkpoints" / f"step-{STEPS:07d}"
    shard = sorted(ckpt.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = subprocess.run(lmobj[:-2] + [str(run)], env=env(), capture_output=True, text=True)
    assert bad.returncode == 2
    assert f"checkpoint file {shard} is corrupt" in bad.stdout + bad.stderr


def test_crafted_checkpoint_metadata_runs_no_code(runs, tmp_path):
    import shutil

    from lmobjectives.checkpoint.sharded import load_sharded
    from lmobjectives.util import sha256_file, stable_hash

    ckpt = tmp_path / "step-0000002"
    shutil.copytree(runs["fsdp-clm"] / "checkpoints" / "step-0000002", ckpt)
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    (ckpt / ".metadata").write_bytes(pickle.dumps(Evil()))
    table = json.loads((ckpt / "checksums.json").read_text())
    table["files"][".metadata"] = sha256_file(ckpt / ".metadata")
    table["self"] = stable_hash(table["files"])
    (ckpt / "checksums.json").write_text(json.dumps(table))
    run = open_run(load_run_config(runs["fsdp-clm"]), runs["fsdp-clm"], progress=False)
    with pytest.raises(UserError, match="cannot load checkpoint.*not allowed"):
        load_sharded(ckpt, run.model, None)
    assert not sentinel.exists()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 64), st.integers(1, 64))
def test_resharding_serves_no_micro_batch_twice_and_skips_fewer_than_a_round(counter, old, new):
    state, _ = reshard_loader_state({"counter": counter, "world_size": old, "rank": 0}, old, new)
    served, next_first = counter * old, state["counter"] * new
    assert served <= next_first < served + new


def test_activation_checkpointing_recomputes_to_the_same_gradients():
    from lmobjectives.models.presets import build_model
    from lmobjectives.tokenizer.special import SpecialIds
    from lmobjectives.train.distributed import enable_activation_checkpointing

    specials = SpecialIds.default(vocab_size=512)
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = build_model("tiny", "decoder", specials, max_positions=32, seed=0)
        model.config.use_cache = False
        if checkpointing:
            enable_activation_checkpointing(model)
            assert model.is_gradient_checkpointing
        model.train()
        model(input_ids=ids).logits.float().logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_nproc_inside_torchrun_must_match(monkeypatch):
    assert should_launch(None) is False and should_launch(1) is False
    with pytest.raises(UserError, match="at least 1"):
        should_launch(0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert should_launch(2) is True
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert should_launch(4) is False  # already a worker: train here
    with pytest.raises(UserError, match="inside a torchrun job of 4"):
        should_launch(2)


def test_a_failure_on_one_rank_ends_every_rank_with_its_message(runs, tmp_path):
    """``lmobj train --nproc 2`` (the shortcut starts torchrun) whose rank 1 fails at step 2."""
    args = ["train", "--objective", "clm", "--data", str(runs["store"]), "--preset", "tiny", "--seq-len", "32",
            "--batch-size", "4", "--steps", str(STEPS), "--set", "model.precision=fp32",
            "--nproc", "2", "--json", "--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, str(HERE / "distributed_fail.py"), *args], env=env(),
                          capture_output=True, text=True, timeout=300)
    message = "no space left on device (injected on rank 1)"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: rank 1: {message}" in proc.stderr
    assert f"error: rank 0 stopped because rank 1 failed: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr and "SIGKILL" not in proc.stderr
    assert not (tmp_path / "run" / "final").exists()


def test_a_killed_worker_restarts_and_the_run_resumes(runs, tmp_path):
    """torchrun --max-restarts 1 with rank 1 killed at step 3: both workers start again, find
    the run in --out with the same config, resume from step 2, and log what the uninterrupted
    2-process run logged."""
    import yaml

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(config(runs["store"])))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "--max-restarts=1", str(HERE / "distributed_restart.py"),
                           "train", str(cfg_file), "--out", str(out), "--resume-if-exists"],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ": new; objective clm" in proc.stderr and "resumed from step-0000002" in proc.stderr
    assert losses(out) == losses(runs["ddp-clm"])
    assert_same_weights(runs["ddp-clm"] / "final", out / "final")

