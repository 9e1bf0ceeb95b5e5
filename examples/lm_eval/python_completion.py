"""Loads the rows of ``python_completion.jsonl`` (next to this file) for the lm-eval task in
``python_completion.yaml``: local data, so the task runs with no network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("python_completion.jsonl")


def load(**_metadata: Any):  # noqa: ANN201 - a datasets.DatasetDict
    """lm-eval calls this with the task's metadata; the data does not depend on it."""
    import datasets

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
