"""``lmobj`` with a failure injected on rank 1 at its second step, for
``test_distributed.py``: checks that every rank ends, each with rank 1's message. A full disk
stands in for any error one machine can meet alone."""

from __future__ import annotations

from lmobjectives.cli import main
from lmobjectives.errors import UserError
from lmobjectives.train import loop

_step = loop.Trainer.train_step


def _failing_step(self: loop.Trainer) -> dict:
    if self.run.rank == 1 and self.step == 1:
        raise UserError("no space left on device (injected on rank 1)")
    return _step(self)


loop.Trainer.train_step = _failing_step

if __name__ == "__main__":
    main()
