"""``lmobj prepare`` is crash-safe: killed at any document it leaves nothing that looks like
a store (no ``--out`` directory, only a hidden temporary one), and running it again
completes the same store; a corpus file that changes while it is read is reported and no
store is written."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest

import runs_util as ru

N_DOCS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return ru.write_corpus(tmp_path_factory.mktemp("prepcorpus") / "c", n_docs=N_DOCS, words=40)


def prepare_args(corpus: Path, out: Path) -> list[str]:
    return ["prepare", "--corpus", str(corpus), "--out", str(out), "--json"]


def kill_at_document(n: int):
    def install() -> None:
        import lmobjectives.store.prepare as prep

        real = prep.write_store

        def write_store(out, pairs, **kw):  # noqa: ANN001,ANN003,ANN202
            def cut():  # noqa: ANN202
                for i, pair in enumerate(pairs):
                    if i == n:
                        ru.kill_self()
                    yield pair
            return real(out, cut(), **kw)

        prep.write_store = write_store
    return install


def test_prepare_killed_anywhere_leaves_no_store_and_a_rerun_completes_it(corpus, tmp_path):
    ref = tmp_path / "ref"
    code, _, err = ru.run_cli(prepare_args(corpus, ref))
    assert code == 0, err
    for n in sorted(random.Random(5).sample(range(N_DOCS), 3)):
        out = tmp_path / f"store{n}"
        p = ru.start_child(prepare_args(corpus, out), tmp_path / "killed.log", kill_at_document(n))
        p.join(120)
        assert p.exitcode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
        assert not out.exists(), "no directory under --out until the store is complete"
        assert [q.name for q in tmp_path.glob(f".{out.name}.tmp-*")], "the killed write's temporary"
        code, _, err = ru.run_cli(prepare_args(corpus, out))
        assert code == 0, err
        assert not list(tmp_path.glob(f".{out.name}.tmp-*")), "the rerun removes the leftover"
        got, want = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
        assert got["fingerprint"] == want["fingerprint"] and got["tokens"] == want["tokens"]


@pytest.mark.parametrize("change", ["append", "touch", "delete"])
def test_a_file_changing_while_read_is_reported(corpus, tmp_path, monkeypatch, change):
    import os
    import shutil

    import lmobjectives.store.prepare as prep

    mine = tmp_path / "c"
    shutil.copytree(corpus, mine)
    victim = mine / "doc005.txt"
    real = prep.iter_documents

    def iter_documents(*a, **kw):  # noqa: ANN002,ANN003,ANN202
        for i, doc in enumerate(real(*a, **kw)):
            if i == 2:  # another program writes the corpus while we read it
                if change == "append":
                    with open(victim, "a") as fh:
                        fh.write("more text\n")
                elif change == "touch":
                    st = victim.stat()
                    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
                else:
                    victim.unlink()
            yield doc

    monkeypatch.setattr(prep, "iter_documents", iter_documents)
    out = tmp_path / "store"
    code, _, err = ru.run_cli(prepare_args(mine, out))
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    said = "cannot read file" if change == "delete" else "while it was read"  # deleted before its turn
    assert str(victim) in lines[0] and said in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".store.tmp-*"))
