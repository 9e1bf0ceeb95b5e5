"""What the token probes share: the held-out documents of a store, a model's last hidden
states read the way its architecture reads an input, and a linear classifier.

Held-out documents. The store's split is a keyed hash of each text (``store.is_val``), so
re-reading the corpus it was prepared from finds exactly its validation documents; no
compared model trained on them. (Until the token probes, ``lmobj compare`` probed *which
source* a window came from; mean pooling of untrained features solved that task as well as
any trained model, so it measured nothing pre-training adds and was dropped.)

Features. A decoder reads causally, a prefix-LM decoder and an encoder bidirectionally (the
whole window is the prefix), an encoder-decoder with its encoder.

Classifier. Multinomial logistic regression on standardised features, an L2 penalty of
``L2`` on the mean loss, fitted with L-BFGS in float64 from zero weights (the problem is
convex, so the fit is deterministic).

Trade-off: a linear probe measures what is *linearly* readable from a frozen model, not what
fine-tuning could reach; it is cheap and has no hyper-parameters to tune per objective, so
it compares representations rather than tuning effort.

Worked example (two 1-D features, two classes)::

    x = [[-2.], [-1.], [1.], [2.]], y = [0, 0, 1, 1]
    fit_logistic(x, y, 2).predict([[-3.], [3.]]) -> [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmobjectives.corpus import is_default_spec, iter_documents
from lmobjectives.corpus.default import DEFAULT_CORPUS, PARTS
from lmobjectives.store.store import TokenStore, is_val

L2 = 1e-2
LBFGS_STEPS = 100


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


# ------------------------------------------------------------------------------ features
def backbone_states(model: torch.nn.Module, architecture: str, ids: torch.Tensor,
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


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float = L2,
                 balanced: bool = False) -> LogisticModel:
    """Multinomial logistic regression, L2-penalised, on standardised features; ``balanced``
    weights each class by the inverse of its count (scored by balanced accuracy)."""
    x = np.asarray(x, dtype=np.float64)  # (N, D)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant features stay 0 after centring
    z = torch.from_numpy((x - mean) / scale)
    target = torch.from_numpy(np.asarray(y, dtype=np.int64))
    W = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weight = torch.from_numpy(len(y) / (n_classes * np.maximum(counts, 1))) if balanced else None
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=LBFGS_STEPS, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ W + b, target, weight=weight) + l2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogisticModel(mean=mean, scale=scale, weight=W.detach().numpy(), bias=b.detach().numpy())
