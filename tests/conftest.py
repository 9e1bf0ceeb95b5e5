"""Shared fixtures: tiny in-memory stores and the special ids of the shipped tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No test may reach a network: HF datasets/hub and W&B work offline (set before they import).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

from lmobjectives.tokenizer.special import SpecialIds  # noqa: E402


@pytest.fixture
def specials() -> SpecialIds:
    return SpecialIds.default(vocab_size=512)


import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models gain nothing from more; CI shares two cores


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
    """A few hundred KB of real text and code from the default corpus, as files."""
    from lmobjectives.corpus import iter_documents

    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(iter_documents(["default"])):
        if i % 12 == 0:
            (root / f"doc{i:04d}.txt").write_text(doc.text[:6000])
    return str(root)


@pytest.fixture(scope="session")
def small_store(tmp_path_factory, small_corpus) -> str:
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("store") / "s"
    prepare_store([small_corpus], load_tokenizer(None), out, val_fraction=0.1, progress=False)
    return str(out)


def tiny_tree(store: str, out: str, **train) -> dict:
    """A config tree for a tiny, fast run on ``store``."""
    t = {"steps": 6, "batch_size": 2, "lr": 3e-3, "eval_every": 0, "checkpoint_every": 3,
         "eval_batches": 2, "warmup_fraction": 0.2}
    t.update(train)
    # fp32 always: "auto" picks bf16 on CPUs with fast bf16, and tests must give the same numbers
    # on every machine CI may run on
    return {"objective": "clm", "model": {"preset": "tiny", "precision": "fp32"}, "data": {"store": store, "seq_len": 32},
            "train": t, "out": out}


@pytest.fixture(scope="session")
def two_source_store(tmp_path_factory) -> str:
    """A store from two corpus directories (code, prose): the probe's two classes."""
    from lmobjectives.corpus import iter_documents
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("two")
    for part in ("code", "prose"):
        (root / part).mkdir()
        for i, doc in enumerate(iter_documents([f"default:{part}"])):
            if i % 4 == 0 and i < 160:
                (root / part / f"{i:04d}.txt").write_text(doc.text[:3000])
    out = root / "store"
    prepare_store([str(root / "code"), str(root / "prose")], load_tokenizer(None), out,
                  val_fraction=0.4, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def one_thread():
    """The same arithmetic in every forked run, and no intra-op pool alive across a fork."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
