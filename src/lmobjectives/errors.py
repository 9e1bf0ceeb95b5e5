"""The one exception type for errors a user can cause; the CLI prints its message and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a user: a path, a config key, a corpus, a checkpoint. Message says how to fix it."""

    exit_code = 2
