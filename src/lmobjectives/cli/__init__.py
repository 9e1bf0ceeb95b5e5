"""The ``lmobj`` command line: a thin layer over the library. Every command is one call a user
could make from Python; every user error ends with one message and exit code 2.

One module per command group (``train``, ``data``, ``use``, ``runs``); importing them
registers their commands on ``app``, in the order ``lmobj --help`` lists them.
"""

from __future__ import annotations

import errno
import sys

# Importing a command module registers its commands; this order is the order of `lmobj --help`.
from lmobjectives.cli import train  # noqa: F401,I001
from lmobjectives.cli import data  # noqa: F401
from lmobjectives.cli import use  # noqa: F401
from lmobjectives.cli import runs  # noqa: F401
from lmobjectives.cli.common import app
from lmobjectives.errors import UserError

__all__ = ["app", "main"]

_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

def main() -> None:
    try:
        code = app(standalone_mode=False)  # a typer.Exit comes back as its code
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        # A full disk, a quota, a read-only or forbidden path: the user's to fix, so one line
        # naming the path (checkpoints are written atomically: the previous ones are intact).
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
