"""The bad-input matrix at the command line: each hostile or mistaken input to ``lmobj``
ends with exactly one ``error:`` line, a non-zero exit and no traceback — or, where the
readers' policy documents a skip, with a ``warning:`` line and a finished run.

Runs go through ``lmobjectives.cli.main`` in this process (an exception escaping ``main``
would fail the test the way a traceback would); one case also runs as a real subprocess.
The readers' own unit tests (every format and policy) live in ``test_corpus.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import runs_util as ru
from lmobjectives.tokenizer import default_tokenizer_dir

GOOD = b"the model reads a token and the loss goes down.\n"


def corpus_args(corpus: Path | str, *extra: str) -> list[str]:
    return ["train", "--objective", "clm", "--corpus", str(corpus), "--tokenizer", str(default_tokenizer_dir()),
            "--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "2",
            "--checkpoint-every", "0", "--json", "--set", "model.precision=fp32",
            "--set", "data.val_fraction=0", *extra]


def with_good_docs(tmp: Path, name: str, data: bytes) -> Path:
    """A corpus directory: a few good documents and one bad file."""
    d = ru.write_corpus(tmp / "corpus", n_docs=6, words=30)
    (d / name).write_bytes(data)
    return d


def only(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def jsonl(rows: list[bytes]) -> bytes:
    return b"\n".join(rows) + b"\n"


def truncated_parquet(tmp: Path) -> Path:
    path = tmp / "d.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * 20 for i in range(50)]}), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return ru.make_store(tmp_path_factory.mktemp("bad"), n_docs=12, words=40)


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory) -> Path:
    """A finished 3-step run with a checkpoint (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("fin") / "run"
    code, _, err = ru.run_cli(ru.tiny_args(store, out, 3, every=3))
    assert code == 0, err
    return out


def copy_run(finished: Path, tmp: Path) -> Path:
    shutil.copytree(finished, tmp / "run")
    return tmp / "run"


def edit_config(run: Path, key: str, value) -> None:  # noqa: ANN001
    f = run / "config.yaml"
    tree = yaml.safe_load(f.read_text())
    group, name = key.split(".")
    tree[group][name] = value
    f.write_text(yaml.safe_dump(tree, sort_keys=False))


def rewrite_store(store: Path, tmp: Path) -> Path:
    """A copy of ``store`` re-prepared from a changed corpus (so its fingerprint changes)."""
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    corpus = ru.write_corpus(tmp / "changed", n_docs=12, words=41)
    shutil.rmtree(store)
    prepare_store([str(corpus)], load_tokenizer(None), store, val_fraction=0.0, progress=False)
    return store


def store_copy_with_id(store: Path, tmp: Path, bad_id: int) -> Path:
    """A copy of ``store`` with one token id overwritten on disk (the manifest is unchanged)."""
    dst = tmp / "store"
    shutil.copytree(store, dst)
    shard = np.memmap(dst / "train" / "tokens-00000.bin", dtype=np.uint16, mode="r+")
    shard[5] = bad_id
    shard.flush()
    return dst


def tokenizer_without_specials(tmp: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["plain text with no reserved tokens"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    d = tmp / "tok"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    return d


def other_tokenizer(tmp: Path) -> Path:
    from lmobjectives.tokenizer import train_tokenizer

    docs = [p.read_text() for p in sorted(ru.write_corpus(tmp / "c", 12, 40).iterdir())]
    train_tokenizer(docs, 400, tmp / "tok")
    return tmp / "tok"


def flip(path: Path, at: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[at % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def crafted_pickle(run: Path) -> None:
    """optimizer.pt replaced by a pickle that would create a marker file, checksums updated."""
    import torch

    from lmobjectives.util import sha256_file, stable_hash

    ck = sorted((run / "checkpoints").iterdir())[-1]
    torch.save({"state": Payload(str(run / "PWNED"))}, ck / "optimizer.pt")
    files = {f.name: sha256_file(f) for f in sorted(ck.iterdir()) if f.name != "checksums.json"}
    (ck / "checksums.json").write_text(json.dumps({"files": files, "self": stable_hash(files)}))


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------ the matrix
# name -> (setup(tmp, store, finished) -> argv, expected exit, phrase in the message)
Case = Callable[[Path, Path, Path], list[str]]
ERRORS: dict[str, tuple[Case, str]] = {
    "missing corpus path": (
        lambda t, s, f: corpus_args(t / "nope"), "does not exist"),
    "empty directory": (
        lambda t, s, f: corpus_args((t / "empty").mkdir() or t / "empty"), "contains no files"),
    "zero-byte file": (
        lambda t, s, f: corpus_args(only(t, "z.txt", b"")), "no documents"),
    "whitespace-only file": (
        lambda t, s, f: corpus_args(only(t, "w.txt", b" \n\t\r\n ")), "whitespace-only"),
    "invalid UTF-8, policy strict": (
        lambda t, s, f: corpus_args(with_good_docs(t, "bad.txt", b"ok \xff\xfe no"),
                                    "--set", "data.encoding=strict"), "invalid UTF-8 at byte offset 3"),
    "invalid UTF-8 only, policy skip": (
        lambda t, s, f: corpus_args(only(t, "bad.txt", b"ok \xff no")), "undecodable"),
    "NUL bytes only (binary)": (
        lambda t, s, f: corpus_args(only(t, "b.txt", b"abc\x00def")), "binary file"),
    "corpus smaller than one batch": (
        lambda t, s, f: corpus_args(only(t, "small.txt", b"tiny corpus.\n"), "--batch-size", "4"),
        "at least 97 tokens"),
    "malformed JSONL line, policy strict": (
        lambda t, s, f: corpus_args(only(t, "d.jsonl", jsonl([b'{"text": "fine row"}', b'{"text": '])),
                                    "--set", "data.encoding=strict"), "d.jsonl:2: malformed JSONL row"),
    "truncated parquet": (
        lambda t, s, f: corpus_args(truncated_parquet(t)), "truncated or corrupt"),
    "unknown config key (--set)": (
        lambda t, s, f: ru.tiny_args(s, t / "o", 2, "--set", "train.stesp=3"),
        "unknown config key 'train.stesp'; did you mean 'train.steps'?"),
    "unknown config key (YAML recipe)": (
        lambda t, s, f: ["train", str(only(t, "r.yaml", b"objective: clm\ntrian:\n  steps: 3\n"))],
        "unknown config key 'trian'; did you mean 'train'?"),
    "wrong type": (
        lambda t, s, f: ru.tiny_args(s, t / "o", 2, "--set", "train.lr=fast"), "bad value for 'train.lr'"),
    "out-of-range value": (
        lambda t, s, f: ru.tiny_args(s, t / "o", 2, "--set", "train.keep_checkpoints=1"),
        "bad value for 'train.keep_checkpoints'"),
    "recipe file missing": (
        lambda t, s, f: ["train", str(t / "none.yaml")], "does not exist"),
    "recipe not YAML": (
        lambda t, s, f: ["train", str(only(t, "r.yaml", b"a: [1,\n"))], "is not valid YAML"),
    "resume: config changed": (
        lambda t, s, f: _resume_changed_config(f, t), "changed since step-0000003 was written"),
    "resume: data fingerprint changed": (
        lambda t, s, f: _resume_changed_data(s, t), "store fingerprint differs"),
    "resume: a flag other than --steps": (
        lambda t, s, f: ["train", "--resume", str(f), "--lr", "0.1"], "only --steps may change"),
    "resume: not a run directory": (
        lambda t, s, f: ["train", "--resume", str(t)], "not a run directory"),
    "--out holds another run": (
        lambda t, s, f: ru.tiny_args(s, copy_run(f, t), 2), "already holds a run"),
    "--out is a non-empty directory": (
        lambda t, s, f: ru.tiny_args(s, with_good_docs(t, "x.txt", GOOD), 2), "is not empty"),
    "model embedding smaller than tokenizer": (
        lambda t, s, f: ru.tiny_args(s, t / "o", 2, "--set", "model.config.vocab_size=100"),
        "input embedding table has 100 rows but the tokenizer has 8192 tokens"),
    "tokenizer differs from the init_from model's": (
        lambda t, s, f: corpus_args(with_good_docs(t, "x.txt", GOOD), "--init-from", str(f),
                                    "--tokenizer", str(other_tokenizer(t))),
        "tokenizer mismatch"),
    "store holds ids outside the embedding table": (
        lambda t, s, f: ru.tiny_args(store_copy_with_id(s, t, 9000), t / "o", 2),
        "holds token id 9000"),
    "tokenizer lacks the special tokens": (
        lambda t, s, f: corpus_args(with_good_docs(t, "x.txt", GOOD), "--tokenizer",
                                    str(tokenizer_without_specials(t))), "reserved special token"),
    "resume: flipped byte in model.safetensors": (
        lambda t, s, f: _resume_after(f, t, lambda ck: flip(ck / "model.safetensors")),
        "model.safetensors is corrupt"),
    "resume: crafted pickle in optimizer.pt": (
        lambda t, s, f: _resume_after(f, t, None), "refusing to load checkpoint file"),
    "verify: a flipped byte": (
        lambda t, s, f: _verify_after(f, t), "rng.pt is corrupt"),
    "verify: not a run": (
        lambda t, s, f: ["verify", str(t)], "is not a run with checkpoints"),
    "unknown preset": (
        lambda t, s, f: ru.tiny_args(s, t / "o", 2, "--preset", "tinny"), "did you mean 'tiny'"),
    "unknown objective": (
        lambda t, s, f: ru.tiny_args(s, t / "o", 2, "--objective", "clmm"), "clmm"),
}


def _resume_changed_config(finished: Path, tmp: Path) -> list[str]:
    run = copy_run(finished, tmp)
    edit_config(run, "train.lr", 0.01)
    return ["train", "--resume", str(run), "--steps", "4", "--json"]


def _resume_changed_data(store: Path, tmp: Path) -> list[str]:
    s = tmp / "store"
    shutil.copytree(store, s)
    run = tmp / "run"
    assert ru.run_cli(ru.tiny_args(s, run, 3, every=3))[0] == 0
    rewrite_store(s, tmp)
    return ["train", "--resume", str(run), "--steps", "4", "--json"]


def _resume_after(finished: Path, tmp: Path, damage) -> list[str]:  # noqa: ANN001
    run = copy_run(finished, tmp)
    ck = sorted((run / "checkpoints").iterdir())[-1]
    crafted_pickle(run) if damage is None else damage(ck)
    return ["train", "--resume", str(run), "--steps", "4", "--json"]


def _verify_after(finished: Path, tmp: Path) -> list[str]:
    run = copy_run(finished, tmp)
    flip(sorted((run / "checkpoints").iterdir())[-1] / "rng.pt", at=-3)
    return ["verify", str(run)]


@pytest.mark.parametrize("name", list(ERRORS))
def test_refused_with_one_clear_message(name, tmp_path, store, finished, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default run directory would land here, never in the repo
    setup, phrase = ERRORS[name]
    args = setup(tmp_path, store, finished)
    code, _, err = ru.run_cli(args)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    print(f"\nROW | {name} | exit {code} | {errors[0] if errors else err.strip()[-200:]}")
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert phrase in errors[0], errors[0]
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "run" / "PWNED").exists()


# Documented skips: a warning naming the file (and line/offset), then a finished run.
SKIPS: dict[str, tuple[Case, str]] = {
    "invalid UTF-8, policy skip": (
        lambda t, s, f: corpus_args(with_good_docs(t, "bad.txt", b"ok \xff no")),
        "bad.txt: invalid UTF-8 at byte offset 3; skipped"),
    "invalid UTF-8, policy replace": (
        lambda t, s, f: corpus_args(with_good_docs(t, "bad.txt", b"ok \xff no"),
                                    "--set", "data.encoding=replace"), ""),
    "NUL bytes among good files": (
        lambda t, s, f: corpus_args(with_good_docs(t, "b.txt", b"abc\x00def")), "b.txt: looks binary"),
    "malformed JSONL line, policy skip": (
        lambda t, s, f: corpus_args(with_good_docs(t, "d.jsonl", jsonl([b'{"text": "a row of text"}', b"{oops"]))),
        "d.jsonl: skipped 1 malformed line(s); first at line 2"),
    "document 20x longer than seq_len": (
        lambda t, s, f: corpus_args(only(t, "long.txt", b"word " * 640 + b"\n")), ""),
    "whitespace-only file among good files": (
        lambda t, s, f: corpus_args(with_good_docs(t, "w.txt", b"   \n")), ""),
    "resume: config changed, with --force": (
        lambda t, s, f: _resume_changed_config(f, t) + ["--force"], ""),
    "resume: data changed, with --force": (
        lambda t, s, f: _resume_changed_data(s, t) + ["--force"], ""),
    "--out holds another run, with --overwrite": (
        lambda t, s, f: ru.tiny_args(s, copy_run(f, t), 2, "--overwrite"), ""),
}


@pytest.mark.parametrize("name", list(SKIPS))
def test_documented_skip_warns_and_finishes(name, tmp_path, store, finished, monkeypatch):
    monkeypatch.chdir(tmp_path)
    setup, warning = SKIPS[name]
    code, out, err = ru.run_cli(setup(tmp_path, store, finished))
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    print(f"\nROW | {name} | exit {code} | {warnings[0] if warnings else 'no warning'}")
    assert code == 0, err
    assert "error:" not in err and "Traceback" not in err
    if warning:
        assert len(warnings) == 1 and warning in warnings[0], err
    assert json.loads(out)["step"] in (2, 4)


def test_real_subprocess_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "lmobjectives.cli", "train", "--corpus",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: corpus path '{tmp_path / 'missing'}' does not exist"]
