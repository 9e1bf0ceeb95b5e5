"""Peak memory of reading / preparing a large HF datasets directory (``save_to_disk``).

    python benchmarks/hf_datasets_memory.py build --gb 2 --out /tmp/big_ds
    python benchmarks/hf_datasets_memory.py measure --dataset /tmp/big_ds --mode read
    python benchmarks/hf_datasets_memory.py measure --dataset /tmp/big_ds --mode prepare

``build`` writes a DatasetDict (``train`` split, column ``text``) of about ``--gb`` GB of
text: the default corpus's documents, each made distinct by a numbered first line, written
through ``Dataset.from_generator`` so the builder never holds the dataset either.
``measure`` runs the reader alone (``read``: every document of the split, counted) or the
whole ``prepare_store`` (``prepare``: tokenize into a store) in a child process and samples
its ``/proc/PID/status`` every 50 ms: peak ``RssAnon`` (memory the process owns) and peak
``VmRSS`` (that plus file pages of the Arrow memory map that happen to be resident; the
kernel can drop those at any time, so they are page cache, not a cost of the reader).

Target (issue: HF datasets as a corpus): under a few hundred MB while preparing a store from
a 2 GB dataset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLE_SECONDS = 0.05


def build(gb: float, out: Path) -> None:
    import datasets

    from lmobjectives.corpus import iter_documents

    base = [d.text for d in iter_documents(["default"], warn=lambda m: None)]
    target = int(gb * 1e9)

    def rows():
        written, i = 0, 0
        while written < target:
            text = f"# document {i}\n" + base[i % len(base)]
            written += len(text.encode("utf-8"))
            i += 1
            yield {"text": text}

    with tempfile.TemporaryDirectory(dir=out.parent) as cache:
        ds = datasets.Dataset.from_generator(rows, cache_dir=cache)
        datasets.DatasetDict({"train": ds}).save_to_disk(str(out))
    print(json.dumps({"dataset": str(out), "rows": len(ds),
                      "arrow_bytes": sum(f.stat().st_size for f in out.rglob("*.arrow"))}))


def child(dataset: str, mode: str, store: str) -> None:
    from lmobjectives.corpus import iter_documents

    start = time.perf_counter()
    if mode == "read":
        n = b = 0
        for doc in iter_documents([dataset]):
            n += 1
            b += len(doc.text)
        result = {"documents": n, "characters": b}
    else:
        from lmobjectives.store.prepare import prepare_store
        from lmobjectives.tokenizer import load_tokenizer

        m = prepare_store([dataset], load_tokenizer(None), store, val_fraction=0.0, progress=False).manifest
        result = {"documents": m["documents"], "tokens": m["tokens"]}
    print(json.dumps({**result, "seconds": round(time.perf_counter() - start, 1)}))


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _written(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*.bin") if f.is_file())


def measure(dataset: str, mode: str, progress_every: float = 0.0) -> None:
    """``progress_every`` > 0: every so many seconds, one line on stderr with the peaks so far
    and the token bytes the store has written (a long run that must be cut short still says
    how far its figures reach)."""
    with tempfile.TemporaryDirectory(dir=Path(dataset).parent) as tmp:
        proc = subprocess.Popen([sys.executable, __file__, "child", "--dataset", dataset, "--mode", mode,
                                 "--store", str(Path(tmp) / "store")], stdout=subprocess.PIPE, text=True)
        peak: dict[str, int] = {}
        start = last = time.perf_counter()
        while proc.poll() is None:
            try:
                for key, value in _status(proc.pid).items():
                    peak[key] = max(peak.get(key, 0), value)
            except (OSError, ValueError):
                pass
            time.sleep(SAMPLE_SECONDS)
            if progress_every and time.perf_counter() - last > progress_every:
                last = time.perf_counter()
                print(json.dumps({"seconds": round(last - start), "token_bytes_written": _written(Path(tmp)),
                                  **{f"peak_{k}_MiB": round(v / 2**20, 1) for k, v in peak.items()}}),
                      file=sys.stderr, flush=True)
        result = json.loads(proc.stdout.read().strip().splitlines()[-1])
    mib = {f"peak_{k}_MiB": round(v / 2**20, 1) for k, v in peak.items()}
    print(json.dumps({"mode": mode, **result, **mib}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["build", "measure", "child"])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dataset")
    ap.add_argument("--mode", choices=["read", "prepare"], default="prepare")
    ap.add_argument("--store")
    ap.add_argument("--progress-every", type=float, default=0.0)
    a = ap.parse_args()
    if a.what == "build":
        build(a.gb, a.out)
    elif a.what == "measure":
        measure(a.dataset, a.mode, a.progress_every)
    else:
        child(a.dataset, a.mode, a.store)


if __name__ == "__main__":
    main()
