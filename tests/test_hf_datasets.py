"""HF datasets on disk as corpora: save_to_disk directories (Dataset and DatasetDict) and
.arrow files, read in batches, fingerprinted, with one-line errors for a wrong column/split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pytest

import runs_util as ru
from lmobjectives.corpus import file_fingerprints, hf_datasets, iter_documents


TEXTS = ["def f(x):\n    return x + 1\n", "The module provides a class.", "", "import os\n",
         "while True:\n    break\n", "print('hello')\n", "class A:\n    pass\n"]
TOKENIZER = str(Path(__file__).resolve().parent.parent / "src" / "lmobjectives" / "assets" / "tokenizer")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """``dd/`` (DatasetDict: train 7 rows, validation 2, empty 0), ``ds/`` (one Dataset) and
    the Arrow file inside it."""
    root = tmp_path_factory.mktemp("hf")
    train = datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    datasets.DatasetDict({
        "train": train, "validation": train.select([0, 1]),
        "empty": datasets.Dataset.from_dict({"body": [], "n": []}, features=train.features),
    }).save_to_disk(str(root / "dd"))
    train.save_to_disk(str(root / "ds"))
    return root


def _arrow(saved: Path) -> Path:
    return next((saved / "ds").glob("*.arrow"))


def test_every_form_reads_the_same_documents(saved):
    want = [t for t in TEXTS if t.strip()]
    for spec, kw in ((saved / "dd", {}), (saved / "ds", {}), (_arrow(saved), {})):
        docs = list(iter_documents([str(spec)], text_field="body", **kw))
        assert [d.text for d in docs] == want, spec
    docs = list(iter_documents([str(saved / "dd")], text_field="body", split="validation"))
    assert [(d.text, d.source) for d in docs] == [(TEXTS[0], f"{saved / 'dd'}[validation]:1"),
                                                  (TEXTS[1], f"{saved / 'dd'}[validation]:2")]


def test_rows_are_read_a_batch_at_a_time(saved, monkeypatch):
    seen: list[int] = []
    real = hf_datasets._emit_column

    def spy(column, *args):  # noqa: ANN001
        seen.append(len(column))
        return real(column, *args)

    monkeypatch.setattr(hf_datasets, "BATCH_ROWS", 3)
    monkeypatch.setattr(hf_datasets, "_emit_column", spy)
    for spec in (saved / "dd", _arrow(saved)):
        seen.clear()
        assert len(list(iter_documents([str(spec)], text_field="body"))) == 6
        assert seen == [3, 3, 1], spec  # never the whole column at once


def test_fingerprint_is_the_datasets_own(saved, tmp_path):
    state = json.loads((saved / "dd" / "validation" / "state.json").read_text())
    fps = file_fingerprints([str(saved / "dd")], split="validation")
    assert fps == {f"{saved / 'dd'}[validation]": f"datasets:{state['_fingerprint']}"}
    other = tmp_path / "other"
    datasets.Dataset.from_dict({"body": ["changed"]}).save_to_disk(str(other))
    assert file_fingerprints([str(other)]) != file_fingerprints([str(saved / "ds")])
    assert len(file_fingerprints([str(_arrow(saved))])[str(_arrow(saved))]) == 64  # sha256


def test_prepare_tokenizer_train_and_mix_take_datasets(saved, tmp_path):
    code, out, err = ru.run_cli(["prepare", "--corpus", str(saved / "dd"), "--split", "validation",
                                 "--text-field", "body", "--tokenizer", TOKENIZER,
                                 "--out", str(tmp_path / "store"), "--val-fraction", "0", "--json"])
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["documents"] == 2
    assert list(manifest["sources"]) == [f"{saved / 'dd'}[validation]"]
    code, _, err = ru.run_cli(["tokenizer", "train", "--corpus", str(_arrow(saved)), "--text-field", "body",
                               "--vocab-size", "400", "--out", str(tmp_path / "tok"), "--json"])
    assert code == 0, err
    code, out, err = ru.run_cli([
        "train", "--objective", "clm", "--preset", "tiny", "--mix", f"{saved / 'dd'}=0.5",
        "--mix", f"{_arrow(saved)}=0.5", "--tokenizer", TOKENIZER, "--seq-len", "16", "--batch-size", "2",
        "--steps", "2", "--out", str(tmp_path / "run"), "--json", "--set", "data.text_field=body",
        "--set", "data.val_fraction=0", "--set", "train.eval_every=0", "--set", "model.precision=fp32"])
    assert code == 0, err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(info["sources"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--text-field", "title"], "{dd}[train]: no column 'title' (columns: body, n; text columns: body); "
                                "set data.text_field (--text-field)"),
    (["--text-field", "n"], "{dd}[train]: column 'n' has type int64, not string (text columns: body); "
                            "set data.text_field (--text-field)"),
    (["--text-field", "body", "--split", "empty"],
     "split 'empty' of {dd} is empty (0 rows); splits: train (7 rows), validation (2 rows), "
     "empty (0 rows); set data.split (--split)"),
    (["--text-field", "body", "--split", "test"],
     "{dd} has no split 'test' (splits: train (7 rows), validation (2 rows), empty (0 rows)); "
     "set data.split (--split)"),
])
def test_wrong_column_or_split_is_one_error_line(saved, tmp_path, args, message):
    code, _, err = ru.run_cli(["prepare", "--corpus", str(saved / "dd"), "--tokenizer", TOKENIZER,
                               "--out", str(tmp_path / "s"), *args])
    assert code == 2
    assert err.strip().splitlines() == ["error: " + message.format(dd=saved / "dd")]


def test_missing_datasets_package_names_the_extra(saved, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    code, _, err = ru.run_cli(["prepare", "--corpus", str(saved / "dd"), "--text-field", "body",
                               "--tokenizer", TOKENIZER, "--out", str(tmp_path / "s")])
    assert code == 2
    assert err.strip() == (f"error: {saved / 'dd'} is an HF datasets directory; reading it needs the "
                           "datasets package: pip install 'lmobjectives[datasets]'")
