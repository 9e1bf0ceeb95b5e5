"""Measurements of finished runs on one shared held-out bench, metric by metric.

``METRICS`` is the table of optional metrics, keyed by name. Each says which runs it applies
to (``applies`` returns None, or the reason it does not), and how to compute it (``compute``,
a call into the library). A metric that applies but has no ``compute`` yet is reported as
"n/a" with ``missing`` as the reason — that is where a new measurement plugs in::

    METRICS["infill_exact_match"] = dataclasses.replace(
        METRICS["infill_exact_match"], compute=lambda s, bench: {"value": ...})

Every run is measured on the same held-out text (``Bench``): bits-per-byte on the first
validation rows of ``seq_len`` tokens (whatever row length the objective trained on), the
probe on the same windows for every model, and training throughput timed on the first
validation rows of the objective's own row length, all runs back to back. Results go to
``RUN/measure.json`` with a key hashing the final weights, the bench and the metrics
computed, so a re-run measures only what changed (a plugged-in metric included).

Trade-off: timing throughput here, rather than reading it from each run's log, costs a few
steps per run but compares runs under the same machine load.

Worked example of an entry in ``measure.json``::

    {"bits_per_byte": {"value": 2.41}, "masked_token_accuracy":
     {"value": null, "reason": "only a masked-LM encoder predicts masked tokens in place"}}
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lmobjectives.evaluate.diffusion import FIXED_TIMES, elbo_bound, masked_accuracy_at
from lmobjectives.compare.probe_labels import LEFT, RIGHT, TASKS
from lmobjectives.compare.signal import DRAWS, signal_stats
from lmobjectives.compare.token_probe import TokenProbeData, score_tasks, token_states
from lmobjectives.evaluate.metrics import LEFT_TO_RIGHT, bits_per_byte
from lmobjectives.objectives import Capabilities, capabilities, objectives_where
from lmobjectives.objectives.base import Rows
from lmobjectives.util import atomic_write_json, sha256_file, stable_hash

MEASURE_VERSION = 6  # 5: measured with one thread (compare.harness); 6: MTP timed with its own step
# Balanced accuracy of a majority-class guess on a two-class task.
MAJORITY = 0.5
FAMILY_TASKS = {f: {t.name for t in TASKS if t.family == f} for f in (LEFT, RIGHT)}
THROUGHPUT_STEPS = 5
INFILL_SAMPLES = 20
SPECULATIVE_PROMPTS, SPECULATIVE_TOKENS = 4, 48


@dataclass
class Subject:
    """One finished run, loaded for measurement."""

    key: str
    objective: str
    architecture: str
    run_dir: Path
    model: torch.nn.Module
    specials: Any  # SpecialIds
    tokenizer: Any
    eval: dict[str, Any]  # the run's eval.json
    transform: Any = None  # the run's Objective instance (for timing a training step)
    seed: int = 0  # the run's seed (weights at initialisation)
    cache: dict[str, Any] = field(default_factory=dict)  # work shared by several metrics


@dataclass
class Bench:
    """Held-out data shared by every run."""

    rows: list[Rows]  # validation rows of seq_len tokens
    byte_lengths: np.ndarray  # (V,) UTF-8 bytes per token id
    probe: TokenProbeData | str  # the token probes' data, or why there are none
    device: torch.device
    table: Any = None  # the validation DocTable, for rows of another length
    pad: int = 1
    batch_size: int = 1
    seq_len: int = 1

    def rows_of(self, length: int) -> Rows:
        """One batch of validation rows of ``length`` tokens (the first, unshuffled)."""
        from lmobjectives.data.loader import PackedSource

        src = PackedSource(self.table, length, seed=0, pad=self.pad, shuffle=False)
        return src.rows(np.arange(self.batch_size) % src.rows_per_epoch)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.rows:
            h.update(np.ascontiguousarray(r.tokens).tobytes())
        h.update((self.probe if isinstance(self.probe, str) else self.probe.fingerprint()).encode())
        return h.hexdigest()


@dataclass(frozen=True)
class Metric:
    name: str
    label: str  # column header
    compares: str  # what the column compares, and across which rows
    higher_is_better: bool
    digits: int  # decimals shown
    applies: Callable[[Subject], str | None]
    compute: Callable[[Subject, Bench], dict[str, Any]] | None
    missing: str = ""  # reason shown while ``compute`` is None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "compares": self.compares,
                "higher_is_better": self.higher_is_better, "digits": self.digits}


# ----------------------------------------------------------------------- the metrics
def _left_to_right(s: Subject) -> str | None:
    if s.architecture in LEFT_TO_RIGHT or capabilities(s.objective).likelihood == "elbo":
        return None
    return "encoders and encoder-decoders cannot score text left to right"


def _bits_per_byte(s: Subject, bench: Bench) -> dict[str, Any]:
    if capabilities(s.objective).likelihood == "elbo":  # masked diffusion: an upper bound, "≤"
        out = elbo_bound(s.model, s.transform, s.architecture, bench.rows, bench.byte_lengths,
                         device=bench.device)
        return {"value": out["bits_per_byte_bound"], "bound": True,
                "se": out["bits_per_byte_bound_se"], "bytes": out["bytes"]}
    out = bits_per_byte(s.model, bench.rows, s.specials, bench.byte_lengths, bench.device)
    return {"value": out["bits_per_byte"], "bytes": out["bytes"]}


def _masked(s: Subject) -> str | None:
    if s.architecture == "encoder" or capabilities(s.objective).infill == "unmasking":
        return None
    return "only a masked-LM encoder predicts masked tokens in place"


def _masked_accuracy(s: Subject, bench: Bench) -> dict[str, Any]:
    if capabilities(s.objective).infill == "unmasking":  # at MLM's rate: 15 % of tokens masked
        t = FIXED_TIMES[0]
        return {"value": masked_accuracy_at(s.model, s.transform, s.architecture, bench.rows, t,
                                            device=bench.device), "t": t}
    # The run's own held-out evaluation: top-1 accuracy on the masked positions it scores.
    return {"value": s.eval.get("accuracy"), "targets": s.eval.get("targets")}


def _fills_fim(caps: Capabilities) -> bool:
    # A model that fills a missing middle from a FIM prompt (the single-line exact-match task
    # of evaluate/infill.py), or unmasks the line's masked tokens (masked diffusion: the same
    # lines, evaluate/diffusion.py); sentinel-span models fill spans instead, a different task.
    return caps.infill in ("fim_prompt", "unmasking")


def _infilling(s: Subject) -> str | None:
    caps = capabilities(s.objective)
    if _fills_fim(caps) or (caps.infill == "left_to_right" and s.architecture == "decoder"):
        return None
    return (f"neither a FIM model ({', '.join(objectives_where(_fills_fim))}) nor a plain "
            "decoder (the left-to-right baseline)")


def _infill_exact_match(s: Subject, bench: Bench) -> dict[str, Any]:
    from types import SimpleNamespace

    from lmobjectives.evaluate.infill import document_texts, infill_exact_match

    docs = document_texts(bench.table, s.tokenizer, s.specials.eos)
    loaded = SimpleNamespace(model=s.model, tokenizer=s.tokenizer, specials=s.specials,
                             architecture=s.architecture)
    if capabilities(s.objective).infill == "unmasking":  # the line's masked tokens, unmasked
        from lmobjectives.evaluate.diffusion import infill_exact_match as diffusion_exact_match

        out = diffusion_exact_match(loaded, docs, INFILL_SAMPLES, seed=0, context_tokens=bench.seq_len)
        return {"value": out["exact_match"], "samples": out["samples"], "hits": out["hits"],
                "prompt": "unmasking"}
    mode = "psm" if _fills_fim(capabilities(s.objective)) else "left_to_right"
    out = infill_exact_match(loaded, docs, INFILL_SAMPLES, seed=0, context_tokens=bench.seq_len,
                             mode=mode)
    return {"value": out["exact_match"], "samples": out["samples"], "hits": out["hits"],
            "prompt": mode}


def _speculative_speedup(s: Subject, bench: Bench) -> dict[str, Any]:
    """Wall-clock tokens/s of self-speculative over plain greedy decoding on held-out prompts
    (fixed length, no EOS stop, so both decode the same number of tokens); outputs checked equal."""
    import time

    from lmobjectives.infer.generate import generate
    from lmobjectives.infer.speculative import speculative_generate

    rows = bench.rows[0].tokens
    prompts = [[int(t) for t in rows[i, :16] if t != bench.pad] for i in range(min(SPECULATIVE_PROMPTS, len(rows)))]
    prompts = [p for p in prompts if p]
    plain = spec = 0.0
    same = True
    accepted: dict[str, list[float]] = {}
    per_forward = []
    for p in prompts:
        t = time.perf_counter()
        a = generate(s.model, p, max_new_tokens=SPECULATIVE_TOKENS)
        plain += time.perf_counter() - t
        t = time.perf_counter()
        b = speculative_generate(s.model, p, max_new_tokens=SPECULATIVE_TOKENS)
        spec += time.perf_counter() - t
        same &= a.tokens == b.tokens
        per_forward.append(b.extras.get("tokens_per_forward", 0.0))
        for head, rate in b.extras.get("acceptance", {}).items():
            accepted.setdefault(head, []).append(rate)
    return {"value": plain / spec if spec else None, "identical_output": same,
            "acceptance": {h: float(np.mean(v)) for h, v in accepted.items()},
            "tokens_per_forward": float(np.mean(per_forward)) if per_forward else None,
            "prompts": len(prompts), "tokens": SPECULATIVE_TOKENS}


def _drafts(caps: Capabilities) -> bool:
    return caps.drafts_tokens  # the model carries draft heads for self-speculative decoding


def _drafting(s: Subject) -> str | None:
    return None if _drafts(capabilities(s.objective)) else \
        f"no draft heads to speculate with (only {', '.join(objectives_where(_drafts))} trains them)"


def _always(s: Subject) -> str | None:
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _throughput(s: Subject, bench: Bench) -> dict[str, Any]:
    """Corpus tokens per second of one training step — objective transform, converter,
    forward, backward (no optimizer update, whose cost only follows the parameter count) —
    timed for every run back to back on the same machine, so the runs' own logs, written
    at different times under different machine load, are not what is compared. The step is
    the one training ran (``step.step_module``): an MTP model's step scores every head."""
    from lmobjectives.data.converters import convert_for_loss
    from lmobjectives.runtime import to_torch
    from lmobjectives.step import step_module

    rows = bench.rows_of(s.transform.row_length(bench.seq_len))
    module = step_module(s.model, s.transform, s.architecture, bf16=False)
    was_training = s.model.training
    s.model.train()
    times = []
    try:
        for i in range(THROUGHPUT_STEPS + 1):  # the first step warms caches and is dropped
            _sync(bench.device)
            start = time.perf_counter()
            # as training converts: with the index that spares sparse targets the full head
            batch = convert_for_loss(s.architecture, s.transform(rows, np.random.default_rng([0, i])),
                                     s.specials)
            n = module.counts(batch)
            module.forward_backward(to_torch(batch, bench.device), torch.as_tensor(n, dtype=torch.float32))
            _sync(bench.device)
            times.append(time.perf_counter() - start)
            s.model.zero_grad(set_to_none=True)
    finally:
        s.model.train(was_training)
    step = float(np.median(times[1:]))
    return {"value": rows.tokens.size / step, "seconds_per_step": step, "rows": int(rows.tokens.shape[0])}


def untrained_copy(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A freshly initialised model of the same class and config (the run's starting point
    when it trained from scratch with ``seed``)."""
    model = getattr(model, "lm", model)  # an MTP model: the probe reads its plain LM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(model)(model.config)
    return fresh.to(next(model.parameters()).device)


def _token_probes(s: Subject, bench: Bench) -> dict[str, Any]:
    """Both probe families, for the trained model and the same architecture untrained (its
    starting point): the difference is what pre-training added."""
    if "probes" not in s.cache:
        data = bench.probe
        assert isinstance(data, TokenProbeData)
        trained = score_tasks(token_states(s.model, s.architecture, data, bench.device), data)
        fresh = untrained_copy(s.model, s.seed)
        init = score_tasks(token_states(fresh, s.architecture, data, bench.device), data)
        s.cache["probes"] = (trained, init)
    return s.cache["probes"]


def _probe_family(family: str) -> Callable[[Subject, Bench], dict[str, Any]]:
    def compute(s: Subject, bench: Bench) -> dict[str, Any]:
        if isinstance(bench.probe, str):
            return {"value": None, "reason": bench.probe}
        trained, init = _token_probes(s, bench)
        tasks = {n: v for n, v in trained["tasks"].items() if n in FAMILY_TASKS[family]}
        return {"value": trained[family], "at_init": init[family], "baseline": MAJORITY,
                "tasks": tasks, "tasks_at_init": {n: init["tasks"][n] for n in tasks}}
    return compute


def _signal(s: Subject, bench: Bench) -> dict[str, Any]:
    rows = bench.rows_of(s.transform.row_length(bench.seq_len))
    return signal_stats(s.transform, rows, bench.pad, s.architecture)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("train_tokens_per_second", "train tokens/s",
           "every run: corpus tokens per second of a training step (objective transform, "
           f"forward, backward; median of {THROUGHPUT_STEPS}), timed back to back after training "
           "on the same machine with one thread; the three families' parameter counts differ", True, 0,
           _always, _throughput),
    Metric("bits_per_byte", "held-out bits/byte",
           "left-to-right models: nats per UTF-8 byte of the same held-out text, scored "
           "left to right (tokenizer-independent); masked diffusion models: their ELBO, an "
           "upper bound (≤) on the same quantity", False, 3, _left_to_right, _bits_per_byte),
    Metric("masked_token_accuracy", "masked-token acc.",
           "masked-LM encoders and masked diffusion models (15 % of tokens masked): top-1 "
           "accuracy on the masked positions of held-out rows",
           True, 3, _masked, _masked_accuracy),
    Metric("infill_exact_match", "infill exact match",
           "FIM decoders (FIM prompt) and plain decoders (the prefix alone, their baseline): "
           "share of held-out single lines reproduced exactly",
           True, 3, _infilling, _infill_exact_match),
    Metric("speculative_speedup", "speculative speedup",
           "models with draft heads only: decoding speed with self-speculation over plain "
           "greedy decoding, same outputs", True, 2, _drafting, _speculative_speedup),
    Metric("signal", "signal per token",
           "every run: scored target tokens / real corpus tokens, the run's objective applied "
           f"{DRAWS} times to the same held-out rows", True, 3, _always, _signal),
    Metric("probe_left", "left-context probes",
           "every model: balanced accuracy of linear probes on frozen per-token hidden states, "
           "tasks decided by the text before a token; held-out documents", True, 3, _always,
           _probe_family(LEFT)),
    Metric("probe_right", "right-context probes",
           "every model: balanced accuracy of linear probes on frozen per-token hidden states, "
           "tasks decided by the text after a token; held-out documents", True, 3, _always,
           _probe_family(RIGHT)),
)}


# ----------------------------------------------------------------------- measuring
def measure_key(final_dir: Path, bench: Bench, metrics: dict[str, Metric]) -> str:
    return stable_hash({"version": MEASURE_VERSION, "weights": sha256_file(final_dir / "model.safetensors"),
                        "bench": bench.fingerprint(),
                        "computed": sorted(n for n, m in metrics.items() if m.compute is not None)})


def measure(s: Subject, bench: Bench, metrics: dict[str, Metric] | None = None) -> dict[str, Any]:
    """Every metric for one run: {"value": x, ...} or {"value": None, "reason": why}."""
    metrics = METRICS if metrics is None else metrics
    out: dict[str, Any] = {}
    for name, m in metrics.items():
        reason = m.applies(s)
        if reason is not None:
            out[name] = {"value": None, "reason": reason}
        elif m.compute is None:
            out[name] = {"value": None, "reason": m.missing}
        else:
            out[name] = m.compute(s, bench)
    return out


def read_measure(run_dir: Path) -> dict[str, Any] | None:
    f = Path(run_dir) / "measure.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def write_measure(run_dir: Path, key: str, parameters: int, values: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / "measure.json",
                      {"key": key, "parameters": parameters, "metrics": values})
