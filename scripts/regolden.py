"""Rewrite ``tests/assets/golden_clm_tiny.json`` from the current code: run only after a change
that is meant to move training numerics, and say why in the commit. The test never writes it.

    .venv/bin/python scripts/regolden.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from golden_run import GOLDEN, golden_run  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        record = golden_run(Path(tmp))
    old = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    moved = [k for k in record if old.get(k) != record[k]]
    print(f"wrote {GOLDEN}; changed: {', '.join(moved) or 'nothing'}")


if __name__ == "__main__":
    main()
