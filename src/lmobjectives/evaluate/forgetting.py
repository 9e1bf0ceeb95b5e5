"""The forgetting report: what a continual run gained on its domain and lost elsewhere.

For each named dataset, the run's final model and a baseline (usually the model it started
from) score the same documents left to right; the report gives bits-per-byte for both, the
gain (baseline − run, bits saved per byte) and the retention (baseline / run: 1.0 = nothing
forgotten; ≥ 0.95 on general data is the usual bar for a successful continual run).

Bits per byte, not loss per token, because the two models may tokenize differently (an
extended tokenizer): per byte they are comparable (MiniCPM §4.5 reports loss per byte for
the same reason). Each model reads the data with its own tokenizer:

* a corpus path is prepared once per tokenizer (cached under ``RUN/eval-data/``) with the
  run's ``val_fraction`` and seed; the held-out split is chosen by a hash of each
  document's text, so both models see the same documents and the run never trained on
  them (when the split is empty, all documents are used and the report says ``all``);
* a store is used as it is by the model whose tokenizer made it; for the other model its
  documents are decoded and re-encoded.

Both models score the same first ``D`` documents of that split: ``D`` is the most that fit
in ``batches × batch_size`` rows under the run's tokenizer (at least one).

Worked example: prose bpb run 2.10 / baseline 2.00 -> gain −0.10, retention 0.952 (just
kept); code bpb run 1.50 / baseline 2.40 -> gain +0.90, retention 1.6.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmobjectives.errors import UserError
from lmobjectives.util import atomic_write_json, stable_hash

GENERAL_RETENTION_BAR = 0.95  # the usual bar on general data (Ibrahim et al. 2024 compare to 1.0)
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
REPORT_JSON = "forgetting.json"
CHART = "forgetting.png"


def is_named(item: str) -> bool:
    name, sep, path = item.partition("=")
    return bool(sep) and bool(path) and bool(NAME.match(name)) and not Path(item).exists()


def parse_datasets(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` (or a bare PATH, named after its last component) -> {name: path}."""
    out: dict[str, str] = {}
    for item in items:
        if is_named(item):
            name, _, path = item.partition("=")
        else:
            path = item
            name = (Path(item.rstrip("/")).name or item).replace(":", "-")
        if name in out:
            raise UserError(f"--data: two datasets named '{name}'; name them: --data NAME=PATH")
        out[name] = path
    return out


# ------------------------------------------------------------------------------ data
class _Model:
    """A loaded model with what scoring needs."""

    def __init__(self, path: str | Path, device, bf16: bool) -> None:  # noqa: ANN001
        from lmobjectives.evaluate.metrics import LEFT_TO_RIGHT, token_byte_lengths
        from lmobjectives.infer.load import load_model
        from lmobjectives.tokenizer import tokenizer_fingerprint

        self.loaded = load_model(path)
        if self.loaded.architecture not in LEFT_TO_RIGHT:
            raise UserError(f"{path} is a {self.loaded.architecture} model; bits-per-byte needs a "
                            "model that scores text left to right (decoder or prefix LM)")
        self.model = self.loaded.model.to(device)
        self.tokenizer = self.loaded.tokenizer
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.byte_lengths = token_byte_lengths(self.tokenizer)
        self.device, self.bf16 = device, bf16


def _split_of(store) -> str:  # noqa: ANN001 - TokenStore
    return "val" if len(store.split("val").docs) else "train"


def _reencode(store, split: str, tokenizer, out: Path):  # noqa: ANN001
    """The documents of ``store``'s split, decoded with its tokenizer, as a store for ``tokenizer``."""
    from lmobjectives.store.store import TokenStore, encode_documents, write_store
    from lmobjectives.tokenizer import encode_data, load_tokenizer, tokenizer_fingerprint
    from lmobjectives.tokenizer.special import EOS

    own = load_tokenizer(str(store.path / "tokenizer"))
    table = store.split(split)
    texts = (own.decode([int(t) for t in table.document(i)[:-1]], skip_special_tokens=False)
             for i in range(len(table.docs)))
    write_store(out, encode_documents(texts, lambda batch: encode_data(tokenizer, batch)),
                vocab_size=tokenizer.get_vocab_size(), eos=tokenizer.token_to_id(EOS),
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                sources={str(store.path): store.fingerprint}, val_fraction=0.0)
    return TokenStore(out)


def dataset_table(path: str, model: _Model, cache: Path, val_fraction: float, seed: int):  # noqa: ANN201
    """(DocTable, split label) of ``path`` tokenized for ``model``."""
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.store.store import TokenStore

    if (Path(path) / "manifest.json").is_file():
        store = TokenStore(path)
        split = _split_of(store)
        label = "val" if split == "val" else "all"
        if store.tokenizer_fingerprint == model.fingerprint:
            return store.split(split), label
        key = stable_hash([str(Path(path).resolve()), store.fingerprint, split, model.fingerprint])[:16]
        out = cache / f"store-{key}"
        s = TokenStore(out) if (out / "manifest.json").is_file() else _reencode(store, split, model.tokenizer, out)
        return s.split("train"), label
    key = stable_hash([path, model.fingerprint, val_fraction, seed])[:16]
    out = cache / f"corpus-{key}"
    if not (out / "manifest.json").is_file():
        prepare_store([path], model.tokenizer, out, val_fraction=val_fraction, seed=seed, progress=False)
    store = TokenStore(out)
    split = _split_of(store)
    return store.split(split), ("val" if split == "val" else "all")


def documents_within(table, max_tokens: int) -> int:  # noqa: ANN001 - DocTable
    """How many leading documents fit in ``max_tokens`` (at least one)."""
    cum = np.cumsum(table.lengths)
    return max(1, int(np.searchsorted(cum, max_tokens, side="right")))


def score(model: _Model, table, n_docs: int, row_len: int, batch_size: int) -> dict[str, Any]:  # noqa: ANN001
    """Bits per byte of the first ``n_docs`` documents, every token scored once."""
    from lmobjectives.data.loader import PackedSource
    from lmobjectives.evaluate.metrics import bits_per_byte
    from lmobjectives.store.store import DocTable

    sub = DocTable(shards=table.shards, docs=table.docs[:n_docs])
    src = PackedSource(sub, row_len, seed=0, pad=model.loaded.specials.pad, shuffle=False)
    n = src.rows_per_epoch
    rows = [src.rows(np.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    out = bits_per_byte(model.model, rows, model.loaded.specials, model.byte_lengths, model.device,
                        model.bf16, by_position=True)
    return {"bits_per_byte": out["bits_per_byte"], "bytes": out["bytes"], "tokens": out["bpb_tokens"],
            "loss_by_position": out["loss_by_position"]}


# ------------------------------------------------------------------------------ report
def default_datasets(run_dir: Path) -> dict[str, str]:
    """The run's own training sources (their stores), when no --data is given."""
    from lmobjectives.rundir import read_run_info, recorded_path

    out_key = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("out")
    return {name: str(recorded_path(run_dir, out_key, s["path"]))
            for name, s in read_run_info(run_dir).get("sources", {}).items()}


def forgetting_report(run_dir: str | Path, datasets: dict[str, str], baseline: str | Path | None = None, *,
                      batches: int = 16, seq_len: int | None = None, batch_size: int | None = None,
                      chart: bool = True) -> dict[str, Any]:
    """Bits-per-byte of a run (and a baseline) per dataset; writes ``forgetting.json`` and
    ``forgetting.png`` into the run directory."""
    from lmobjectives.runtime import select_device, use_bf16

    run_dir = Path(run_dir)
    conf = run_dir / "config.yaml"
    if not conf.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    tree = yaml.safe_load(conf.read_text()) or {}
    data, train = tree.get("data", {}), tree.get("train", {})
    row_len = int(seq_len or data.get("seq_len", 256))
    batch_size = int(batch_size or train.get("batch_size", 16))
    val_fraction, seed = float(data.get("val_fraction", 0.01)), int(train.get("seed", 0))
    datasets = datasets or default_datasets(run_dir)
    if not datasets:
        raise UserError("no dataset to evaluate: pass --data NAME=PATH")
    device = select_device()
    bf16 = use_bf16(tree.get("model", {}).get("precision", "auto"), device)
    cache = run_dir / "eval-data"
    run = _Model(run_dir, device, bf16)
    base = _Model(baseline, device, bf16) if baseline is not None else None
    rows: dict[str, Any] = {}
    for name, path in datasets.items():
        table, split = dataset_table(path, run, cache, val_fraction, seed)
        n_docs = documents_within(table, batches * batch_size * row_len)
        r = score(run, table, n_docs, row_len, batch_size)
        entry: dict[str, Any] = {"path": path, "split": split, "documents": n_docs,
                                 "bpb": r["bits_per_byte"], "bytes": r["bytes"], "tokens": r["tokens"],
                                 "loss_by_position": r["loss_by_position"]}
        if base is not None:
            btable, _ = dataset_table(path, base, cache, val_fraction, seed)
            if len(btable.docs) != len(table.docs):
                raise UserError(f"dataset {name}: the run and the baseline see {len(table.docs)} vs "
                                f"{len(btable.docs)} documents; is it the same data?")
            b = score(base, btable, n_docs, row_len, batch_size)
            entry.update({"baseline_bpb": b["bits_per_byte"], "baseline_bytes": b["bytes"],
                          "baseline_tokens": b["tokens"],
                          "gain": b["bits_per_byte"] - r["bits_per_byte"],
                          "retention": b["bits_per_byte"] / r["bits_per_byte"]
                          if r["bits_per_byte"] > 0 else math.inf})
        rows[name] = entry
    report = {"run": str(run_dir), "baseline": str(baseline) if baseline is not None else None,
              "seq_len": row_len, "datasets": rows}
    if chart:
        report["chart"] = str(plot_forgetting(report, run_dir / CHART))
    atomic_write_json(run_dir / REPORT_JSON, report)
    return report


def format_table(report: dict[str, Any]) -> str:
    has_base = report.get("baseline") is not None
    head = f"{'dataset':<16}{'split':>6}{'docs':>7}{'run bpb':>10}"
    if has_base:
        head += f"{'base bpb':>10}{'gain':>9}{'retention':>11}"
    lines = [f"bits per byte (lower is better), seq_len {report['seq_len']}; run {report['run']}"
             + (f" vs baseline {report['baseline']}" if has_base else ""), head]
    for name, d in report["datasets"].items():
        line = f"{name:<16}{d['split']:>6}{d['documents']:>7}{d['bpb']:>10.4f}"
        if has_base:
            line += f"{d['baseline_bpb']:>10.4f}{d['gain']:>+9.4f}{d['retention']:>11.3f}"
        lines.append(line)
    if has_base:
        lines.append(f"gain = baseline − run bpb; retention = baseline / run bpb "
                     f"(≥ {GENERAL_RETENTION_BAR} on general data is the usual bar)")
    if report.get("chart"):
        lines.append(f"chart: {report['chart']}")
    return "\n".join(lines)


def plot_forgetting(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars: bits per byte of the run (and baseline) per dataset, retention on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmobjectives.report.plots import save_figure

    names = list(report["datasets"])
    d = report["datasets"]
    x = np.arange(len(names))
    has_base = report.get("baseline") is not None
    width = 0.38 if has_base else 0.6
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 2), 4))
    if has_base:
        ax.bar(x - width / 2, [d[n]["baseline_bpb"] for n in names], width, label="baseline", color="#9e9e9e")
    bars = ax.bar(x + (width / 2 if has_base else 0), [d[n]["bpb"] for n in names], width, label="run",
                  color="#1f77b4")
    if has_base:
        for rect, n in zip(bars, names):
            ax.annotate(f"retention {d[n]['retention']:.2f}", (rect.get_x() + rect.get_width() / 2,
                        rect.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("forgetting report" if has_base else "bits per byte")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)
    return path
