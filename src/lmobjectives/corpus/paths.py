"""Corpus arguments -> files: directories walked, globs expanded, the default corpus's code
files, each file once, in a fixed order (the rules are in ``corpus/readers.py``)."""

from __future__ import annotations

import os
from glob import glob
from pathlib import Path
from typing import Sequence

from lmobjectives.corpus import default as default_corpus
from lmobjectives.corpus import hf_datasets
from lmobjectives.errors import UserError
from lmobjectives.util import sha256_file

_GLOB_CHARS = frozenset("*?[")


def as_list(paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[str]:
    # A bare string would otherwise be iterated character by character.
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def _walk(root: Path) -> list[Path]:
    real_root = root.resolve()
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):  # never follows directory symlinks
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            # Keep corpus reads inside the directory the user named.
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                continue
            if path.is_file():
                found.append(path)
    return sorted(found)


def _expand(arg: str) -> list[Path]:
    if default_corpus.is_default_spec(arg):
        parts = default_corpus.parse_default_spec(arg)
        return default_corpus.default_code_files() if default_corpus.CODE in parts else []
    if _GLOB_CHARS.intersection(arg):
        matches = sorted(glob(arg, recursive=True))
        if not matches:
            raise UserError(f"corpus pattern {arg!r} matches no files")
        out: list[Path] = []
        for m in matches:
            p = Path(m)
            out.extend(_walk(p) if p.is_dir() else [p] if p.is_file() else [])
        if not out:
            raise UserError(f"corpus pattern {arg!r} matches only empty directories")
        return out
    path = Path(arg)
    if not path.exists():
        raise UserError(f"corpus path {arg!r} does not exist")
    if hf_datasets.is_datasets_dir(path):
        return [path]  # one dataset, read through its own format (corpus/hf_datasets.py)
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise UserError(f"corpus directory {arg!r} contains no files")
        return files
    return [path]


def resolve_files(paths: Sequence[str | os.PathLike[str]] | str) -> list[Path]:
    """The files a list of corpus arguments names (see module docstring for the rules).

    The default corpus contributes its code files; its prose part has no files (it is a
    module attribute) and is covered by `file_fingerprints` instead.
    """
    return [p for kind, p in reading_plan(as_list(paths)) if kind == "file"]  # type: ignore[misc]


def file_fingerprints(paths: Sequence[str | os.PathLike[str]] | str, *, split: str = "train") -> dict[str, str]:
    """`{path: sha256 of its bytes}` for every corpus file, in reading order.

    A default-corpus spec contributes one entry per part instead of one per file:
    `"default:prose"` and/or `"default:code"`, each the part fingerprint of `corpus.default`.
    """
    out: dict[str, str] = {}
    plain: list[str] = []
    for arg in as_list(paths):
        if default_corpus.is_default_spec(arg):
            out.update(default_corpus.part_fingerprints(default_corpus.parse_default_spec(arg)))
        else:
            plain.append(arg)
    if plain:
        for p in resolve_files(plain):
            if hf_datasets.is_datasets_dir(p):  # the dataset's own fingerprint, for ``split``
                key, fingerprint = hf_datasets.datasets_fingerprint(p, split)
                out[key] = fingerprint
            else:
                out[str(p)] = sha256_file(p)
    if not out:
        raise UserError("no corpus paths given")
    return out


def reading_plan(args: list[str]) -> list[tuple[str, Path | None]]:
    """("prose", None) and ("file", path) steps in argument order; every path checked up front,
    so a typo in the last argument fails before any reading."""
    if not args:
        raise UserError("no corpus paths given")
    plan: list[tuple[str, Path | None]] = []
    seen: set[Path] = set()
    prose_done = False
    for arg in args:
        if (default_corpus.is_default_spec(arg) and not prose_done
                and default_corpus.PROSE in default_corpus.parse_default_spec(arg)):
            plan.append(("prose", None))
            prose_done = True
        for p in _expand(arg):
            if (key := p.resolve()) not in seen:
                seen.add(key)
                plan.append(("file", p))
    return plan
