"""What a resume must refuse before it restores anything: a changed config or data (unless
forced), a checkpoint written by another number of processes (unless resharding is allowed,
then the loader continues at the same global position), or by another strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmobjectives.checkpoint import is_sharded_checkpoint
from lmobjectives.errors import UserError
from lmobjectives.rundir import config_hash
from lmobjectives.train.distributed import reshard_loader_state
from lmobjectives.train.setup import Run


def check_progress(state: dict[str, Any], loader_state: dict[str, Any]) -> None:
    """A ``ValueError`` when the step, token, loader or guard fields are not counts."""
    guard, by_source = state["guard"], state["tokens_by_source"]
    count = lambda v: type(v) is int and v >= 0  # noqa: E731 - bool is not a count
    if not (all(count(v) for v in (state["step"], state["tokens"], loader_state["counter"],
                                   guard["bad_in_row"]))
            and isinstance(by_source, dict) and all(count(v) for v in by_source.values())
            and isinstance(guard["recent"], list)
            and all(type(x) in (int, float) for x in guard["recent"])):
        raise ValueError("step, tokens, loader or guard fields of the wrong type")


def check_resumable(run: Run, state: dict[str, Any], path: Path, force: bool,
                    allow_reshard: bool) -> tuple[dict[str, Any], str | None]:
    """(loader state to restore, a note on resharding or None); a ``UserError`` when refused."""
    cfg = run.cfg
    if not force:
        if state["config_hash"] != config_hash(cfg):
            raise UserError(f"the config of {run.dir} changed since {path.name} was written; "
                            "resume with the same config, or pass --force")
        if state["store_fingerprints"] != {s.name: s.store.fingerprint for s in run.sources}:
            raise UserError(f"the data of {run.dir} changed since {path.name} was written "
                            "(store fingerprint differs); pass --force to continue anyway")
    loader_state, note = state["loader"], None
    saved_world = state.get("world_size", 1)
    if saved_world != run.world_size:
        if not allow_reshard:
            raise UserError(
                f"{path.name} was written by {saved_world} process(es), this run has "
                f"{run.world_size}; resume with {saved_world}, or pass --allow-reshard to "
                f"continue on {run.world_size} (the global batch becomes "
                f"{cfg.train.batch_size * cfg.train.grad_accum * run.world_size} rows)")
        loader_state, note = reshard_loader_state(loader_state, saved_world, run.world_size)
    if is_sharded_checkpoint(path) != run.sharded:
        kinds = ("full (ddp or one process)", "sharded (fsdp)")
        raise UserError(f"{path.name} is a {kinds[is_sharded_checkpoint(path)]} checkpoint but this "
                        f"run's strategy is {cfg.distributed.strategy}; resume with the "
                        "strategy that wrote it")
    return loader_state, note
