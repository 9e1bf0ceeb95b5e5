"""The embedded default corpus: the running interpreter's own standard library.

Every Python installation carries two things a small language model can learn from without a
download: its standard-library source (code) and the `pydoc_data` help topics (English prose
about the language, the text `help("if")` prints). `lmobj train` with no arguments uses them.

Selection rule (fixed, so the same interpreter always gives the same corpus):

* code: every `*.py` directly in the stdlib directory (`sysconfig.get_paths()["stdlib"]`), plus
  every `*.py` below the packages in `CODE_PACKAGES`, skipping any directory named in
  `EXCLUDED_DIRS` (test suites) and `__pycache__`; sorted by path relative to the stdlib
  directory. On CPython 3.11.7 this is 288 files, 6.7 MB.
* prose: `pydoc_data.topics.topics`, a dict topic name -> text; one document per topic, sorted
  by name (79 topics, 0.46 MB on CPython 3.11).

Trade-off: the corpus depends on the interpreter version (3.11 and 3.12 differ), so it is
identified by a fingerprint, not by a name. The fingerprint is a sha256 over (name, content)
pairs, each framed by its length, so no two different corpora can collide by moving bytes
between neighbours:

    items  [("a.py", b"x=1\\n")]
    hashed b"a.py" b"\\0" (4).to_bytes(8) b"x=1\\n"

Spec strings: `"default"` means both parts, `"default:code"` and `"default:prose"` one part
(continual pre-training trains on the prose first, then continues on the code).
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from lmobjectives.errors import UserError

DEFAULT_CORPUS = "default"
CODE = "code"
PROSE = "prose"
PARTS: tuple[str, ...] = (PROSE, CODE)

# Packages chosen for varied, idiomatic, self-contained code: parsing (json, re, html, email),
# networking (urllib, http), concurrency (asyncio, concurrent), data structures (collections),
# plumbing (logging, importlib). Heavy or generated packages (encodings, idlelib, tkinter,
# distutils, lib2to3, pydoc_data) are left out to keep the corpus a few MB.
CODE_PACKAGES: tuple[str, ...] = (
    "asyncio", "collections", "concurrent", "email", "html", "http", "importlib", "json",
    "logging", "re", "urllib",
)
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
PROSE_SOURCE_PREFIX = "pydoc_data.topics:"

SELECTION_RULE = (
    "code: *.py directly in the stdlib directory plus *.py below the packages "
    f"{', '.join(CODE_PACKAGES)} (skipping directories named {', '.join(sorted(EXCLUDED_DIRS))}), "
    "sorted by relative path; prose: pydoc_data.topics.topics, one document per topic, sorted by name"
)


def is_default_spec(path: object) -> bool:
    """True for "default", "default:code", "default:prose" (and malformed "default:..." specs)."""
    return isinstance(path, str) and (path == DEFAULT_CORPUS or path.startswith(DEFAULT_CORPUS + ":"))


def parse_default_spec(spec: str) -> tuple[str, ...]:
    """The parts a default spec names, in the order documents are yielded (prose, then code)."""
    if spec == DEFAULT_CORPUS:
        return PARTS
    part = spec[len(DEFAULT_CORPUS) + 1:]
    if part not in PARTS:
        raise UserError(
            f"unknown default corpus part {spec!r}; use {DEFAULT_CORPUS!r}, "
            f"'{DEFAULT_CORPUS}:{CODE}' or '{DEFAULT_CORPUS}:{PROSE}' "
            f"(write ./{spec} for a file of that name)"
        )
    return (part,)


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not (path / "os.py").is_file():
        raise UserError(
            f"the default corpus needs the standard library's .py sources, but {path} has none "
            "(a zipped or stripped Python install); pass a corpus path instead"
        )
    return path


@lru_cache(maxsize=1)
def _code_files() -> tuple[Path, ...]:
    root = stdlib_dir()
    files = [p for p in root.glob("*.py") if p.is_file()]
    for package in CODE_PACKAGES:
        pkg = root / package
        if not pkg.is_dir():  # e.g. `re` is a module, not a package, before 3.11
            continue
        for p in pkg.rglob("*.py"):
            rel_dirs = p.relative_to(root).parts[:-1]
            if p.is_file() and not EXCLUDED_DIRS.intersection(rel_dirs):
                files.append(p)
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def default_code_files() -> list[Path]:
    """The code part's files, sorted by path relative to the stdlib directory."""
    return list(_code_files())


def default_corpus_paths() -> list[str]:
    """Files of the embedded default corpus (the code part; the prose part lives in a module)."""
    return [str(p) for p in _code_files()]


def default_prose_topics() -> list[tuple[str, str]]:
    """(topic name, English text) pairs from `pydoc_data.topics`, sorted by name."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions split pydoc_data into a separate package
        raise UserError(
            "the default corpus needs the pydoc_data module, which this Python lacks "
            f"({exc}); install the full standard library or pass a corpus path"
        ) from exc
    return sorted(topics.items())


def fingerprint_items(items: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over length-framed (name, content) pairs, in the order given."""
    h = hashlib.sha256()
    for name, content in items:
        h.update(name.encode("utf-8"))
        h.update(b"\0")
        h.update(len(content).to_bytes(8, "big"))
        h.update(content)
    return h.hexdigest()


def _code_items() -> list[tuple[str, bytes]]:
    root = stdlib_dir()
    return [(p.relative_to(root).as_posix(), p.read_bytes()) for p in _code_files()]


def _prose_items() -> list[tuple[str, bytes]]:
    return [(name, text.encode("utf-8")) for name, text in default_prose_topics()]


def part_fingerprints(parts: Iterable[str] = PARTS) -> dict[str, str]:
    """`{"default:prose": sha256, "default:code": sha256}` for the parts asked for."""
    items = {CODE: _code_items, PROSE: _prose_items}
    return {f"{DEFAULT_CORPUS}:{part}": fingerprint_items(items[part]()) for part in parts}


def default_corpus_info(spec: str = DEFAULT_CORPUS) -> dict:
    """What the default corpus (or one part of it) is: a JSON-ready description with fingerprints.

    The top-level fingerprint covers the parts asked for: sha256 over the prose items
    (`prose/NAME`) then the code items (`code/RELATIVE_PATH`), see `fingerprint_items`.
    """
    parts = parse_default_spec(spec)
    info: dict = {
        "spec": spec,
        "description": (
            "the running Python's standard library: its .py source as code documents and the "
            "pydoc_data help topics as English prose documents"
        ),
        "python_version": sys.version.split()[0],
        "python_implementation": sys.implementation.name,
        "stdlib_dir": str(stdlib_dir()),
        "selection_rule": SELECTION_RULE,
        "parts": {},
    }
    all_items: list[tuple[str, bytes]] = []
    for part in parts:
        items = _prose_items() if part == PROSE else _code_items()
        info["parts"][part] = {
            ("topics" if part == PROSE else "files"): len(items),
            "bytes": sum(len(c) for _, c in items),
            "fingerprint": fingerprint_items(items),
        }
        all_items.extend((f"{part}/{name}", content) for name, content in items)
    info["files"] = info["parts"].get(CODE, {}).get("files", 0)
    info["topics"] = info["parts"].get(PROSE, {}).get("topics", 0)
    info["bytes"] = sum(len(c) for _, c in all_items)
    info["fingerprint"] = fingerprint_items(all_items)
    return info
