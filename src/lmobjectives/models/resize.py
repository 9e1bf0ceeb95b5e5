"""Growing a trained model's vocabulary for an extended tokenizer, and training only the new rows.

New embedding rows start as the mean of the old embeddings of the pieces the old tokenizer
split the new string into (the "fast vocabulary transfer" initialisation), in the input
embeddings and, when they are not tied, in the output embeddings (and output bias) too.

Why not random rows: a trained model's logits are mostly large and negative, so a new
output row near zero gets a logit far above the rest and the model puts almost all its
probability on the new tokens (Hewitt 2021, "Initializing New Word Embeddings"); the first
steps are then spent undoing that. Why not the global mean of all embeddings (Hewitt's fix,
transformers' ``mean_resizing``): it keeps the distribution sane but says nothing about
what the token means, while the mean of its pieces already points near the right place.

Worked example (d = 2): old rows ``E[5] = [1, 0]``, ``E[9] = [0, 3]``; the new token 12
stands for pieces (5, 9)::

    E[12] = (E[5] + E[9]) / 2 = [0.5, 1.5]

Padded vocabularies (a model with more rows than its tokenizer has tokens, e.g. rounded to
a multiple of 64): a new id that lands on an existing, never-trained padding row is
initialised the same way, not left as it was.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from lmobjectives.errors import UserError


def _embedding_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters indexed by token id along dim 0: input embeddings, untied output
    embeddings and an output bias if the model has one."""
    out = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None:
        if head.weight is not out[0]:
            out.append(head.weight)
        bias = getattr(head, "bias", None)
        if isinstance(bias, torch.nn.Parameter):
            out.append(bias)
    return out


@torch.no_grad()
def add_token_rows(model: torch.nn.Module, pieces: dict[int, Iterable[int]]) -> list[int]:
    """Make room for every id in ``pieces`` and set its rows to the mean of its pieces' rows.

    ``pieces`` maps a new id to the old ids it stands for. Returns the ids initialised,
    sorted. Old rows are never changed.
    """
    if not pieces:
        return []
    rows = model.get_input_embeddings().num_embeddings
    new_ids = sorted(int(i) for i in pieces)
    piece_lists = {i: [int(p) for p in pieces[i]] for i in new_ids}
    for i, ps in piece_lists.items():
        if not ps or any(p >= rows or p in piece_lists for p in ps):
            raise UserError(f"cannot initialise token {i} from pieces {ps}: pieces must be old ids "
                            f"below {rows}; the tokenizer extension does not belong to this model")
    need = max(new_ids) + 1
    if need > rows:
        model.resize_token_embeddings(need, mean_resizing=False)
    for param in _embedding_params(model):
        data = param.data  # (V, d) or (V,)
        for i in new_ids:
            idx = torch.as_tensor(piece_lists[i], device=data.device)
            data[i] = data[idx].float().mean(dim=0).to(data.dtype)
    return new_ids


class NewRowsOnly:
    """Gradient filter for the first ``steps`` optimizer steps: only the rows of ``new_ids``
    in the token-indexed parameters change; every other parameter keeps its value exactly.

    Used around one optimizer step: ``before_clip`` drops the gradients of everything else
    (AdamW skips a parameter whose ``grad`` is None, so it gets neither an update nor
    weight decay) and zeroes the gradient of old rows; weight decay still touches whole
    matrices, so ``after_step`` puts the old rows back from the copy taken before.
    """

    def __init__(self, model: torch.nn.Module, new_ids: Iterable[int], steps: int) -> None:
        self.model, self.steps = model, int(steps)
        self.params = _embedding_params(model)
        ids = np.asarray(sorted(new_ids), dtype=np.int64)
        if len(ids) == 0:
            raise UserError("--train-new-embeddings-first needs new tokens: train with an extended "
                            "tokenizer (`lmobj tokenizer extend`) on a model that lacks them")
        self.new_ids = ids
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def active(self, step: int) -> bool:
        return step < self.steps

    def before_clip(self) -> None:
        keep = {id(p) for p in self.params}
        for p in self.model.parameters():
            if id(p) not in keep:
                p.grad = None
        self._saved = []
        for p in self.params:
            old = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
            old[torch.as_tensor(self.new_ids, device=p.device)] = False
            if p.grad is not None:
                p.grad[old] = 0
            self._saved.append((old, p.data[old].clone()))

    @torch.no_grad()
    def after_step(self) -> None:
        for p, (old, values) in zip(self.params, self._saved):
            p.data[old] = values
        self._saved = []
