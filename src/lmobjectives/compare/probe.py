"""The representation probe: which source does a held-out document come from, read off a
linear classifier on frozen, mean-pooled last hidden states.

Task. The labels come from the data itself: the corpus arguments a store was prepared from
(``default`` counts as its two parts, ``default:code`` and ``default:prose``); with a single
directory, its first-level subdirectories. Examples are windows of ``seq_len`` tokens from
the store's *validation* documents (no model trained on them), at most
``WINDOWS_PER_DOC`` per document so long files do not dominate, and the same number of
documents from every class (spread over the class's documents) so the majority baseline
stays near 1/classes. Train and test examples come from different documents (every third
chosen document of each class is a test document), so the probe cannot score by
recognising a document it has seen.

Features. Each model reads a window the way its architecture reads an input: a decoder
causally, a prefix-LM decoder and an encoder bidirectionally, an encoder-decoder with its
encoder. The last hidden states of the real tokens are averaged: (N, L, D) -> (N, D).

Classifier. Multinomial logistic regression on standardised features, an L2 penalty of
``L2`` on the mean loss, fitted with L-BFGS in float64 from zero weights (the problem is
convex, so the fit is deterministic). Reported: test accuracy, and the majority baseline
(the train set's most common class, scored on the test set).

Trade-off: a linear probe measures what is *linearly* readable from a frozen model, not what
fine-tuning could reach; it is cheap and has no hyper-parameters to tune per objective, so
it compares representations rather than tuning effort.

Worked example (two 1-D features, two classes)::

    x = [[-2.], [-1.], [1.], [2.]], y = [0, 0, 1, 1]
    fit_logistic(x, y, 2).predict([[-3.], [3.]]) -> [0, 1]
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmobjectives.corpus import is_default_spec, iter_documents
from lmobjectives.corpus.default import DEFAULT_CORPUS, PARTS
from lmobjectives.store.store import TokenStore, is_val
from lmobjectives.tokenizer import encode_data

WINDOWS_PER_DOC = 8
MIN_WINDOW = 16  # tokens; a shorter document is too little text to classify
TEST_EVERY = 3  # every third document of a class is a test document
L2 = 1e-2
LBFGS_STEPS = 100
POOL_BATCH = 16


@dataclass(frozen=True)
class ProbeData:
    """Windows of held-out documents with their source labels."""

    task: str
    classes: tuple[str, ...]
    windows: np.ndarray  # (N, L) int64, PAD after each window's end
    lengths: np.ndarray  # (N,) real tokens per window
    labels: np.ndarray  # (N,) int64 class index
    is_test: np.ndarray  # (N,) bool
    documents: dict[str, int]  # held-out documents per class

    def describe(self) -> dict[str, Any]:
        return {"task": self.task, "classes": list(self.classes), "documents": self.documents,
                "train_windows": int((~self.is_test).sum()), "test_windows": int(self.is_test.sum()),
                "window_tokens": int(self.windows.shape[1])}

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.windows.tobytes())
        h.update(self.labels.tobytes())
        h.update(self.is_test.tobytes())
        return h.hexdigest()


def _label_specs(corpus: list[str]) -> list[str]:
    specs: list[str] = []
    for c in corpus:
        if c == DEFAULT_CORPUS:
            specs += [f"{DEFAULT_CORPUS}:{p}" for p in PARTS]
        else:
            specs.append(c)
    return specs


def _short_names(specs: list[str]) -> dict[str, str]:
    """Class names for corpus arguments: the last path component where that is unambiguous."""
    short = {s: s if is_default_spec(s) else (Path(s.rstrip("/")).name or s) for s in specs}
    if len(set(short.values())) < len(short):
        return {s: s for s in specs}
    return short


def _subdir_label(spec: str, source: str) -> str:
    """First-level subdirectory of ``spec`` holding ``source`` ("." for files at the top)."""
    try:
        rel = Path(source.split(":")[0]).relative_to(Path(spec))
    except ValueError:  # a glob or a single file: no subdirectories to label by
        return "."
    return rel.parts[0] if len(rel.parts) > 1 else "."


def held_out_documents(store: TokenStore, *, encoding: str = "skip",
                       text_field: str = "text") -> tuple[str, list[tuple[str, str]]] | str:
    """(task, [(label, text)]) of the store's validation documents, or why there is no task.

    The store's split is a keyed hash of each text (``is_val``), so re-reading the corpus it
    was prepared from finds exactly its validation documents; the count is checked against
    the manifest, so a corpus that changed since is noticed."""
    m = store.manifest
    corpus = [str(c) for c in m.get("corpus", [])]
    specs = _label_specs(corpus)
    for spec in specs:
        if not is_default_spec(spec) and not Path(spec).exists():
            return f"the corpus {spec} the store was prepared from is no longer there"
    silent = lambda _msg: None  # noqa: E731 - the store's prepare already warned once
    found: list[tuple[str, str]] = []
    names = _short_names(specs)
    for spec in specs:
        for doc in iter_documents([spec], encoding=encoding, text_field=text_field, warn=silent):
            if is_val(doc.text, float(m["val_fraction"]), int(m["seed"])):
                found.append((names[spec], doc.text) if len(specs) > 1 else
                             (_subdir_label(spec, doc.source), doc.text))
    if len(found) != int(m["splits"]["val"]["documents"]):
        return (f"re-reading the corpus found {len(found)} held-out documents, the store holds "
                f"{m['splits']['val']['documents']}: the corpus changed since it was prepared")
    task = ("which corpus argument a held-out document comes from" if len(specs) > 1 else
            f"which subdirectory of {specs[0] if specs else '?'} a held-out document comes from")
    return task, found


def build_probe_data(store: TokenStore, tokenizer: Any, seq_len: int, pad: int, *,
                     encoding: str = "skip", text_field: str = "text") -> ProbeData | str:
    """The probe's examples, or the reason there can be none."""
    got = held_out_documents(store, encoding=encoding, text_field=text_field)
    if isinstance(got, str):
        return got
    task, docs = got
    classes = tuple(sorted({label for label, _ in docs}))
    if len(classes) < 2:
        return ("the probe needs held-out documents from at least two sources "
                "(pass several --corpus arguments, or a directory with subdirectories)")
    ids = encode_data(tokenizer, [text for _, text in docs])
    windows, lengths, labels, doc_of = [], [], [], []
    for d, ((label, _), toks) in enumerate(zip(docs, ids)):
        toks = np.asarray(toks, dtype=np.int64)
        for w in range(WINDOWS_PER_DOC):
            piece = toks[w * seq_len:(w + 1) * seq_len]
            if len(piece) < MIN_WINDOW or (w > 0 and len(piece) < seq_len):
                break
            row = np.full(seq_len, pad, dtype=np.int64)
            row[:len(piece)] = piece
            windows.append(row)
            lengths.append(len(piece))
            labels.append(classes.index(label))
            doc_of.append(d)
    labels_a, doc_a = np.asarray(labels, dtype=np.int64), np.asarray(doc_of)
    docs_by_class = [np.unique(doc_a[labels_a == c]) for c in range(len(classes))]  # corpus order
    n_docs = min(len(d) for d in docs_by_class)
    if n_docs < 2:
        return ("the probe needs at least two held-out documents of every source; "
                f"{', '.join(f'{c}: {len(d)}' for c, d in zip(classes, docs_by_class))} "
                "(raise data.val_fraction)")
    keep = np.zeros(len(labels_a), dtype=bool)
    is_test = np.zeros(len(labels_a), dtype=bool)
    for docs_c in docs_by_class:
        # The same number of documents from every class, spread over the class's documents.
        chosen = docs_c[np.linspace(0, len(docs_c) - 1, n_docs).round().astype(int)]
        keep |= np.isin(doc_a, chosen)
        is_test |= np.isin(doc_a, chosen[::TEST_EVERY])
    return ProbeData(task=task, classes=classes, windows=np.stack(windows)[keep],
                     lengths=np.asarray(lengths, dtype=np.int64)[keep], labels=labels_a[keep],
                     is_test=is_test[keep], documents={c: n_docs for c in classes})


# ------------------------------------------------------------------------------ features
def _backbone_states(model: torch.nn.Module, architecture: str, ids: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, L, D) of ``ids`` read as the architecture reads an input."""
    model = getattr(model, "lm", model)  # an MTP model: its plain causal LM (trunk + head 1)
    if architecture == "encoder_decoder":
        return model.get_encoder()(input_ids=ids, attention_mask=valid.long()).last_hidden_state
    if architecture == "encoder":
        return model.base_model(input_ids=ids, attention_mask=valid.long()).last_hidden_state
    if architecture == "prefix_lm":
        # The whole window is the prefix: every real token sees every real token.
        L = ids.shape[1]
        mask = valid[:, None, :] & valid[:, :, None]  # (B, L, L)
        mask |= torch.eye(L, dtype=torch.bool, device=ids.device)[None]
        return model.base_model(input_ids=ids, attention_mask=mask[:, None]).last_hidden_state
    return model.base_model(input_ids=ids, attention_mask=valid.long()).last_hidden_state


@torch.no_grad()
def pooled_states(model: torch.nn.Module, architecture: str, data: ProbeData,
                  device: torch.device) -> np.ndarray:
    """Mean of the last hidden states over each window's real tokens: (N, D) float64."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(data.windows), POOL_BATCH):
            ids = torch.from_numpy(data.windows[i:i + POOL_BATCH]).to(device)  # (B, L)
            n = torch.from_numpy(data.lengths[i:i + POOL_BATCH]).to(device)  # (B,)
            valid = torch.arange(ids.shape[1], device=device)[None, :] < n[:, None]  # (B, L)
            h = _backbone_states(model, architecture, ids, valid).float()  # (B, L, D)
            pooled = (h * valid[..., None]).sum(1) / n[:, None]  # (B, D)
            out.append(pooled.double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out)


# ---------------------------------------------------------------------------- classifier
@dataclass(frozen=True)
class LogisticModel:
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    weight: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale  # (N, D)
        return np.argmax(z @ self.weight + self.bias, axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = L2) -> LogisticModel:
    """Multinomial logistic regression, L2-penalised, on standardised features."""
    x = np.asarray(x, dtype=np.float64)  # (N, D)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant features stay 0 after centring
    z = torch.from_numpy((x - mean) / scale)
    target = torch.from_numpy(np.asarray(y, dtype=np.int64))
    W = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=LBFGS_STEPS, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ W + b, target) + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(mean=mean, scale=scale, weight=W.detach().numpy(), bias=b.detach().numpy())


def probe_accuracy(features: np.ndarray, data: ProbeData) -> dict[str, float | int]:
    """Fit on the train documents' windows, score on the test documents' windows."""
    tr, te = ~data.is_test, data.is_test
    model = fit_logistic(features[tr], data.labels[tr], len(data.classes))
    pred = model.predict(features[te])
    majority = int(np.bincount(data.labels[tr], minlength=len(data.classes)).argmax())
    return {"accuracy": float((pred == data.labels[te]).mean()),
            "baseline": float((data.labels[te] == majority).mean()),
            "n_train": int(tr.sum()), "n_test": int(te.sum())}
