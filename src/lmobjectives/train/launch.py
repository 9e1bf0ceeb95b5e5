"""``lmobj train --nproc N``: start torchrun's launcher for one machine, in this process.

Each of the ``N`` workers runs the same command line (torchrun sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``, which ``--nproc`` then leaves alone), so the shortcut trains exactly what
``torchrun --standalone --nproc-per-node N $(which lmobj) train ...`` trains. The workers print
their own messages (a failing rank's, and each other rank's note that it stopped because of
it); the launcher adds a line only for a worker that died without one, such as a kill signal,
and exits with the failing worker's code.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from lmobjectives.errors import UserError


def should_launch(nproc: int | None) -> bool:
    """Whether ``--nproc`` asks this process to start torchrun (not when it is one of its workers)."""
    if nproc is None:
        return False
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if "LOCAL_RANK" in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))
        if local != nproc:
            raise UserError(f"--nproc {nproc} given inside a torchrun job of {local} processes per "
                            "machine; leave --nproc out when you start torchrun yourself")
        return False
    return nproc > 1


def _entry_point() -> list[str]:
    """How this command was started, for torchrun to start it again in each worker."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # python -m lmobjectives.cli
        return ["-m", spec.name.removesuffix(".__main__")]
    if sys.argv and sys.argv[0] and Path(sys.argv[0]).is_file():  # the lmobj script, or a file
        return [sys.argv[0]]
    return ["-m", "lmobjectives.cli"]


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run this command as ``nproc`` processes on this machine (``torchrun --standalone``);
    returns the exit code. The workers print their own messages; a worker that died without
    one (a signal) is named here."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent's own log lines repeat what the workers say (and warn about OMP threads).
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name == "torch.distributed.run":
            logging.getLogger(name).setLevel(logging.CRITICAL)

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", *_entry_point()])
    # Set apart from parsing: torchrun's parser would take our options for its own.
    args.training_script_args = list(argv)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.error_file_data.get("message") in (None, "<NONE>"):  # torchrun's "no file"
            print(f"error: rank {rank} ended: {failure.message}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
