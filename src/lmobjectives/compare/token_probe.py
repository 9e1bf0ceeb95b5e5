"""Token-level probes: which left- and right-context facts a frozen model's per-token
hidden states hold, read off a linear classifier on held-out documents.

Data. The store's validation documents (no model trained on them; ``probe.held_out_documents``)
are split into code (``probe_labels.is_code``) and prose; each task of
``probe_labels.TASKS`` labels the tokens of the documents of its kind. Windows are the first
``WINDOWS_PER_DOC`` windows of ``seq_len`` tokens of each document; every ``TEST_EVERY``-th
document (in store order, per kind) is a test document, so train and test tokens never share
a document. At most ``MAX_TOKENS`` labelled tokens per task and split are kept (an even
spread), so one long document does not dominate.

Features. The last hidden state at each labelled position, the window read the way the
architecture reads an input (``probe.backbone_states``: a decoder causally, a prefix-LM and
an encoder bidirectionally, an encoder-decoder's encoder).

Score. A class-weighted logistic regression (``probe.fit_logistic``) fitted on the train
documents, scored by *balanced accuracy* (mean recall over the two classes) on the test
documents, so a majority-class guess scores 0.5 whatever the class balance. A family's score
is the mean over its tasks.

Trade-off: per-token probes cost one forward pass over a few hundred windows per model; the
mean over four tasks per family keeps one odd task from deciding a family.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmobjectives.compare.probe import backbone_states, fit_logistic, held_out_documents
from lmobjectives.compare.probe_labels import LEFT, RIGHT, TASKS, is_code, token_labels

WINDOWS_PER_DOC = 4
TEST_EVERY = 3
MAX_TOKENS = 1500  # labelled tokens per task and split
MIN_PER_CLASS = 5  # a task with fewer train or test tokens of a class is not scored
POOL_BATCH = 16


@dataclass(frozen=True)
class TokenProbeData:
    windows: np.ndarray  # (N, L) int64, PAD after each window's end
    lengths: np.ndarray  # (N,)
    tasks: dict[str, dict[str, np.ndarray]]  # task -> {"window", "pos", "label", "test"} (M,) each
    documents: dict[str, int]  # held-out documents per kind
    skipped: dict[str, str]  # task -> why it is not scored

    def describe(self) -> dict[str, Any]:
        info = {t.name: {"family": t.family, "kind": t.kind, "says": t.says} for t in TASKS}
        for name, d in self.tasks.items():
            info[name].update(train_tokens=int((~d["test"]).sum()), test_tokens=int(d["test"].sum()),
                              positive_share=round(float(d["label"].mean()), 3))
        for name, why in self.skipped.items():
            info[name]["skipped"] = why
        return {"kind": "token", "documents": self.documents, "tasks": info,
                "window_tokens": int(self.windows.shape[1]), "windows": int(len(self.windows))}

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.windows.tobytes())
        for name in sorted(self.tasks):
            for k in ("window", "pos", "label", "test"):
                h.update(self.tasks[name][k].tobytes())
        return h.hexdigest()


def _spread(idx: np.ndarray, n: int) -> np.ndarray:
    return idx if len(idx) <= n else idx[np.linspace(0, len(idx) - 1, n).round().astype(int)]


def _doc_windows(tokenizer: Any, text: str, seq_len: int) -> list[tuple[np.ndarray, list]]:
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids, offs = np.asarray(enc.ids, dtype=np.int64), list(enc.offsets)
    out = []
    for w in range(WINDOWS_PER_DOC):
        piece = ids[w * seq_len:(w + 1) * seq_len]
        if len(piece) < seq_len and w > 0 or len(piece) == 0:
            break
        out.append((piece, offs[w * seq_len:w * seq_len + len(piece)]))
    return out


def build_token_probe(store: Any, tokenizer: Any, seq_len: int, pad: int, *,
                      encoding: str = "skip", text_field: str = "text") -> TokenProbeData | str:
    """The probe's windows and labelled positions, or why there can be none."""
    got = held_out_documents(store, encoding=encoding, text_field=text_field)
    if isinstance(got, str):
        return got
    docs = [text for _, text in got[1]]
    kinds = ["code" if is_code(t) else "prose" for t in docs]
    windows, lengths = [], []
    rows: dict[str, list[tuple[int, int, int, bool]]] = {t.name: [] for t in TASKS}
    seen = {"code": 0, "prose": 0}
    for text, kind in zip(docs, kinds):
        test = seen[kind] % TEST_EVERY == TEST_EVERY - 1
        seen[kind] += 1
        labels = {t.name: t.label(text) for t in TASKS if t.kind == kind}
        for piece, offs in _doc_windows(tokenizer, text, seq_len):
            w = len(windows)
            row = np.full(seq_len, pad, dtype=np.int64)
            row[:len(piece)] = piece
            windows.append(row)
            lengths.append(len(piece))
            for name, lab in labels.items():
                for p, y in enumerate(token_labels(lab, offs, text)):
                    if y >= 0:
                        rows[name].append((w, p, int(y), test))
    if not windows:
        return "no held-out documents to probe"
    tasks, skipped = {}, {}
    for name, items in rows.items():
        a = np.asarray(items, dtype=np.int64).reshape(-1, 4)
        keep = np.concatenate([_spread(np.flatnonzero(a[:, 3] == s), MAX_TOKENS) for s in (0, 1)])
        a = a[np.sort(keep)]
        counts = [int(((a[:, 3] == s) & (a[:, 2] == c)).sum()) for s in (0, 1) for c in (0, 1)]
        if min(counts) < MIN_PER_CLASS:
            skipped[name] = (f"too few labelled tokens (train 0/1: {counts[0]}/{counts[1]}, "
                             f"test 0/1: {counts[2]}/{counts[3]}; at least {MIN_PER_CLASS} each)")
            continue
        tasks[name] = {"window": a[:, 0], "pos": a[:, 1], "label": a[:, 2], "test": a[:, 3].astype(bool)}
    return TokenProbeData(windows=np.stack(windows), lengths=np.asarray(lengths, dtype=np.int64),
                          tasks=tasks, documents=dict(seen), skipped=skipped)


@torch.no_grad()
def token_states(model: torch.nn.Module, architecture: str, data: TokenProbeData,
                 device: torch.device) -> np.ndarray:
    """Last hidden states of every window: (N, L, D) float32."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(data.windows), POOL_BATCH):
            ids = torch.from_numpy(data.windows[i:i + POOL_BATCH]).to(device)  # (B, L)
            n = torch.from_numpy(data.lengths[i:i + POOL_BATCH]).to(device)  # (B,)
            valid = torch.arange(ids.shape[1], device=device)[None, :] < n[:, None]  # (B, L)
            out.append(backbone_states(model, architecture, ids, valid).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)


def balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean recall over the classes present in ``y``."""
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def score_tasks(states: np.ndarray, data: TokenProbeData) -> dict[str, Any]:
    """Balanced test accuracy per task and the mean per family."""
    per_task = {}
    for name, d in data.tasks.items():
        x = states[d["window"], d["pos"]].astype(np.float64)  # (M, D)
        tr, te, y = ~d["test"], d["test"], d["label"]
        model = fit_logistic(x[tr], y[tr], 2, balanced=True)
        per_task[name] = balanced_accuracy(model.predict(x[te]), y[te])
    family = {f: [per_task[t.name] for t in TASKS if t.family == f and t.name in per_task]
              for f in (LEFT, RIGHT)}
    return {"tasks": per_task, **{f: (float(np.mean(v)) if v else None) for f, v in family.items()}}
