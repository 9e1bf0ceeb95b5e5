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


# The one sanctioned unpickler: DCP's metadata reader, whose find_class admits only the
# checkpoint metadata classes (checkpoint/sharded.py; test_crafted_checkpoint_metadata_runs_no_code).
ALLOWED_UNPICKLERS = {("checkpoint/sharded.py", "_MetadataUnpickler")}
UNPICKLING_MODULES = ("pickle", "_pickle", "dill", "marshal", "cloudpickle", "joblib")


class _Scan(ast.NodeVisitor):
    """Resolves names to what they were imported or assigned from (``from torch import load
    as L``, ``tl = torch.load``, ``import numpy as N``), so aliases do not hide a call."""

    def __init__(self, where: str) -> None:
        self.where, self.alias, self.problems, self.torch_loads = where, {}, [], 0

    def qualname(self, node: ast.AST) -> str:
        if isinstance(node, ast.Name):
            return self.alias.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            return f"{self.qualname(node.value)}.{node.attr}"
        if isinstance(node, ast.Call):  # getattr(torch, "load")
            if self.qualname(node.func) == "getattr" and len(node.args) == 2 \
                    and isinstance(node.args[1], ast.Constant):
                return f"{self.qualname(node.args[0])}.{node.args[1].value}"
        return "?"

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.alias[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for a in node.names:
            self.alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def visit_Assign(self, node: ast.Assign) -> None:
        name = self.qualname(node.value)
        if name != "?":
            for t in node.targets:
                if isinstance(t, ast.Name):
                    self.alias[t.id] = name
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for base in node.bases:
            q = self.qualname(base)
            if q.split(".")[0] in UNPICKLING_MODULES and q.endswith("Unpickler") \
                    and (self.where, node.name) not in ALLOWED_UNPICKLERS:
                self.problems.append(f"{self.where}: class {node.name} subclasses {q}")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for k, v in zip(node.keys, node.values):
            if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not _is_false(v):
                self.problems.append(f"{self.where}: trust_remote_code set to a non-False value")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        q = self.qualname(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if q == "torch.load":
            self.torch_loads += 1
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                self.problems.append(f"{self.where}: torch.load without weights_only=True")
        if q.split(".")[0] in UNPICKLING_MODULES and q.split(".")[-1] in ("load", "loads", "Unpickler"):
            self.problems.append(f"{self.where}: {q} unpickles")
        if q in ("numpy.load", "np.load") and "allow_pickle" in kw and not _is_false(kw["allow_pickle"]):
            self.problems.append(f"{self.where}: np.load with allow_pickle")
        if "trust_remote_code" in kw and not _is_false(kw["trust_remote_code"]):
            self.problems.append(f"{self.where}: trust_remote_code is not the literal False")
        self.generic_visit(node)


def _is_false(v: ast.AST) -> bool:
    return isinstance(v, ast.Constant) and v.value is False


def scan_source(text: str, where: str = "<src>") -> tuple[list[str], int]:
    """(problems, number of torch.load calls seen) for one module's source."""
    scan = _Scan(where)
    scan.visit(ast.parse(text, filename=where))
    return scan.problems, scan.torch_loads


def test_library_never_unpickles_unsafely_nor_trusts_remote_code():
    """A static scan of the package: every torch.load, however imported or renamed, passes
    weights_only=True; no pickle/marshal/dill load, no Unpickler subclass but the sanctioned
    one, no np.load(allow_pickle=...); trust_remote_code is only ever the literal False."""
    problems, loads = [], 0
    for path in sorted(SRC.rglob("*.py")):
        found, n = scan_source(path.read_text(), path.relative_to(SRC).as_posix())
        problems += found
        loads += n
    assert not problems, problems
    assert loads >= 1  # the scan saw the checkpoint loader


@pytest.mark.parametrize("source", [
    "import torch\ntorch.load(f)",
    "import torch\ntorch.load(f, weights_only=False)",
    "import torch as T\nT.load(f, weights_only=flag)",
    "from torch import load as L\nL(f)",
    "import torch\ntl = torch.load\ntl(f)",
    "import torch\ngetattr(torch, 'load')(f)",
    "import pickle\npickle.loads(b)",
    "from pickle import loads as q\nq(b)",
    "import pickle\nclass U(pickle.Unpickler):\n    pass",
    "from pickle import Unpickler\nclass U(Unpickler):\n    pass",
    "import pickle\npickle.Unpickler(f).load()",
    "import numpy as np\nnp.load(f, allow_pickle=True)",
    "import transformers\ntransformers.AutoModel.from_pretrained(p, trust_remote_code=True)",
    "import transformers\ntransformers.AutoModel.from_pretrained(p, trust_remote_code=flag)",
    "kw = {'trust_remote_code': user_says}",
])
def test_the_scan_catches_disguised_unsafe_loads(source):
    problems, _ = scan_source(source)
    assert problems, f"the scan missed: {source!r}"


def test_the_scan_accepts_the_safe_forms():
    ok = ("import torch\nfrom torch import load as L\nL(f, weights_only=True)\n"
          "torch.load(f, map_location='cpu', weights_only=True)\n"
          "import numpy as np\nnp.load(f)\nnp.load(f, allow_pickle=False)\n"
          "m.from_pretrained(p, trust_remote_code=False)\n")
    assert scan_source(ok) == ([], 2)
