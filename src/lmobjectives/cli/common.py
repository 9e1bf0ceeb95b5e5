"""The ``lmobj`` application object, its command groups and the two ways a command speaks."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pre-train language models with every major objective, and measure them.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and extend tokenizers.")
corpus_app = typer.Typer(no_args_is_help=True, help="Corpora: the embedded default corpus.")
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(corpus_app, name="corpus")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr)
