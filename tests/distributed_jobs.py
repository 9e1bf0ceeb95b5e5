"""Worker for ``test_distributed.py``, started by torchrun with 2 processes: trains the runs
listed in a JSON spec one after another in one process group, through the library (one
start-up pays for all of them). A job with ``resume_from`` first copies that run without its
last checkpoint and its outputs, then resumes the copy."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from lmobjectives.config import build_config
from lmobjectives.train.job import train
from lmobjectives.train.distributed import barrier, init_world


def copy_without_last_checkpoint(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    shutil.rmtree(sorted((dst / "checkpoints").glob("step-*"))[-1])
    shutil.rmtree(dst / "final")
    (dst / "eval.json").unlink()


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    world = init_world()  # made here, so every job below reuses it
    for job in spec["jobs"]:
        if "resume_from" in job:
            if world.rank == 0:
                copy_without_last_checkpoint(Path(job["resume_from"]), Path(job["out"]))
            barrier()
            train(build_config(job["config"]), resume=job["out"], progress=False)
        else:
            train(build_config({**job["config"], "out": job["out"]}), overwrite=True, progress=False)
    world.close()


if __name__ == "__main__":
    main(sys.argv[1])
