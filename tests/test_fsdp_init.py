"""FSDP from the meta device (gloo, 2 CPU processes): the model is built on ``meta`` and
initialised and sharded block by block (``models/init.py``, ``train/distributed.py:
shard_model``); gathered, its initial weights equal a one-process build of the same seed."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lmobjectives.config import build_config
from lmobjectives.objectives import OBJECTIVES
from lmobjectives.train.setup import open_run
from test_distributed import HERE, MTP_PARAMS, VARIABLE_TARGETS, config, env, make_store


def test_fsdp_builds_on_meta_and_its_gathered_initial_weights_equal_one_process(tmp_path):
    """Under FSDP on 2 processes the model is built on the meta device and initialised block
    by block; gathered, its weights (tied embedding included) and buffers (rotary tables) are
    those of a one-process build of the same seed. With ``--init-from`` the loaded weights."""
    from safetensors import safe_open

    from lmobjectives.export import export_model
    from lmobjectives.models.presets import build_model
    from lmobjectives.tokenizer import load_tokenizer
    from lmobjectives.tokenizer.special import SpecialIds

    store = make_store(tmp_path)
    tok = load_tokenizer(None)
    specials = SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size())
    export_model(build_model("tiny", "decoder", specials, max_positions=64, seed=5), tok, tmp_path / "hf")
    cases = {o: config(store, o, strategy="fsdp", seed=3) for o in ["clm", *MTP_PARAMS, *VARIABLE_TARGETS]
             if o in OBJECTIVES or o in MTP_PARAMS and "mtp" in OBJECTIVES}
    cases["init-from"] = {**config(store, strategy="fsdp"),
                          "model": {"init_from": str(tmp_path / "hf"), "precision": "fp32"}}
    jobs = [{"config": tree, "run_dir": str(tmp_path / name), "weights": str(tmp_path / f"{name}.safetensors")}
            for name, tree in cases.items()]
    (tmp_path / "jobs.json").write_text(json.dumps({"jobs": jobs}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(HERE / "distributed_init.py"), str(tmp_path / "jobs.json")],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for name, tree in cases.items():
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            got = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        assert meta == {"built_on_meta": str(name != "init-from"), "tied": "True"}, name
        if name == "init-from":
            want = load_file(tmp_path / "hf" / "model.safetensors")
            got = {k: v for k, v in got.items() if not k.startswith("buffer:") and k in want}
        else:
            one = open_run(build_config(tree), tmp_path / f"{name}-one", progress=False)
            want = {**one.model.state_dict(), **{f"buffer:{k}": b for k, b in one.model.named_buffers()}}
            assert any("inv_freq" in k for k in want) or "span" in name, name  # rotary tables compared
        assert got.keys() == want.keys(), name
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name}: {k}"
