"""Token-probe labels computed offline from raw text, in two families.

A *left-context* task's label is decided by what comes before a character (a causal model at
that position has seen it); a *right-context* task's label is decided by what comes after it
(a causal model at that position has not, a bidirectional one has). Labels are computed per
character; ``token_labels`` moves them onto a tokenizer's tokens through its offsets.

Code tasks read Python's own ``tokenize`` (a document is code when ``ast.parse`` accepts
it); prose tasks read words (``[A-Za-z]+``) and sentence punctuation. Each task marks which
characters are *eligible* (the positions it classifies) and their label (0/1):

    code_in_brackets  left   every token char: inside ( [ { at bracket depth > 0
    code_in_string    left   every token char: inside a string literal
    code_called       right  identifier chars: the next token is "("
    code_line_colon   right  chars of a line's tokens: the logical line ends with ":"
    prose_in_quotes   left   word chars: inside a double-quoted passage
    prose_sent_start  left   word chars: the word begins a sentence
    prose_sent_end    right  word chars: the word is followed by . ! or ?
    prose_next_cap    right  word chars: the next word starts with a capital letter

Worked example (``code_called`` on ``f(x) + y.z``): eligible f x y z, label 1 only for f.
"""

from __future__ import annotations

import ast
import io
import keyword
import re
import tokenize
from dataclasses import dataclass
from typing import Callable

import numpy as np

LEFT, RIGHT = "left", "right"
_WORD = re.compile(r"[A-Za-z]+")
_SENT_END = ".!?"
_OPEN, _CLOSE = "([{", ")]}"
_SKIP = (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT,
         tokenize.ENDMARKER, tokenize.ENCODING)

Labels = tuple[np.ndarray, np.ndarray]  # (eligible (C,) bool, label (C,) int8) per character


@dataclass(frozen=True)
class Task:
    name: str
    family: str  # LEFT or RIGHT
    kind: str  # "code" or "prose": which documents it applies to
    label: Callable[[str], Labels]
    says: str


def is_code(text: str) -> bool:
    """Python source: ``ast.parse`` accepts it (prose almost never parses)."""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return bool(text.strip())


def _line_starts(text: str) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(l) for l in text.splitlines(keepends=True)])])


def _py_tokens(text: str) -> list[tuple[tokenize.TokenInfo, int, int]]:
    """(token, start char, end char) of every significant Python token."""
    starts = _line_starts(text)
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in _SKIP:
            continue
        a = int(starts[tok.start[0] - 1]) + tok.start[1]
        b = int(starts[tok.end[0] - 1]) + tok.end[1]
        out.append((tok, a, b))
    return out


def _empty(text: str) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(text), dtype=bool), np.zeros(len(text), dtype=np.int8)


def code_in_brackets(text: str) -> Labels:
    ok, lab = _empty(text)
    depth = 0
    for tok, a, b in _py_tokens(text):
        if tok.type == tokenize.OP and tok.string in _CLOSE:
            depth = max(depth - 1, 0)
        ok[a:b], lab[a:b] = True, int(depth > 0)
        if tok.type == tokenize.OP and tok.string in _OPEN:
            depth += 1
    return ok, lab


def code_in_string(text: str) -> Labels:
    ok, lab = _empty(text)
    for tok, a, b in _py_tokens(text):
        ok[a:b], lab[a:b] = True, int(tok.type == tokenize.STRING)
    return ok, lab


def code_called(text: str) -> Labels:
    ok, lab = _empty(text)
    toks = _py_tokens(text)
    for i, (tok, a, b) in enumerate(toks):
        if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
            nxt = toks[i + 1][0].string if i + 1 < len(toks) else ""
            ok[a:b], lab[a:b] = True, int(nxt == "(")
    return ok, lab


def code_line_colon(text: str) -> Labels:
    ok, lab = _empty(text)
    line: list[tuple[int, int]] = []
    last = ""
    starts = _line_starts(text)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NEWLINE:  # the end of a logical line
            for a, b in line:
                ok[a:b], lab[a:b] = True, int(last == ":")
            line, last = [], ""
        elif tok.type not in _SKIP:
            a = int(starts[tok.start[0] - 1]) + tok.start[1]
            b = int(starts[tok.end[0] - 1]) + tok.end[1]
            line.append((a, b))
            last = tok.string
    return ok, lab


def _words(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]


def _prev_nonspace(text: str, i: int) -> str:
    j = i - 1
    while j >= 0 and text[j].isspace():
        j -= 1
    return text[j] if j >= 0 else ""


def prose_in_quotes(text: str) -> Labels:
    ok, lab = _empty(text)
    inside, quoted = False, np.zeros(len(text), dtype=bool)
    for i, ch in enumerate(text):
        if ch in '"\u201c\u201d':
            inside = ch == "\u201c" or (ch == '"' and not inside)
        quoted[i] = inside
    for a, b in _words(text):
        ok[a:b], lab[a:b] = True, int(quoted[a])
    return ok, lab


def prose_sent_start(text: str) -> Labels:
    ok, lab = _empty(text)
    for a, b in _words(text):
        before = text[:a].rstrip(" \t\"'\u201c(")
        start = not before or before[-1] in _SENT_END or before.endswith("\n\n")
        ok[a:b], lab[a:b] = True, int(start)
    return ok, lab


def prose_sent_end(text: str) -> Labels:
    ok, lab = _empty(text)
    for a, b in _words(text):
        ok[a:b], lab[a:b] = True, int(b < len(text) and text[b] in _SENT_END)
    return ok, lab


def prose_next_cap(text: str) -> Labels:
    ok, lab = _empty(text)
    words = _words(text)
    for (a, b), (c, _) in zip(words, words[1:]):
        ok[a:b], lab[a:b] = True, int(text[c].isupper())
    return ok, lab


TASKS: tuple[Task, ...] = (
    Task("code_in_brackets", LEFT, "code", code_in_brackets, "inside ( [ { (bracket depth > 0)"),
    Task("code_in_string", LEFT, "code", code_in_string, "inside a string literal"),
    Task("code_called", RIGHT, "code", code_called, "an identifier next called with ("),
    Task("code_line_colon", RIGHT, "code", code_line_colon, "on a line that ends with :"),
    Task("prose_in_quotes", LEFT, "prose", prose_in_quotes, "a word inside double quotes"),
    Task("prose_sent_start", LEFT, "prose", prose_sent_start, "a word that begins a sentence"),
    Task("prose_sent_end", RIGHT, "prose", prose_sent_end, "a word followed by . ! or ?"),
    Task("prose_next_cap", RIGHT, "prose", prose_next_cap, "a word whose next word is capitalised"),
)


def token_labels(labels: Labels, offsets: list[tuple[int, int]], text: str) -> np.ndarray:
    """Per token: -1 (not classified) or its 0/1 label. A token is classified when every
    non-space character it covers is eligible (so it never contains the deciding character
    itself); its label is its first such character's."""
    ok, lab = labels
    out = np.full(len(offsets), -1, dtype=np.int64)
    for t, (a, b) in enumerate(offsets):
        chars = [i for i in range(a, min(b, len(text))) if not text[i].isspace()]
        if chars and all(ok[i] for i in chars):
            out[t] = int(lab[chars[0]])
    return out
