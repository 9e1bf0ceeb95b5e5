"""``lmobj compare``: one model per objective under an equal budget, then one report.

What is held equal: the model size (one preset name for all three families — decoder,
encoder, encoder-decoder), the data (one token store, prepared once under ``DIR/store``
unless ``--data`` names one), ``seq_len``, batch size, learning-rate schedule, seed, and the
number of corpus tokens each run reads.

Counting tokens. A run's ``tokens`` (``metrics.jsonl``) counts the packed rows the loader
serves, ``batch * grad_accum * row_length`` per step. Most objectives read rows of
``seq_len``; span corruption reads longer rows (``row_length(seq_len)``) because its inputs
shrink when each span collapses into one sentinel. So the budget is in corpus tokens read,
and each run's step count is ``round(budget / tokens per step)``::

    seq_len 64, batch 4, budget 25,600 tokens
    clm:  row 64 -> 256 tokens/step -> 100 steps
    span: row 70 -> 280 tokens/step ->  91 steps

``--steps N`` sets the budget to N steps of ``seq_len`` rows. Runs live in ``DIR/runs/KEY``
(KEY is the objective, or ``span@prefix_lm`` written ``span-prefix_lm`` for another
architecture). A finished run whose config matches is reused, one with checkpoints is
resumed, and a run with another config is an error unless ``overwrite``. Measurements are
cached the same way (``compare.measure``). The report (``lmobjectives.report.comparison``)
reads only the files this writes.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from lmobjectives.checkpoint import list_checkpoints
from lmobjectives.compare.measure import (METRICS, Bench, Subject, measure, measure_key,
                                          read_measure, write_measure)
from lmobjectives.compare.probe import build_probe_data
from lmobjectives.config import RunConfig, apply_set, build_config
from lmobjectives.errors import UserError
from lmobjectives.objectives import OBJECTIVES, build_objective, objective_class

# Every registered objective, in registry order: a newly added objective is compared too.
DEFAULT_OBJECTIVES = tuple(OBJECTIVES)
DEFAULT_OUT = "runs/compare"
# A store compare prepares itself holds out 10% of the documents (not the 1% of a training
# store) so the probe has a few dozen unseen documents per source.
COMPARE_VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Entry:
    key: str  # directory name under DIR/runs
    objective: str
    architecture: str | None  # None: the objective's default

    @property
    def label(self) -> str:
        return self.objective if self.architecture is None else f"{self.objective}@{self.architecture}"


@dataclass
class CompareResult:
    out: Path
    runs: dict[str, str] = field(default_factory=dict)  # label -> "trained" / "reused" / "resumed ..."
    skipped: dict[str, str] = field(default_factory=dict)  # label -> why
    report_md: Path | None = None
    report_html: Path | None = None


def parse_objectives(names: Sequence[str]) -> list[Entry]:
    """``["clm", "span@prefix_lm"]`` -> entries; a repeated name is an error."""
    entries: list[Entry] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        obj, _, arch = name.partition("@")
        entry = Entry(key=obj if not arch else f"{obj}-{arch}", objective=obj, architecture=arch or None)
        if any(e.key == entry.key for e in entries):
            raise UserError(f"objective '{name}' is listed twice in --objectives")
        entries.append(entry)
    if not entries:
        raise UserError("--objectives is empty; name at least one (e.g. clm,mlm,span)")
    return entries


# ---------------------------------------------------------------------------- config
def base_tree(*, preset: str, seq_len: int | None, batch_size: int | None, seed: int | None,
              lr: float | None, tokenizer: str | None, sets: Sequence[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {"model": {"preset": preset}, "data": {}, "train": {"eval_every": 0}}
    for key, value in (("seq_len", seq_len), ("tokenizer", tokenizer)):
        if value is not None:
            tree["data"][key] = value
    for key, value in (("batch_size", batch_size), ("seed", seed), ("lr", lr)):
        if value is not None:
            tree["train"][key] = value
    for assignment in sets:
        key = assignment.split("=", 1)[0].strip()
        if key.split(".")[0] in ("objective", "objective_params", "architecture", "out"):
            raise UserError(f"--set {key}: compare sets the objective, architecture and run "
                            "directory of each run itself; only shared keys can be set")
        apply_set(tree, assignment)
    return tree


def _differences(have: Any, want: Any, prefix: str = "") -> list[str]:
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(have) | set(want)):
            if prefix == "" and k == "out":
                continue
            out += _differences(have.get(k), want.get(k), f"{prefix}{k}.")
        return out
    return [] if have == want else [prefix.rstrip(".")]


def _shared_store(out: Path, tree: dict[str, Any], corpus: list[str] | None, store: str | None,
                  overwrite: bool, progress: bool, say: Callable[[str], None]) -> str:
    """The one store every run trains on: ``store`` as given, or ``corpus`` prepared once."""
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.store.store import TokenStore
    from lmobjectives.tokenizer import tokenizer_fingerprint
    from lmobjectives.spec import resolve_tokenizer

    if store is not None:
        TokenStore(store)  # a clear error now if it is not a store
        return store
    corpus = list(corpus or ["default"])
    tree["data"].setdefault("val_fraction", COMPARE_VAL_FRACTION)
    cfg = build_config({**copy.deepcopy(tree), "data": {**tree["data"], "corpus": corpus}})
    tok, _ = resolve_tokenizer(cfg, out)  # the shipped one, --tokenizer, or trained in DIR/tokenizer
    d, store_dir = cfg.data, out / "store"
    want = {"corpus": corpus, "val_fraction": d.val_fraction, "seed": cfg.train.seed,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok)}
    if (store_dir / "manifest.json").is_file():
        m = TokenStore(store_dir).manifest
        changed = [k for k, v in want.items() if m.get(k) != v]
        if not changed:
            return str(store_dir)
        if not overwrite:
            raise UserError(f"{store_dir} was prepared with another {', '.join(changed)}; pass "
                            "--overwrite to prepare it again (and retrain), or use another --out")
    say(f"preparing the shared store {store_dir} from {', '.join(corpus)}")
    prepare_store(corpus, tok, store_dir, val_fraction=d.val_fraction, seed=cfg.train.seed,
                  encoding=d.encoding, text_field=d.text_field, split=d.split, progress=progress)
    return str(store_dir)


def plan_runs(entries: list[Entry], tree: dict[str, Any], budget: int, tokenizer: Any,
              specials: Any, out: Path) -> list[tuple[Entry, RunConfig, int]]:
    """(entry, config, row_length) per run, with steps set for an equal token budget."""
    plans = []
    for e in entries:
        t = copy.deepcopy(tree)
        t.update({"objective": e.objective, "out": str(out / "runs" / e.key)})
        if e.architecture is not None:
            t["architecture"] = e.architecture
        cfg = build_config(t)
        objective = build_objective(e.objective, {}, specials, tokenizer=tokenizer)
        row = objective.row_length(cfg.data.seq_len)
        per_step = cfg.train.batch_size * cfg.train.grad_accum * row
        steps = max(1, round(budget / per_step))
        plans.append((e, cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})}), row))
    return plans


def _store_summary(store_path: str) -> dict[str, Any]:
    from lmobjectives.store.store import TokenStore

    m = TokenStore(store_path).manifest
    return {"corpus": m.get("corpus", []), "documents": m["documents"], "tokens": m["tokens"],
            "val_documents": m["splits"]["val"]["documents"], "fingerprint": m["fingerprint"]}


# ---------------------------------------------------------------------------- training
def train_or_reuse(cfg: RunConfig, *, overwrite: bool, progress: bool,
                   say: Callable[[str], None]) -> str:
    """Train ``cfg`` into ``cfg.out``, reusing a finished matching run, resuming a started one."""
    from lmobjectives.train.job import train

    run_dir = Path(cfg.out)
    start_over = False
    if (run_dir / "config.yaml").is_file():
        have = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        diff = _differences(have, cfg.model_dump(mode="json"))
        if diff and not overwrite:
            raise UserError(f"{run_dir} holds a run with another config (differs in "
                            f"{', '.join(diff[:5])}); pass --overwrite to retrain it, or use another --out")
        if not diff and (run_dir / "final" / "config.json").is_file() and (run_dir / "eval.json").is_file():
            return "reused"
        if not diff and list_checkpoints(run_dir):
            res = train(cfg, resume=run_dir, progress=progress, say=say)
            if res.stopped:
                raise UserError(f"stopped during {run_dir}; run the same command again to resume")
            return res.started
        start_over = True
    res = train(cfg, overwrite=start_over or overwrite, progress=progress, say=say)
    if res.stopped:
        raise UserError(f"stopped during {run_dir}; run the same command again to resume")
    return "trained"


# ---------------------------------------------------------------------------- measuring
def make_bench(store_path: str, tokenizer: Any, specials: Any, cfg: RunConfig, device: Any) -> Bench:
    from lmobjectives.data.loader import PackedSource
    from lmobjectives.evaluate.metrics import token_byte_lengths, val_batches
    from lmobjectives.store.store import TokenStore

    store = TokenStore(store_path)
    table = store.split("val")
    if len(table.docs) == 0:
        raise UserError(f"store {store_path} holds no held-out documents; prepare it with "
                        "--val-fraction above 0 (compare needs held-out text)")
    src = PackedSource(table, cfg.data.seq_len, seed=0, pad=specials.pad, shuffle=False)
    rows = val_batches(src, cfg.train.batch_size, cfg.train.eval_batches)
    probe = build_probe_data(store, tokenizer, cfg.data.seq_len, specials.pad,
                             encoding=cfg.data.encoding, text_field=cfg.data.text_field)
    return Bench(rows=rows, byte_lengths=token_byte_lengths(tokenizer), probe=probe, device=device,
                 table=table, pad=specials.pad, batch_size=cfg.train.batch_size,
                 seq_len=cfg.data.seq_len)


def measure_run(entry: Entry, cfg: RunConfig, bench: Bench, say: Callable[[str], None]) -> None:
    from transformers.utils import logging as hf_logging

    from lmobjectives.infer.load import load_model

    hf_logging.disable_progress_bar()
    run_dir = Path(cfg.out)

    key = measure_key(run_dir / "final", bench, METRICS)
    done = read_measure(run_dir)
    if done is not None and done.get("key") == key:
        return
    loaded = load_model(run_dir)
    model = loaded.model.to(bench.device)
    ev = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    subject = Subject(key=entry.key, objective=entry.objective, architecture=loaded.architecture,
                      run_dir=run_dir, model=model, specials=loaded.specials,
                      tokenizer=loaded.tokenizer, eval=ev, seed=cfg.train.seed,
                      transform=build_objective(cfg.objective, dict(cfg.objective_params),
                                                loaded.specials, tokenizer=loaded.tokenizer))
    say(f"measuring {entry.label}")
    values = measure(subject, bench)
    write_measure(run_dir, key, sum(p.numel() for p in model.parameters()), values)


# ---------------------------------------------------------------------------- the command
def registered(entries: list[Entry], skipped: dict[str, str], say: Callable[[str], None]) -> list[Entry]:
    """The entries whose objective this build has; the others go to ``skipped`` with why."""
    keep = []
    for e in entries:
        if e.objective not in OBJECTIVES:
            skipped[e.label] = (f"objective '{e.objective}' is not registered in this build "
                                f"(registered: {', '.join(OBJECTIVES)})")
            say(f"skipping {e.label}: {skipped[e.label]}")
            continue
        known = objective_class(e.objective).architectures
        if e.architecture is not None and e.architecture not in known:
            raise UserError(f"objective '{e.objective}' trains {', '.join(known)}, not '{e.architecture}'")
        keep.append(e)
    if not keep:
        raise UserError("none of the objectives asked for is registered in this build")
    return keep


def write_plan(out: Path, shared: RunConfig, budget: int, plans: list[tuple[Entry, RunConfig, int]],
               result: CompareResult, bench: Bench, command: str | None) -> None:
    """``DIR/compare.json``: everything the report needs besides the run directories."""
    from lmobjectives.util import atomic_write_json

    t = shared.train
    atomic_write_json(out / "compare.json", {
        "command": command,
        "preset": shared.model.preset,
        "seq_len": shared.data.seq_len,
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "seed": t.seed,
        "lr": t.lr,
        "store": shared.data.store,
        "data": _store_summary(shared.data.store),
        "budget_tokens": budget,
        "runs": [{"label": e.label, "objective": e.objective, "run_dir": f"runs/{e.key}",
                  "steps": cfg.train.steps, "row_length": row, "status": result.runs[e.label]}
                 for e, cfg, row in plans],
        "skipped": result.skipped,
        "probe": bench.probe if isinstance(bench.probe, str) else bench.probe.describe(),
        "metrics": [m.describe() for m in METRICS.values()],
    })


def _check_sources_and_budget(corpus: Sequence[str] | None, store: str | None,
                              steps: int | None, tokens: int | None) -> None:
    if corpus and store:
        raise UserError("pass --corpus or --data, not both")
    if steps is not None and tokens is not None:
        raise UserError("pass --steps or --tokens, not both")
    if (steps is not None and steps < 1) or (tokens is not None and tokens < 1):
        raise UserError("--steps and --tokens must be at least 1")


def _shared_tokenizer(shared: Any) -> tuple[Any, Any]:
    """The tokenizer every run shares (the config's, else the store's) and its special ids."""
    from lmobjectives.tokenizer import load_tokenizer
    from lmobjectives.tokenizer.special import SpecialIds

    tok = load_tokenizer(shared.data.tokenizer or str(Path(shared.data.store) / "tokenizer"))
    return tok, SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size())


def compare(
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    *,
    corpus: Sequence[str] | None = None,
    store: str | None = None,
    tokenizer: str | None = None,
    preset: str = "small",
    steps: int | None = None,
    tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    lr: float | None = None,
    sets: Sequence[str] = (),
    out: str | Path = DEFAULT_OUT,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> CompareResult:
    """Train (or reuse) one run per objective under an equal token budget; write the report."""
    from lmobjectives.report.comparison import write_report
    from lmobjectives.runtime import select_device

    _check_sources_and_budget(corpus, store, steps, tokens)
    out = Path(out)
    result = CompareResult(out=out)
    entries = registered(parse_objectives(objectives), result.skipped, say)
    tree = base_tree(preset=preset, seq_len=seq_len, batch_size=batch_size, seed=seed, lr=lr,
                     tokenizer=tokenizer, sets=sets)
    out.mkdir(parents=True, exist_ok=True)
    tree["data"]["store"] = _shared_store(out, tree, list(corpus) if corpus else None, store,
                                          overwrite, progress, say)
    shared = build_config({**tree, "objective": entries[0].objective})
    tok, specials = _shared_tokenizer(shared)
    t = shared.train
    budget = tokens if tokens is not None else \
        (steps or t.steps) * t.batch_size * t.grad_accum * shared.data.seq_len
    plans = plan_runs(entries, tree, budget, tok, specials, out)

    for e, cfg, row in plans:
        say(f"{e.label}: {cfg.train.steps} steps of {cfg.train.batch_size * cfg.train.grad_accum} "
            f"rows x {row} tokens")
        result.runs[e.label] = train_or_reuse(cfg, overwrite=overwrite, progress=progress, say=say)

    bench = make_bench(shared.data.store, tok, specials, shared, select_device())
    for e, cfg, _ in plans:
        measure_run(e, cfg, bench, say)

    write_plan(out, shared, budget, plans, result, bench, command)
    result.report_md, result.report_html = write_report(out)
    return result
