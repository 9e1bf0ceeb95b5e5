"""Library entry points behind ``lmobj generate`` and ``lmobj infill`` (and later fill-mask)."""

from __future__ import annotations

from typing import Any

from lmobjectives.errors import UserError
from lmobjectives.infer.generate import generate
from lmobjectives.infer.load import Loaded, load_model
from lmobjectives.infer.prompts import free_text_suppressed, generation_result, prompt_ids
from lmobjectives.objectives import Capabilities, capabilities


def generate_text(path: str, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, speculative: bool = False,
                  diffusion_steps: int | None = None) -> dict[str, Any]:
    if not 0 < top_p <= 1:  # checked once here for plain and speculative decoding
        raise UserError("--top-p must be in (0, 1]")
    if by_diffusion(path, diffusion_steps):
        from lmobjectives.infer.diffusion import diffusion_generate

        return diffusion_generate(load_model(path), prompt, max_new_tokens=max_new_tokens,
                                  steps=diffusion_steps, temperature=temperature, seed=seed)
    loaded = load_model(path)
    if speculative:
        from lmobjectives.infer.speculative import speculative_text

        return speculative_text(loaded, prompt, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, seed=seed)
    if loaded.architecture not in ("decoder", "prefix_lm"):
        raise UserError(f"{path} is an {loaded.architecture} model; `generate` needs a decoder "
                        "(use fill-mask for encoders, infill for encoder-decoders)")
    ids = prompt_ids(loaded, prompt)
    g = generate(loaded.model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_p=top_p, seed=seed, stop_ids=(loaded.specials.eos,),
                 bidirectional_prompt=loaded.architecture == "prefix_lm",
                 suppress_ids=free_text_suppressed(loaded.specials))
    return generation_result(loaded, g)


def by_diffusion(path: str, steps: int | None) -> bool:
    """Whether the run at ``path`` writes text by reverse diffusion (its objective infills by
    ``unmasking``), read from its run.json before any model loads; ``--diffusion-steps``
    given for any other model is an error."""
    import json

    from lmobjectives.objectives import OBJECTIVES
    from lmobjectives.rundir import model_dir

    _, run_dir = model_dir(path)
    info = run_dir / "run.json" if run_dir is not None else None
    name = json.loads(info.read_text()).get("objective") if info and info.is_file() else None
    diffusion = name in OBJECTIVES and OBJECTIVES[name].capabilities.infill == "unmasking"
    if steps is not None and not diffusion:
        raise UserError(f"--diffusion-steps applies to masked diffusion runs; {path} was not "
                        "trained with one")
    return diffusion


# ------------------------------------------------------------------------------ infill
FIM_ARCHITECTURES = ("decoder",)
SENTINEL_ARCHITECTURES = ("encoder_decoder", "prefix_lm")


def run_objective(loaded: Any) -> str | None:
    """The objective a run was trained with (None for a bare HF directory)."""
    import json

    if loaded.run_dir is None or not (loaded.run_dir / "run.json").is_file():
        return None
    return json.loads((loaded.run_dir / "run.json").read_text()).get("objective")


def run_capabilities(loaded: Any) -> Capabilities | None:
    """What the run's objective declares its model can do (None for a bare HF directory)."""
    objective = run_objective(loaded)
    return None if objective is None else capabilities(objective)


def fills_fim(caps: Capabilities | None) -> bool:
    """Whether a decoder fills a FIM prompt: FIM runs, and bare HF models (who can say)."""
    return caps is None or caps.infill == "fim_prompt"


def fills_sentinels(caps: Capabilities | None) -> bool:
    """Whether a model fills <extra_id_N> spans; a bare HF model is taken at its word."""
    return caps is None or caps.infill == "sentinel_spans"


def mode_token_id(loaded: Any, caps: Capabilities | None) -> int | None:
    """The mode token the objective puts before an inference prompt (UL2's [NLU]), if any."""
    if caps is None or caps.mode_token is None:
        return None
    return int(getattr(loaded.specials, caps.mode_token))


def trained_context(loaded: Loaded) -> int:
    """Tokens the model was trained to attend over: a run's ``data.seq_len``, else the
    model's position limit."""
    import yaml

    cfg = None if loaded.run_dir is None else loaded.run_dir / "config.yaml"
    if cfg is not None and cfg.is_file():
        return int(yaml.safe_load(cfg.read_text())["data"]["seq_len"])
    return int(loaded.model.config.max_position_embeddings)


def read_line(path: str, line: int) -> tuple[str, str, str]:
    """(prefix, line, suffix) of a text file around its ``line``-th line (1-based); the
    line excludes its newline, which starts the suffix."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--file {path} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise UserError(f"cannot read --file {path} as UTF-8 text: {exc}") from None
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()  # the empty piece after the final newline is not a line
    if not 1 <= line <= len(lines):
        raise UserError(f"--line {line} is outside {path}, which has {len(lines)} lines")
    start = sum(len(l) + 1 for l in lines[:line - 1])
    end = start + len(lines[line - 1])
    return text[:start], text[start:end], text[end:]


def infill(path: str, *, prefix: str | None = None, suffix: str | None = None,
           text: str | None = None, file: str | None = None, line: int | None = None,
           mode: str = "psm", max_new_tokens: int = 64, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, diffusion_steps: int | None = None) -> dict[str, Any]:
    """``lmobj infill``: FIM infilling (``prefix``/``suffix``, or ``file`` + ``line``) for
    decoders, sentinel infilling (``text``) for span/UL2 runs (``infer/infill.py``), masked
    diffusion filling of every ``<|mask|>`` of ``text`` (``infer/diffusion.py``)."""
    from lmobjectives.infer.infill import MODES

    if by_diffusion(path, diffusion_steps):
        if text is None or prefix is not None or suffix is not None or file is not None:
            raise UserError("a masked diffusion run fills the <|mask|> tokens of --text "
                            "(anywhere, any number)")
        from lmobjectives.infer.diffusion import diffusion_infill

        return diffusion_infill(load_model(path), text, steps=diffusion_steps,
                                temperature=temperature, seed=seed)
    fim_given = prefix is not None or suffix is not None
    if sum([fim_given, text is not None, file is not None or line is not None]) != 1:
        raise UserError("give one of: --prefix/--suffix (FIM), --file with --line (FIM on a "
                        "line of a file), or --text with <extra_id_N> sentinels (span/UL2 runs)")
    if (file is None) != (line is None):
        raise UserError("--file and --line go together: the file and the line number to fill")
    if mode not in MODES:
        raise UserError(f"--mode must be psm or spm, not '{mode}'")
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if not 0 < top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    return _infill(load_model(path), prefix=prefix, suffix=suffix, text=text, file=file,
                   line=line, mode=mode, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, seed=seed)


def _infill(loaded: Loaded, *, prefix: str | None, suffix: str | None, text: str | None,
            file: str | None, line: int | None, mode: str, max_new_tokens: int,
            temperature: float, top_p: float, seed: int) -> dict[str, Any]:
    from lmobjectives.infer.infill import infill_fim, infill_sentinels

    path = str(loaded.run_dir or loaded.path)
    objective = run_objective(loaded)
    caps = None if objective is None else capabilities(objective)
    trained = f"model of architecture {loaded.architecture}" + (
        f", trained with {objective}" if objective else "")
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "seed": seed}
    if text is not None:
        if loaded.architecture not in SENTINEL_ARCHITECTURES or not fills_sentinels(caps):
            raise UserError(f"{path} holds a {trained}; --text fills <extra_id_N> spans for span or "
                            "UL2 runs (encoder_decoder or prefix_lm). "
                            + ("Use --prefix/--suffix for a decoder."
                               if loaded.architecture == "decoder" else ""))
        mode_token = mode_token_id(loaded, caps)
        try:
            res = infill_sentinels(loaded.model, loaded.tokenizer, loaded.specials, text,
                                   architecture=loaded.architecture, mode_token=mode_token,
                                   **sampling)
        except ValueError as exc:
            raise UserError(f"--text: {exc}") from None
        return {"kind": "sentinels", **res.as_dict()}
    if loaded.architecture not in FIM_ARCHITECTURES:
        hint = ("use --text with <extra_id_N> sentinels" if loaded.architecture in
                SENTINEL_ARCHITECTURES else "an encoder does not generate")
        raise UserError(f"{path} holds a {trained}; --prefix/--suffix/--file infill with a "
                        f"decoder (objective fim); {hint}")
    expected = None
    if file is not None:
        prefix, expected, suffix = read_line(file, line)
    res = infill_fim(loaded.model, loaded.tokenizer, loaded.specials, prefix or "", suffix or "",
                     mode=mode, single_line=file is not None,
                     context_tokens=trained_context(loaded), **sampling)
    out = {"kind": "fim", "mode": mode, **res.as_dict()}
    if file is not None:
        out.update({"file": file, "line": line, "expected": expected,
                    "exact_match": res.middle == expected})
        out.pop("text")  # the whole file back is noise; the line is what was asked
    return out


# Fixed examples for the end of `lmobj train`: a sampled continuation of a code prompt (a
# small model's greedy decoding loops on its most frequent tokens; sampling at T = 0.8,
# top-p 0.95 shows what it learned, reproducibly with the seed) and a function body's
# missing return value.
SHOWCASE_PROMPT = "import os\n\n\ndef "
SHOWCASE_SAMPLING = {"temperature": 0.8, "top_p": 0.95, "seed": 0}
SHOWCASE_PREFIX = "def add(a, b):\n    return "
SHOWCASE_SUFFIX = "\n\n\ndef sub(a, b):\n    return a - b\n"
SHOWCASE_SPAN_TEXT = "def add(a, b):\n    return<extra_id_0>\n"


def showcase(path: str, *, max_new_tokens: int = 48) -> dict[str, Any]:
    """What a finished run can do, on fixed prompts: a short sampled generation (decoders and
    prefix LMs; temperature, top-p and seed in the result), a FIM infill (FIM runs) or a
    sentinel infill (span/UL2 runs)."""
    loaded = load_model(path)
    caps = run_capabilities(loaded)
    fixed = {"file": None, "line": None, "mode": "psm", "max_new_tokens": max_new_tokens,
             "temperature": 0.0, "top_p": 1.0, "seed": 0}
    out: dict[str, Any] = {}
    if loaded.architecture in ("decoder", "prefix_lm"):
        out["generation"] = {"prompt": SHOWCASE_PROMPT, **SHOWCASE_SAMPLING, **generate_text(
            path, SHOWCASE_PROMPT, max_new_tokens=max_new_tokens, **SHOWCASE_SAMPLING)}
    if loaded.architecture == "decoder" and fills_fim(caps):
        out["infill"] = {"prefix": SHOWCASE_PREFIX, "suffix": SHOWCASE_SUFFIX, **_infill(
            loaded, prefix=SHOWCASE_PREFIX, suffix=SHOWCASE_SUFFIX, text=None, **fixed)}
    elif loaded.architecture in SENTINEL_ARCHITECTURES and caps is not None and fills_sentinels(caps):
        out["infill"] = {"input": SHOWCASE_SPAN_TEXT, **_infill(
            loaded, prefix=None, suffix=None, text=SHOWCASE_SPAN_TEXT, **fixed)}
    return out
