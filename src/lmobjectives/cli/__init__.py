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
    except Exception as exc:  # the command-line parser's own errors
        code = _parser_exit(exc)
        if code is None:
            raise
        sys.exit(code)


def _parser_exceptions(name: str) -> tuple[type, ...]:
    """Exception class ``name`` of the command-line parser: typer >= 0.26 carries its own copy
    of click (``typer._click``) and its own Exit/Abort, older ones use click's; any may raise."""
    import importlib

    found = []
    for module in ("typer", "typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _parser_exit(exc: BaseException) -> int | None:
    """The exit code for a parser exception, after printing it (a usage error: one ``error:``
    line, exit 2); None for any other exception."""
    if isinstance(exc, _parser_exceptions("Exit")):
        return exc.exit_code  # type: ignore[attr-defined]
    if isinstance(exc, _parser_exceptions("NoArgsIsHelpError")):  # bare `lmobj`: its help
        print(exc.ctx.get_help())  # type: ignore[attr-defined]
        return 0
    if isinstance(exc, _parser_exceptions("UsageError")):
        ctx = exc.ctx  # type: ignore[attr-defined]
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        print(f"error: {exc.format_message()}{hint}", file=sys.stderr)  # type: ignore[attr-defined]
        return UserError.exit_code
    if isinstance(exc, _parser_exceptions("ClickException")):
        print(f"error: {exc.format_message()}", file=sys.stderr)  # type: ignore[attr-defined]
        return UserError.exit_code
    if isinstance(exc, _parser_exceptions("Abort")):
        return 1
    return None


if __name__ == "__main__":
    main()
