"""Initial weights that do not depend on how the model is laid out in memory.

A model is built on the ``meta`` device (shapes only) and then *materialised unit by unit*:
a unit is one transformer block (the members of a ``ModuleList`` whose class the model names
in ``_no_split_modules``), and last the root with whatever the blocks leave (embeddings,
final norm, output head, rotary tables). For each unit the meta tensors are replaced by
empty ones on the target device and every module of the unit is initialised by the model's
own ``_init_weights`` (the family's scheme: normal(0, initializer_range) for Llama, T5's and
ModernBERT's own rules, rotary ``inv_freq`` recomputed) under a seed of its own::

    seed of module "model.layers.3.mlp.up_proj" = sha256("<seed>:model.layers.3.mlp.up_proj")[:8]

so a module's initial values depend on the run's seed and its name only, never on which
modules were initialised before it nor on how many processes share the model. One process
materialises every unit in turn and keeps them; FSDP (``train/distributed.py: shard_model``)
shards each unit right after it is materialised, so a rank holds at most one unit in full
plus its shards of the units before (peak ≈ largest unit + 1/W of the model, instead of the
whole model), and gathering the shards gives exactly the one-process weights.

Tied weights (the output head that *is* the embedding) are one tensor with several owners:
it is materialised once and set on every owner; its first owner (the input embedding)
decides its values, as when transformers initialises a model and then ties it.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Iterator

import torch
from torch import nn

InitFn = Callable[[nn.Module], None]


def module_seed(seed: int, name: str) -> int:
    """The seed of one module: a hash of the run's seed and the module's name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def block_class_names(model: nn.Module) -> set[str]:
    """Classes that the model (or a model inside it) names as unsplittable blocks."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class the model names as unsplittable, members of
    a ``ModuleList`` or the direct children of one (a DeepSeek-style MTP depth wraps one block
    in projections that are called on their own, so they stay with the root). Embeddings stay
    with the root too, where the output head tied to them lives."""
    names = block_class_names(model)
    found = []
    for lst in model.modules():
        if not isinstance(lst, nn.ModuleList):
            continue
        for m in lst:
            found += [m] if type(m).__name__ in names else \
                [c for c in m.children() if type(c).__name__ in names]
    return found


def init_streams(model: nn.Module) -> list[tuple[str, nn.Module, int, InitFn]]:
    """(prefix, sub-model, seed offset, init function) of each part that is initialised under
    its own names. A model may declare them (``MTPModel``: the backbone, then its heads);
    otherwise the model is one stream initialised by its ``_init_weights``."""
    declared = getattr(model, "init_streams", None)
    if callable(declared):
        return declared()
    return [("", model, 0, model._init_weights)]


def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """id(tensor) -> every (module, attribute, is_parameter) that holds it (tied tensors have
    several)."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((m, name, True))
        for name, b in m._buffers.items():
            if b is not None:
                owners.setdefault(id(b), []).append((m, name, False))
    return owners


def _materialise(module: nn.Module, device: torch.device,
                 owners: dict[int, list[tuple[nn.Module, str, bool]]]) -> bool:
    """Replace ``module``'s own meta tensors by empty ones on ``device`` (on every owner of a
    tied tensor); True when it had any."""
    found = False
    for store in (module._parameters, module._buffers):
        for name, t in list(store.items()):
            if t is None or not t.is_meta:
                continue
            found = True
            empty = torch.empty_like(t, device=device)
            new = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
            holders = owners.pop(id(t), [(module, name, isinstance(t, nn.Parameter))])
            for owner, attr, is_param in holders:
                (owner._parameters if is_param else owner._buffers)[attr] = new
            owners[id(new)] = holders
    return found


def _unit_modules(unit: nn.Module, blocks: set[int]) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of ``unit``'s own modules, children before parents as transformers
    initialises them, skipping other blocks inside it."""
    def walk(prefix: str, m: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in m.named_children():
            if id(child) not in blocks:
                yield from walk(f"{prefix}{child_name}.", child)
        yield prefix.rstrip("."), m
    yield from walk("", unit)


def materialise(model: nn.Module, seed: int, device: torch.device,
                after_unit: Callable[[nn.Module], None] | None = None) -> None:
    """Give every meta tensor of ``model`` its initial value on ``device``, one unit (block,
    then the root) at a time, calling ``after_unit(unit)`` after each (FSDP shards it there).
    Units that already hold real tensors (weights loaded from disk) keep them."""
    owners = _owners(model)
    blocks = repeated_blocks(model)
    block_ids = {id(b) for b in blocks}
    names = {id(m): n for n, m in model.named_modules()}
    streams = [(prefix, {id(m) for m in sub.modules()}, offset, fn)
               for prefix, sub, offset, fn in init_streams(model)]
    with torch.no_grad():
        for unit in [*blocks, model]:
            modules = [m for _, m in _unit_modules(unit, block_ids - {id(unit)})]
            # Every module of a unit that had meta tensors is initialised, not only those that
            # held them: some families initialise a child's weights from its parent module.
            if [m for m in modules if _materialise(m, device, owners)]:
                with _untied(modules, owners):
                    for m in modules:
                        _init_module(m, names[id(m)], seed, streams)
            if after_unit is not None:
                after_unit(unit)


def _init_module(m: nn.Module, name: str, seed: int,
                 streams: list[tuple[str, set[int], int, InitFn]]) -> None:
    """``m``'s init function under its own seed; its name is taken within its stream, so a
    backbone inside a wrapper gets the values it gets alone."""
    for prefix, members, offset, fn in streams:
        if id(m) in members:
            local = name[len(prefix):].lstrip(".") if prefix and name.startswith(prefix) else name
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(module_seed(seed + offset, local))
                fn(m)
            return
    if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None:
        raise ValueError(f"module {name!r} holds tensors but belongs to no init stream")
    # A wrapper that holds nothing of its own (MTPModel around its backbone) has nothing to set.


@contextlib.contextmanager
def _untied(modules: list[nn.Module], owners: dict[int, list[tuple[nn.Module, str, bool]]]) -> Iterator[None]:
    """Within: every owner of a tied tensor but the first holds a meta stand-in of its own.
    transformers initialises a model untied and ties it afterwards, so the first owner (the
    input embedding) decides the values, whatever its parents or the other owners write."""
    inside = {id(m) for m in modules}
    restore = []
    for m in modules:
        for store in (m._parameters, m._buffers):
            for name, t in list(store.items()):
                holders = owners.get(id(t), []) if t is not None else []
                if len(holders) > 1 and holders[0][0] is not m and id(holders[0][0]) in inside:
                    scratch = torch.empty_like(t, device="meta")  # writes to it cost nothing
                    store[name] = nn.Parameter(scratch, t.requires_grad) if isinstance(t, nn.Parameter) else scratch
                    restore.append((store, name, t))
    try:
        yield
    finally:
        for store, name, t in restore:
            store[name] = t


def reinitialise(root: nn.Module, seed: int, init_fn: InitFn) -> None:
    """Initialise every module of ``root`` (real tensors, in place) as ``materialise`` would:
    each under the seed of its name within ``root``."""
    blocks = {id(b) for b in repeated_blocks(root)}
    order = [*[b for b in root.modules() if id(b) in blocks], root]
    names = {id(m): n for n, m in root.named_modules()}
    with torch.no_grad():
        for unit in order:
            for _, m in _unit_modules(unit, blocks - {id(unit)}):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(module_seed(seed, names[id(m)]))
                    init_fn(m)
