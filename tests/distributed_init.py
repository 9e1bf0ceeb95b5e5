"""Worker for ``test_distributed.py``, started by torchrun with 2 processes: opens each run of
a JSON spec under FSDP (model built on the meta device, materialised and sharded block by
block), gathers its initial weights and writes them, with its buffers, to a safetensors file
(rank 0), without training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmobjectives.config import build_config
from lmobjectives.train.distributed import init_world, open_in_turn, parallelize
from lmobjectives.train.setup import open_run


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    world = init_world()
    for job in spec["jobs"]:
        cfg = build_config(job["config"])
        run = open_in_turn(lambda: open_run(cfg, Path(job["run_dir"]), progress=False, rank=world.rank,
                                            world_size=world.world_size), world)
        built_on_meta = any(p.is_meta for p in run.model.parameters())
        parallelize(run, world)
        full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.rank == 0:
            tensors = {k: v.contiguous() for k, v in full.items()}
            tensors.update({f"buffer:{k}": b.detach().cpu().contiguous() for k, b in run.model.named_buffers()})
            lm = getattr(run.model, "lm", run.model)
            tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
            save_file(tensors, job["weights"], metadata={"built_on_meta": str(built_on_meta), "tied": str(tied)})
    world.close()


if __name__ == "__main__":
    main(sys.argv[1])
