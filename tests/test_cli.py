"""The command line: help, JSON output, one clear message per user error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmobjectives.config import build_config, load_config_file

LMOBJ = [sys.executable, "-m", "lmobjectives.cli"]
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LMOBJ, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_user_error(p: subprocess.CompletedProcess, *words: str) -> None:
    assert_one_error_line(p.returncode, p.stderr, *words)


def assert_one_error_line(code: int, stderr: str, *words: str) -> None:
    """The contract: exit code 2 (not any non-zero), no traceback, exactly one ``error:`` line
    holding ``words``."""
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr
    err = [l for l in stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1, stderr
    for w in words:
        assert w in err[0], err[0]


def test_help_lists_commands():
    p = run("--help")
    assert p.returncode == 0
    for cmd in ("train", "prepare", "tokenizer", "corpus", "eval", "generate", "export", "show",
                "fill-mask", "infill"):
        assert cmd in p.stdout
    p = run("train", "--help")
    assert p.returncode == 0 and "--objective" in p.stdout and "--resume" in p.stdout


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
    cfg = build_config(load_config_file(recipe))
    assert cfg.resolved_architecture


def test_show_json_has_batch_keys_and_specials():
    p = run("show", "clm", "--text", "def add(a, b):\n    return a + b\n", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert {"input_ids", "labels", "position_ids", "special_tokens"} <= set(out)
    assert out["special_tokens"]["eos"] == 0 and out["special_tokens"]["extra_id_99"] > 0
    assert out["input_ids"][: 3] != [out["special_tokens"]["pad"]] * 3
    p = run("show", "clm", "--text", "hello world")
    assert p.returncode == 0 and "hello world" in p.stdout


def test_corpus_default_shows_fingerprint():
    p = run("corpus", "default", "--json")
    assert p.returncode == 0
    assert "fingerprint" in json.loads(p.stdout)


@pytest.mark.parametrize("args,words", [
    (("train", "--objective", "clmm"), ("unknown objective", "clm")),
    (("train", "--set", "train.stpes=3"), ("train.steps",)),
    (("train", "--set", "train.lr=abc"), ("train.lr",)),
    (("train", "--corpus", "/nonexistent/path"), ("/nonexistent/path",)),
    (("train", "--resume", "/tmp"), ("not a run directory",)),
    (("train", "--preset", "huge"), ("huge",)),
    (("show", "nope", "--text", "x"), ("unknown objective",)),
    (("prepare", "--corpus", "/nonexistent", "--out", "/tmp/x-store"), ("/nonexistent",)),
    (("generate", "/nonexistent-run"), ("/nonexistent-run",)),
    (("fill-mask", "/nonexistent-run", "--text", "a <|mask|>"), ("/nonexistent-run",)),
    (("eval", "/tmp"), ("/tmp",)),
])
def test_user_errors_are_one_line(args, words, tmp_path):
    assert_user_error(run(*args, cwd=tmp_path), *words)


# Usage errors found by the parser itself, before any command runs: unknown options and
# commands, values of the wrong type, missing arguments.
USAGE_ERRORS = [
    (("train", "--stesp", "3"), ("--stesp", "Did you mean --steps?")),
    (("train", "--steps", "abc"), ("--steps",)),
    (("nosuchcmd",), ("nosuchcmd",)),
    (("tokenzier",), ("tokenzier", "Did you mean 'tokenizer'?")),
    (("train", "--steps"), ("--steps", "requires an argument")),
    (("eval",), ("run_dir",)),
    (("export",), ("checkpoint",)),
    (("tokenizer", "nosuch"), ("nosuch",)),
    (("generate", "/x", "--max-new-tokens", "many"), ("--max-new-tokens",)),
]


def installed_lmobj() -> str:
    """The ``lmobj`` console script installed next to this interpreter (what users run)."""
    script = Path(sys.executable).with_name("lmobj")
    if not script.is_file():
        pytest.skip(f"no installed lmobj script next to {sys.executable} (package not installed)")
    return str(script)


@pytest.mark.parametrize("args,words", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_through_main_are_one_line(args, words):
    import runs_util as ru

    code, _, err = ru.run_cli(list(args))
    assert_one_error_line(code, err, *words)


def test_usage_errors_of_the_installed_script_are_one_line(tmp_path):
    script = installed_lmobj()
    for args, words in USAGE_ERRORS[:4]:
        p = subprocess.run([script, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert_user_error(p, *words)


def test_bare_command_prints_help_and_succeeds():
    import runs_util as ru

    code, out, err = ru.run_cli([])
    assert code == 0 and "train" in out and "Traceback" not in err


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    """SIGINT (what Ctrl-C sends) in the middle of a run: ``interrupted``, exit 130, no
    traceback."""
    import signal
    import time

    import runs_util as ru

    store = ru.make_store(tmp_path, n_docs=12, words=40)
    args = ru.tiny_args(store, tmp_path / "run", 100000, every=0)
    p = subprocess.Popen([sys.executable, "-m", "lmobjectives.cli", *args], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
                              "PYTHONFAULTHANDLER": "1"},
                         # A shell's background job ignores SIGINT, and a child inherits that:
                         # give the run the disposition an interactive command has.
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        end = time.monotonic() + 240
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < end and p.poll() is None:
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # say where it hangs: faulthandler dumps every thread
            p.send_signal(signal.SIGABRT)
            _, err = p.communicate(timeout=60)
            pytest.fail("still running 120 s after SIGINT; its threads at SIGABRT:\n" + err[-8000:])
    finally:
        p.kill()  # a failed or interrupted test leaves no 100,000-step run behind
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 130 and lines[-1] == "interrupted" and "Traceback" not in err, err[-3000:]
