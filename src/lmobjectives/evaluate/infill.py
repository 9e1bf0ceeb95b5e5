"""Single-line infilling exact match: blank out one line of a held-out document, ask the
model for it with a FIM prompt, and count answers equal to the line character for character
(the single-line task of the FIM paper §4 and HumanEval-infilling, on our own held-out code).

Choice of lines, deterministic in ``seed``: a line is eligible when it is not blank and holds
at most ``max_line_chars`` characters (its indentation counts). Document ``d`` orders its
eligible lines by a permutation drawn from ``default_rng([seed, d])``; sample ``i`` takes
document ``i % D`` and the ``i // D``-th line of its order, so a split with fewer documents
than samples gives several distinct lines per document. Worked example, D = 2 documents with
eligible lines [0, 2, 3] and [1], n = 3::

    sample 0 -> doc 0, first line of its permutation (say 3)
    sample 1 -> doc 1, line 1
    sample 2 -> doc 0, second line of its permutation (say 0)
    (a 4th sample would want doc 1's second line: there is none, so it is skipped)

The middle is the line without its newline: prefix = the text up to the line's first
character, suffix = the rest from the newline on. Decoding stops at EOS, at a newline, or once
the answer is longer than the line (it can no longer match). Trade-off: one line is a narrow
test of infilling, but it is cheap (a line is a few tokens) and its answer is unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_LINE_CHARS = 80
DEFAULT_SAMPLES = 20


@dataclass(frozen=True)
class LineTask:
    doc: int
    line: int  # 0-based line number in the document
    prefix: str
    middle: str
    suffix: str


def eligible_lines(text: str, max_line_chars: int = MAX_LINE_CHARS) -> list[int]:
    return [i for i, line in enumerate(text.split("\n"))
            if line.strip() and len(line) <= max_line_chars]


def line_tasks(documents: list[str], n: int, seed: int,
               max_line_chars: int = MAX_LINE_CHARS) -> list[LineTask]:
    """Up to ``n`` (document, line) tasks, chosen as the module docstring says."""
    orders = [np.random.default_rng([seed, d]).permutation(eligible_lines(text, max_line_chars))
              for d, text in enumerate(documents)]
    D = len(documents)
    tasks: list[LineTask] = []
    for i in range(n if D else 0):
        d, k = i % D, i // D
        if k >= len(orders[d]):
            continue
        lines = documents[d].split("\n")
        j = int(orders[d][k])
        start = sum(len(l) + 1 for l in lines[:j])
        end = start + len(lines[j])
        text = documents[d]
        tasks.append(LineTask(doc=d, line=j, prefix=text[:start], middle=text[start:end],
                              suffix=text[end:]))
    return tasks


def infill_exact_match(loaded: Any, documents: list[str], n: int = DEFAULT_SAMPLES,
                       seed: int = 0, *, max_line_chars: int = MAX_LINE_CHARS,
                       mode: str = "psm", context_tokens: int | None = None) -> dict[str, Any]:
    """Share of ``n`` single-line tasks from ``documents`` that ``loaded`` (a decoder,
    ``infer.load.Loaded``) fills exactly, greedy. ``context_tokens``: the trained length.
    ``mode`` "psm"/"spm" prompts with FIM sentinels; "left_to_right" continues the prefix
    alone (the baseline of a model trained without FIM)."""
    from lmobjectives.infer.infill import infill_fim, infill_left_to_right

    tasks = line_tasks(documents, n, seed, max_line_chars)
    hits = 0
    for task in tasks:
        # Every text token carries at least one byte: a right answer needs at most one token
        # per byte of the line, plus its EOS or newline.
        budget = len(task.middle.encode("utf-8")) + 1
        if mode == "left_to_right":
            got = infill_left_to_right(loaded.model, loaded.tokenizer, loaded.specials,
                                       task.prefix, task.suffix, max_new_tokens=budget,
                                       single_line=True, max_chars=len(task.middle),
                                       context_tokens=context_tokens)
        else:
            got = infill_fim(loaded.model, loaded.tokenizer, loaded.specials, task.prefix,
                             task.suffix, mode=mode, max_new_tokens=budget,
                             single_line=True, max_chars=len(task.middle),
                             context_tokens=context_tokens)
        hits += got.middle == task.middle
    return {"exact_match": hits / len(tasks) if tasks else None, "samples": len(tasks),
            "hits": hits}


def document_texts(table: Any, tokenizer: Any, eos: int) -> list[str]:
    """The documents of a store split (``store.DocTable``) as text, EOS dropped."""
    out = []
    for i in range(len(table.docs)):
        ids = table.document(i)
        out.append(tokenizer.decode([int(t) for t in ids if t != eos], skip_special_tokens=False))
    return out
