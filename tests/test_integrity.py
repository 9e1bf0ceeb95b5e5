"""Checkpoint integrity and loading safety: every flipped byte is caught by its SHA-256 and
named; crafted pickles are refused without running; nothing in the library unpickles
without ``weights_only=True`` or trusts remote code by default."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch

import runs_util as ru
from lmobjectives.checkpoint import (CHECKSUMS, load_checkpoint, list_checkpoints, verify_checkpoint,
                                     verify_run)
from lmobjectives.errors import UserError
from lmobjectives.util import sha256_file, stable_hash

SRC = Path(__file__).parents[1] / "src" / "lmobjectives"
FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json", CHECKSUMS)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    store = ru.make_store(root, n_docs=12, words=40)
    code, _, err = ru.run_cli(ru.tiny_args(store, root / "run", 4, every=2))
    assert code == 0, err
    return root / "run"


@pytest.fixture
def ckpt(run, tmp_path) -> Path:
    """A private copy of the run's newest checkpoint, inside a run-shaped directory."""
    import shutil

    dst = tmp_path / "run" / "checkpoints" / "step-0000004"
    shutil.copytree(list_checkpoints(run)[-1], dst)
    return dst


def flip_byte(path: Path, at: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1 << bit
    path.write_bytes(bytes(data))


def reseal(ckpt: Path) -> None:
    """Recompute checksums.json, as someone handing over a crafted checkpoint would."""
    files = {f.name: sha256_file(f) for f in sorted(ckpt.iterdir()) if f.name != CHECKSUMS}
    (ckpt / CHECKSUMS).write_text(json.dumps({"files": files, "self": stable_hash(files)}))


@pytest.mark.parametrize("name", FILES)
def test_any_flipped_byte_is_named(ckpt, name):
    """First, middle and last byte of every file, each a different bit: all caught, and the
    message names the damaged file (never another one)."""
    f = ckpt / name
    original = f.read_bytes()
    n = len(original)
    for at, bit in ((0, 0), (n // 2, 3), (n - 2, 6), (n - 1, 7)):
        flip_byte(f, at, bit)
        with pytest.raises(UserError) as exc:
            verify_checkpoint(ckpt)
        assert str(f) in str(exc.value), (at, bit, str(exc.value))
        f.write_bytes(original)
    verify_checkpoint(ckpt)


def test_verify_cli_names_the_file_and_exits_2(ckpt):
    run_dir = ckpt.parents[1]
    assert ru.run_cli(["verify", str(run_dir)])[0] == 0
    flip_byte(ckpt / "optimizer.pt", 200, 2)
    code, out, err = ru.run_cli(["verify", str(run_dir)])
    assert code == 2 and "Traceback" not in err
    assert f"CORRUPT   {ckpt}: checkpoint file {ckpt / 'optimizer.pt'} is corrupt" in out
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        f"error: 1 of 1 checkpoint(s) in {run_dir} failed verification (first: checkpoint file "
        f"{ckpt / 'optimizer.pt'} is corrupt (SHA-256 mismatch))"]


def test_verify_run_reports_every_checkpoint_and_leftovers(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / ".step-0000006.tmp-abcd1234").mkdir()
    partial = copy / "checkpoints" / "step-0000008"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"x")
    res = verify_run(copy)
    assert [(r.get("step"), r.get("ok")) for r in res if "checkpoint" in r] == [(2, True), (4, True), (8, False)]
    assert "not a complete checkpoint" in res[2]["error"]
    assert res[-1] == {"leftover": str(copy / "checkpoints" / ".step-0000006.tmp-abcd1234")}
    code, out, _ = ru.run_cli(["verify", str(copy), "--json"])
    assert code == 2 and json.loads(out)["ok"] is False


def test_state_step_must_match_the_directory_name(ckpt):
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "step": 3}))
    reseal(ckpt)
    [rec] = verify_run(ckpt)
    assert not rec["ok"] and "records step 3" in rec["error"]


def test_checksums_must_list_every_file(ckpt):
    (ckpt / "rng.pt").unlink()
    reseal(ckpt)
    with pytest.raises(UserError, match="does not list rng.pt"):
        verify_checkpoint(ckpt)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_crafted_pickle_is_refused_and_runs_nothing(ckpt, tmp_path, monkeypatch, name, force_unsafe_env):
    """The payload would create a marker file when unpickled; checksums are resealed so
    only the unpickler stands in the way. torch's escape hatch for a global unsafe default
    (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) does not override an explicit ``weights_only=True``."""
    marker = tmp_path / "PWNED"
    torch.save({"state": Payload(marker), "param_groups": []}, ckpt / name)
    reseal(ckpt)
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match=f"refusing to load checkpoint file .*{name}"):
        load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()))
    assert not marker.exists()


def test_json_state_cannot_carry_code(ckpt):
    (ckpt / "state.json").write_bytes(b"[1, 2")  # not even an object
    reseal(ckpt)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="state.json is not a JSON object"):
        load_checkpoint(ckpt, model, None)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield owner, name, {k.arg: k.value for k in node.keywords}


def test_library_never_unpickles_unsafely_nor_trusts_remote_code():
    """A static scan of the package: every torch.load passes weights_only=True; no pickle,
    marshal, dill or np.load(allow_pickle=True); trust_remote_code is never True."""
    checked = 0
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for owner, name, kw in _calls(tree):
            where = f"{path.relative_to(SRC)}: {owner}.{name}"
            if owner == "torch" and name == "load":
                checked += 1
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, where
            if owner in ("pickle", "dill", "marshal", "cloudpickle") and name in ("load", "loads"):
                raise AssertionError(f"{where} unpickles")
            if name == "load" and owner in ("np", "numpy"):
                v = kw.get("allow_pickle")
                assert v is None or (isinstance(v, ast.Constant) and v.value is False), where
            if "trust_remote_code" in kw:
                v = kw["trust_remote_code"]
                assert isinstance(v, ast.Constant) and v.value is False, where
    assert checked >= 1  # the scan saw the checkpoint loader
