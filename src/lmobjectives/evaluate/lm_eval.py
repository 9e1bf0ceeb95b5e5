"""``lmobj eval RUN --lm-eval TASKS``: lm-eval-harness on a run's exported model.

The exported ``RUN/final`` is a plain HF directory, so lm-eval's own ``hf`` backend loads it
(``AutoModelForCausalLM`` + ``AutoTokenizer``) exactly as ``lm_eval --model hf --model_args
pretrained=RUN/final`` would; nothing here re-implements a metric. Decoders only: the ``hf``
backend scores continuations left to right, which an encoder (MLM) or an encoder-decoder
does not do, so those get a "not a causal LM" error before anything loads.

Tasks are lm-eval's own names (``hellaswag,arc_easy,piqa``: their data is downloaded where
there is a network) or paths to task YAML files (their folder joins lm-eval's task search
path; the task name is the file's ``task:``). With only YAML paths lm-eval's built-in
catalogue is not even scanned, which keeps an offline check fast. The results go to
``RUN/lm_eval.json`` (``DIR/lm_eval.json`` for a bare HF directory; lm-eval's own results
object) and lm-eval's table is printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from lmobjectives.errors import UserError
from lmobjectives.rundir import model_dir
from lmobjectives.util import atomic_write_bytes

INSTALL_HINT = "pip install 'lmobjectives[lm-eval]'"
RESULTS_FILE = "lm_eval.json"


def check_causal_lm(mdir: Path) -> None:
    """Refuse what the ``hf`` backend cannot score: anything but a ``*ForCausalLM``."""
    try:
        arch = json.loads((mdir / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise UserError(f"{mdir}/config.json is not readable ({exc})") from None
    if not any(str(a).endswith("ForCausalLM") for a in arch):
        raise UserError(f"{mdir} holds a {', '.join(map(str, arch)) or 'model of unknown class'}, not a "
                        "causal LM: lm-eval's hf backend scores decoders only (train a decoder, e.g. "
                        "--architecture decoder)")


def _task_yaml_name(path: Path) -> str:
    # lm-eval's YAML uses tags such as !function; only the ``task`` key is wanted here.
    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        tree = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not a readable task YAML ({exc})") from None
    name = tree.get("task") if isinstance(tree, dict) else None
    if not isinstance(name, str):
        raise UserError(f"{path}: a task YAML needs a 'task: NAME' key")
    return name


def resolve_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names, folders to add to lm-eval's search path) for names and YAML paths."""
    names, include = [], []
    for task in tasks:
        path = Path(task)
        if task.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise UserError(f"task file {task} does not exist")
            names.append(_task_yaml_name(path))
            include.append(str(path.resolve().parent))
        else:
            names.append(task)
    if not names:
        raise UserError("--lm-eval needs at least one task (e.g. hellaswag,arc_easy,piqa or a task YAML)")
    return names, list(dict.fromkeys(include))


def _task_manager(names: list[str], include: list[str], builtin: bool) -> Any:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include or None, include_defaults=builtin)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval knows no task {', '.join(map(repr, unknown))}; give lm-eval task "
                        "names (lm_eval ls tasks) or paths to task YAML files")
    return manager


def run_lm_eval(path: str | Path, tasks: list[str], *, limit: int | None = None,
                batch_size: int = 8, device: str | None = None) -> dict[str, Any]:
    """Run lm-eval's ``hf`` backend on a run's ``final/`` (or an HF directory); write and
    return lm-eval's results object (``results``, ``groups``, ``versions``, ``n-shot``, ...)."""
    mdir, run_dir = model_dir(path)
    check_causal_lm(mdir)
    try:
        import lm_eval
        from lm_eval.utils import handle_non_serializable
    except ImportError:
        raise UserError(f"--lm-eval needs the lm-eval package: {INSTALL_HINT}") from None
    names, include = resolve_tasks(tasks)
    builtin = len(include) < len(tasks)  # some task is one of lm-eval's own names
    manager = _task_manager(names, include, builtin)
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(mdir), "dtype": "float32"}, tasks=names,
            limit=limit, batch_size=batch_size, device=device, task_manager=manager, log_samples=False)
    except (ConnectionError, TimeoutError) as exc:
        raise UserError(f"lm-eval could not fetch a task's data ({exc}); without a network use "
                        "tasks whose data is local (a task YAML)") from None
    if results is None:  # lm-eval returns None on non-zero ranks
        return {}
    out = (run_dir or mdir) / RESULTS_FILE
    atomic_write_bytes(out, json.dumps(results, indent=2, default=handle_non_serializable).encode())
    results["path"] = str(out)
    return results


def format_results(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table(s), as ``lm_eval`` prints them."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text
