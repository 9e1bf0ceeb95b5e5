"""``lmobj`` whose rank 1 is killed (SIGKILL, as by the OOM killer or a lost machine) at the
start of its third step in the first attempt only, for ``test_distributed.py``: torchrun's
``--max-restarts`` starts both workers again and ``--resume-if-exists`` continues the run."""

from __future__ import annotations

import os
import signal

from lmobjectives.cli import main
from lmobjectives.train import loop

_step = loop.Trainer.train_step


def _dying_step(self: loop.Trainer) -> dict:
    if self.run.rank == 1 and self.step == 2 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(self)


loop.Trainer.train_step = _dying_step

if __name__ == "__main__":
    main()
