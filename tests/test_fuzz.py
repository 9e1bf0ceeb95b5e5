"""Property tests: every reader of user-supplied or on-disk input, fed arbitrary bytes,
trees and lengths, either works or raises ``UserError`` — never another exception.

Covered here: the run config (trees, YAML files, ``--set``), the token store (manifest,
document table, shards), checkpoints (every file, resealed so the SHA-256 check passes and
the parser itself is exercised), the tokenizer loader, the metrics log, and the CLM
transform with its converter on arbitrary rows. The corpus readers' own property test is
in ``test_corpus.py``; the packed loader's in ``test_loader.py``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runs_util as ru
from lmobjectives.checkpoint import CHECKSUMS, list_checkpoints, load_checkpoint, verify_checkpoint
from lmobjectives.config import apply_set, build_config, load_config_file
from lmobjectives.errors import UserError
from lmobjectives.util import sha256_file, stable_hash

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

KEYS = ["objective", "objective_params", "architecture", "model", "data", "train", "out", "preset",
        "steps", "lr", "batch_size", "seq_len", "corpus", "mix", "path", "weight", "config",
        "precision", "encoding", "spike_action", "keep_checkpoints", "x", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["clm", "tiny", "fp32", "skip", "1e-3"]))
trees = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), kids, max_size=4)),
    max_leaves=12)


_FAILED = object()


def only_user_errors(fn, *a, must_fail: bool = False, **kw):  # noqa: ANN001,ANN002,ANN003,ANN201
    """``fn(...)``'s result, or None after a ``UserError`` with a message; any other exception
    fails the test. With ``must_fail`` (an input known to be bad) success fails it too."""
    try:
        out = fn(*a, **kw)
    except UserError as exc:
        assert str(exc).strip()  # a message to print, never an empty error
        return None
    assert not must_fail, f"{getattr(fn, '__name__', fn)} accepted an input known to be bad"
    return out


def unknown_top_keys(tree: object) -> set[str]:
    """Top-level keys the run config does not have: such a tree must be refused."""
    from lmobjectives.config import RunConfig

    return set(tree) - set(RunConfig.model_fields) if isinstance(tree, dict) else set()


# ------------------------------------------------------------------------------ config
@FUZZ
@given(tree=st.dictionaries(st.sampled_from(KEYS), trees, max_size=5))
def test_config_trees(tree):
    cfg = only_user_errors(build_config, tree, must_fail=bool(unknown_top_keys(tree)))
    if cfg is not None:  # accepted: it round-trips to the same config
        assert build_config(cfg.model_dump()) == cfg


@FUZZ
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_files(tmp_path, data):
    f = tmp_path / "r.yaml"
    f.write_bytes(data)
    tree = only_user_errors(load_config_file, f)
    if tree is not None:
        assert isinstance(tree, dict)
        only_user_errors(build_config, tree, must_fail=bool(unknown_top_keys(tree)))


@FUZZ
@given(assignments=st.lists(st.text(max_size=30), max_size=4))
def test_set_assignments(assignments):
    tree: dict = {}
    for a in assignments:
        only_user_errors(apply_set, tree, a)
    only_user_errors(build_config, tree)


# ------------------------------------------------------------------------------ token store
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return ru.make_store(tmp_path_factory.mktemp("fz"), n_docs=6, words=20)


def _read_store(path: Path) -> None:
    from lmobjectives.data.loader import PackedSource
    from lmobjectives.store.store import TokenStore

    s = TokenStore(path)
    for split in ("train", "val"):
        table = s.split(split)
        if len(table.docs) and table.lengths.sum():
            src = PackedSource(table, 16, seed=0, pad=1)
            src.rows(np.arange(2 * src.rows_per_epoch + 1))


STORE_FILES = ["manifest.json", "train/docs.npy", "train/tokens-00000.bin"]


@FUZZ
@given(which=st.sampled_from(STORE_FILES), data=st.binary(max_size=300),
       cut=st.integers(min_value=0, max_value=400), npy=st.booleans())
def test_store_files(store, which, data, cut, npy):
    """A store file replaced by arbitrary bytes, by a truncation of itself, or (docs.npy)
    by an arbitrary int array: the store opens and reads, or says it is damaged."""
    with tempfile.TemporaryDirectory() as tmp:
        s = Path(tmp) / "s"
        shutil.copytree(store, s)
        f = s / which
        original = f.read_bytes()
        if which.endswith(".npy") and npy:
            rng = np.random.default_rng(cut)
            arr = rng.integers(-3, 400, size=(cut % 7, int(data[0]) % 4 + 1 if data else 3))
            np.save(f, arr.astype(np.int64))
        elif data:
            f.write_bytes(data)
        else:
            f.write_bytes(original[: cut % (len(original) + 1)])
        only_user_errors(_read_store, s)


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoint(store, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("fzck")
    code, _, err = ru.run_cli(ru.tiny_args(store, root / "run", 1, every=1))
    assert code == 0, err
    from lmobjectives.models.presets import build_model
    from lmobjectives.tokenizer.special import SpecialIds

    from lmobjectives.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    specials = SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size())
    model = build_model("tiny", "decoder", specials, max_positions=64, seed=0)
    return list_checkpoints(root / "run")[-1], model


CK_FILES = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json", CHECKSUMS]


@FUZZ
@given(which=st.sampled_from(CK_FILES), data=st.binary(max_size=400),
       cut=st.integers(min_value=0, max_value=10**6), reseal=st.booleans())
def test_checkpoint_files(checkpoint, which, data, cut, reseal):
    """Any file replaced by arbitrary bytes or truncated; resealed (checksums recomputed, so
    the parsers behind the SHA-256 check see the bytes) or not."""
    ckpt, model = checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp) / "step-0000001"
        shutil.copytree(ckpt, c)
        f = c / which
        original = f.read_bytes()
        f.write_bytes(data if data else original[: cut % (len(original) + 1)])
        changed = f.read_bytes() != original
        resealed = reseal and which != CHECKSUMS
        if resealed:
            files = {p.name: sha256_file(p) for p in sorted(c.iterdir()) if p.name != CHECKSUMS}
            (c / CHECKSUMS).write_text(json.dumps({"files": files, "self": stable_hash(files)}))
        # Changed bytes that were not resealed: the checksums must catch them.
        only_user_errors(verify_checkpoint, c, must_fail=changed and not resealed)
        opt = torch.optim.AdamW(model.parameters())
        # Resealed: a binary file cut short or replaced by arbitrary bytes cannot parse; only a
        # state.json that is still a JSON object may load (its fields are checked on resume,
        # test_checkpoint_state_fields).
        only_user_errors(load_checkpoint, c, model, opt,
                         must_fail=changed and (not resealed or which != "state.json"))


# ------------------------------------------------------------------------------ others
@FUZZ
@given(data=st.binary(max_size=300))
def test_tokenizer_files(tmp_path, data):
    from lmobjectives.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_bytes(data)
    only_user_errors(load_tokenizer, str(tmp_path))


json_lines = st.lists(st.one_of(
    st.binary(max_size=40),
    trees.map(lambda t: json.dumps(t).encode()),
    st.fixed_dictionaries({"step": st.integers(-2, 20) | st.text(max_size=3) | st.none(),
                           "loss": st.floats() | st.text(max_size=3), "tokens": st.integers(0, 99)}
                          ).map(lambda d: json.dumps(d).encode())), max_size=8)


@FUZZ
@given(lines=json_lines)
def test_metrics_log_truncation(tmp_path, lines):
    """Resume's truncation of a damaged metrics.jsonl keeps exactly the readable records of
    steps up to the checkpoint's (and records without a step)."""
    from types import SimpleNamespace

    from lmobjectives.report.plots import read_metrics
    from lmobjectives.train.loop import Trainer

    f = tmp_path / "metrics.jsonl"
    f.write_bytes(b"\n".join(lines))
    assert all(isinstance(r, dict) for r in read_metrics(tmp_path))
    Trainer._truncate_metrics(SimpleNamespace(metrics_path=f, step=5))  # type: ignore[arg-type]
    kept = [json.loads(ln) for ln in f.read_text().splitlines()]
    assert all(isinstance(r.get("step", 0), int) and r.get("step", 0) <= 5 for r in kept)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=json_lines)
def test_metrics_log_plot(tmp_path, lines):
    """The loss plot drawn after every run reads around damaged lines (few examples: slow)."""
    import warnings

    from lmobjectives.report.plots import plot_loss

    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines))
    from lmobjectives.report.plots import plottable, read_metrics

    (tmp_path / "loss.png").unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for arbitrary text
        out = plot_loss(tmp_path)
    has_loss = any(not r.get("eval") and plottable(r) for r in read_metrics(tmp_path))
    if has_loss:  # a readable train record: a real PNG is drawn
        assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert out is None and not (tmp_path / "loss.png").exists()


@FUZZ
@given(rows=st.integers(1, 4), length=st.integers(2, 40), seed=st.integers(0, 2**32 - 1),
       pad_from=st.lists(st.integers(0, 40), min_size=4, max_size=4))
def test_clm_transform_on_arbitrary_rows(rows, length, seed, pad_from):
    """Arbitrary ids, lengths and trailing padding: the batch has the row's shape, labels
    are the tokens with padding ignored, and every id is inside the vocabulary."""
    from lmobjectives.data.converters import CONVERTERS
    from lmobjectives.objectives import build_objective
    from lmobjectives.objectives.base import Rows
    from lmobjectives.tokenizer.special import SpecialIds

    specials = SpecialIds.default(vocab_size=512)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 512, size=(rows, length)).astype(np.int32)
    for b in range(rows):
        tokens[b, min(pad_from[b], length):] = specials.pad
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    obj = build_objective("clm", {}, specials)
    batch = CONVERTERS["decoder"](obj(Rows(tokens=tokens, positions=positions), rng), specials)
    assert batch["input_ids"].shape == (rows, length)
    assert ((batch["labels"] == -100) | (batch["labels"] == batch["input_ids"])).all()
    assert (batch["labels"][tokens == specials.pad] == -100).all()
    assert batch["input_ids"].min() >= 0 and batch["input_ids"].max() < 512


state_values = st.one_of(trees, st.integers(-5, 10**6), st.lists(st.floats(), max_size=3))


@pytest.fixture(scope="module")
def trainer(checkpoint):
    from lmobjectives.config import build_config
    from lmobjectives.train.loop import Trainer
    from lmobjectives.train.setup import open_run

    run_dir = checkpoint[0].parents[1]
    cfg = build_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    return Trainer(open_run(cfg, run_dir, progress=False), progress=False)


@settings(FUZZ, max_examples=25)
@given(key=st.sampled_from(["step", "tokens", "loader", "guard", "tokens_by_source", "world_size",
                            "config_hash", "store_fingerprints"]),
       value=state_values, sub=st.sampled_from(["counter", "bad_in_row", "recent", None]),
       force=st.booleans())
def test_checkpoint_state_fields(checkpoint, trainer, key, value, sub, force):
    """A state.json that parses but holds wrong values (resealed): resume refuses it with a
    message, or restores it; never a TypeError halfway, never a bad value that crashes later."""
    ckpt, _ = checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(ckpt.parents[1], run)
        c = run / "checkpoints" / ckpt.name
        state = json.loads((c / "state.json").read_text())
        if sub is not None and isinstance(state.get(key), dict):
            state[key][sub] = value
        else:
            state[key] = value
        (c / "state.json").write_text(json.dumps(state))
        files = {p.name: sha256_file(p) for p in sorted(c.iterdir()) if p.name != CHECKSUMS}
        (c / CHECKSUMS).write_text(json.dumps({"files": files, "self": stable_hash(files)}))
        trainer.run.dir = run
        trainer.metrics_path = run / "metrics.jsonl"
        trainer.guard.recent.clear()
        if only_user_errors(trainer.resume, force=force) is not None:
            only_user_errors(trainer.train_step)  # what was restored also trains
