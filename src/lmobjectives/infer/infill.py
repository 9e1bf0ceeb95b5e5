"""Infilling: ask a model for the missing part of a text, in the form its objective taught it.

FIM (decoders trained with the ``fim`` objective). The prompt is the training layout cut
just after ``<fim_middle>``, so the model's next tokens are the middle (FIM paper §3; StarCoder
token names; SPM is the paper's variant 2, as in ``objectives/fim.py``)::

    PSM  <fim_prefix> prefix <fim_suffix> suffix <fim_middle>      -> middle EOS
    SPM  <fim_prefix> <fim_suffix> suffix <fim_middle> prefix      -> middle EOS

Worked example with the shipped tokenizer's ids (PRE 103, MID 104, SUF 105), prefix
``"def"`` = [570] and suffix ``" x"`` = [950]::

    psm = [103, 570, 105, 950, 104]
    spm = [103, 105, 950, 104, 570]

The prompt starts at position 0 with no EOS in front: in training a document begins at
position 0 after the previous document's EOS and, with per-document positions, never sees it.
Decoding stops at the first of (``MiddleStop``):

* ``eos``: EOS, what training put after every middle;
* ``special``: any other reserved token (a sentinel is never part of a middle's text);
* ``suffix``: the generation reached the suffix: it holds the suffix's first
  ``ANCHOR_CHARS`` characters (only when those hold at least ``MIN_ANCHOR_CHARS`` non-blank
  ones, so a lone newline or bracket cannot end a middle). This is "the middle is complete"
  for a model that forgot its EOS; the middle is the text before the anchor. Trade-off: a
  middle that itself contains the suffix's opening text is cut there;
* ``line``: in single-line mode, the first newline (the middle of a line infill is one line);
* ``max_chars``: the text is longer than the caller's bound (the exact-match metric stops
  once a middle can no longer equal its line);
* ``length``: ``max_new_tokens``.

Sentinel infilling (``span`` and ``ul2`` runs). The prompt is what span corruption feeds
its model: the text with ``<extra_id_0>``, ``<extra_id_1>``, ... where spans are missing, then
EOS (UL2 runs put the R-denoiser mode token ``[NLU]`` first, UL2 §3.1.3). The model answers
``<extra_id_0> span0 <extra_id_1> span1 ... EOS``; decoding stops at EOS or at the sentinel
after the last one the text holds (every span answered), and each span replaces its sentinel.
Example: text ``"a<extra_id_0>c"``, answer ``<extra_id_0> "b" <extra_id_1>`` -> ``"abc"``.

* encoder-decoder (T5): the encoder reads the prompt once; the decoder starts from PAD (T5's
  decoder start) and decodes with a KV cache.
* prefix-LM decoder: the prompt is prefilled with an all-true 4-D mask (every prompt token
  sees every other, the bidirectional prefix of ``converters.to_prefix_lm``), then the answer
  is decoded causally with the KV cache. This is exact, not an approximation: in the prefix-LM
  mask a prompt token never sees a target token, so the prompt's keys and values from the
  prefill are the ones a full forward with the prefix-LM mask would compute at every step
  (``test_seq2seq`` checks the tokens agree). It costs one forward per token instead of a
  growing full forward per token.

The decode loop is the ladder's (``generate.prefill``, ``decode_one``, ``decode_until``);
this module adds the encoder-decoder rungs and the stop rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from lmobjectives.infer.generate import Step, StopRule, decode_one, decode_until, prefill
from lmobjectives.tokenizer.special import SpecialIds

MODES = ("psm", "spm")
# Our choices, not a paper's: long enough that an accidental match inside a middle is
# unlikely, short enough that a model running into the suffix is caught within a line.
ANCHOR_CHARS = 32
MIN_ANCHOR_CHARS = 8
SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


# ------------------------------------------------------------------------------ FIM prompts
def fim_prompt(prefix_ids: list[int], suffix_ids: list[int], specials: SpecialIds,
               mode: str = "psm") -> list[int]:
    """The FIM prompt (see module docstring) for already tokenized prefix and suffix."""
    pre, suf, mid = [specials.fim_prefix], [specials.fim_suffix], [specials.fim_middle]
    if mode == "psm":
        return pre + list(prefix_ids) + suf + list(suffix_ids) + mid
    if mode == "spm":
        return pre + suf + list(suffix_ids) + mid + list(prefix_ids)
    raise ValueError(f"FIM mode must be one of {MODES}, got {mode!r}")


def fit_context(prefix_ids: list[int], suffix_ids: list[int],
                budget: int | None) -> tuple[list[int], list[int]]:
    """Keep the prefix's last and the suffix's first tokens, ``budget`` in all: half each,
    a side's unused half going to the other (the text nearest the middle matters most).

    >>> fit_context([1, 2, 3, 4, 5], [6, 7], 5)
    ([3, 4, 5], [6, 7])
    """
    if budget is None or len(prefix_ids) + len(suffix_ids) <= budget:
        return list(prefix_ids), list(suffix_ids)
    budget = max(budget, 0)
    n_suf = min(len(suffix_ids), max(budget // 2, budget - len(prefix_ids)))
    n_pre = min(len(prefix_ids), budget - n_suf)
    return list(prefix_ids[len(prefix_ids) - n_pre:]), list(suffix_ids[:n_suf])


def encode_text(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------ rungs
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def causal_rungs(model: torch.nn.Module, prompt_ids: list[int]) -> tuple[tuple, Step]:
    start = prefill(model, torch.tensor(prompt_ids, device=_device(model)))
    return start, lambda tok, cache: decode_one(model, tok, cache)


def prefix_lm_rungs(model: torch.nn.Module, prompt_ids: list[int]) -> tuple[tuple, Step]:
    """The prompt as a bidirectional prefix (``prefill(bidirectional=True)``), then causal."""
    start = prefill(model, torch.tensor(prompt_ids, device=_device(model)), bidirectional=True)
    return start, lambda tok, cache: decode_one(model, tok, cache)


def encoder_decoder_rungs(model: torch.nn.Module, prompt_ids: list[int],
                          decoder_start: int) -> tuple[tuple, Step]:
    """Encode once; the decoder steps with an encoder-decoder KV cache from ``decoder_start``."""
    from transformers import DynamicCache, EncoderDecoderCache

    device = _device(model)
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=torch.tensor([prompt_ids], device=device))

    @torch.no_grad()
    def step(tok: int, cache: Any) -> tuple[torch.Tensor, Any]:
        out = model(encoder_outputs=encoded, decoder_input_ids=torch.tensor([[tok]], device=device),
                    cache=cache, use_cache=True)
        return out.logits[0, -1], cache

    cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
    return step(decoder_start, cache), step


# ------------------------------------------------------------------------------ FIM infill
@dataclass
class MiddleStop:
    """The FIM stop rules (module docstring) and the middle they leave."""

    tokenizer: Any
    specials: SpecialIds
    suffix: str = ""
    single_line: bool = False
    max_chars: int | None = None
    anchor: str | None = field(init=False)  # the suffix's opening text, when long enough
    _special: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._special = frozenset(self.specials.all_ids())
        anchor = self.suffix[:ANCHOR_CHARS]
        self.anchor = anchor if len(anchor.strip()) >= MIN_ANCHOR_CHARS else None

    def _text(self, tokens: list[int]) -> str:
        ids = [t for t in tokens if t not in self._special]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def __call__(self, tokens: list[int]) -> str | None:
        last = tokens[-1]
        if last == self.specials.eos:
            return "eos"
        if last in self._special:
            return "special"
        text = self._text(tokens)
        if self.single_line and "\n" in text:
            return "line"
        if self.anchor is not None and self.anchor in text:
            return "suffix"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "max_chars"
        return None

    def middle(self, tokens: list[int]) -> str:
        text = self._text(tokens)
        if self.single_line:
            text = text.split("\n", 1)[0]
        if self.anchor is not None and self.anchor in text:
            text = text[:text.index(self.anchor)]
        return text


@dataclass
class Infill:
    middle: str
    text: str  # prefix + middle + suffix
    tokens: list[int]  # generated ids, stop token included
    prompt_tokens: int
    stopped_by: str
    forward_passes: int

    def as_dict(self) -> dict[str, Any]:
        return {"middle": self.middle, "text": self.text, "tokens": self.tokens,
                "prompt_tokens": self.prompt_tokens, "stopped_by": self.stopped_by,
                "forward_passes": self.forward_passes}


def _decode_middle(model: torch.nn.Module, prompt: list[int], stop: "MiddleStop", prefix: str,
                   suffix: str, **decode: Any) -> Infill:
    """Decode after ``prompt`` (eval mode, restored after) until ``stop``; the middle it gives."""
    was_training = model.training
    model.eval()
    try:
        start, step = causal_rungs(model, prompt)
        g = decode_until(start, step, stop, **decode)
    finally:
        model.train(was_training)
    middle = stop.middle(g.tokens)
    return Infill(middle=middle, text=prefix + middle + suffix, tokens=g.tokens,
                  prompt_tokens=len(prompt), stopped_by=g.stopped_by,
                  forward_passes=g.forward_passes)


def infill_fim(model: torch.nn.Module, tokenizer: Any, specials: SpecialIds, prefix: str,
               suffix: str, *, mode: str = "psm", max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
               single_line: bool = False, max_chars: int | None = None,
               context_tokens: int | None = None) -> Infill:
    """Fill the middle between ``prefix`` and ``suffix`` with a FIM-trained decoder.
    ``context_tokens`` (the trained sequence length) bounds the prompt and the middle;
    ``fit_context`` trims the far ends of prefix and suffix."""
    # Room for the middle, but never less than half the context for prefix and suffix.
    budget = None if context_tokens is None else \
        max(context_tokens - 3 - max_new_tokens, context_tokens // 2)
    pre, suf = fit_context(encode_text(tokenizer, prefix), encode_text(tokenizer, suffix), budget)
    prompt = fim_prompt(pre, suf, specials, mode)
    stop = MiddleStop(tokenizer, specials, suffix=suffix, single_line=single_line,
                      max_chars=max_chars)
    return _decode_middle(model, prompt, stop, prefix, suffix, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed)


def infill_left_to_right(model: torch.nn.Module, tokenizer: Any, specials: SpecialIds,
                         prefix: str, suffix: str, *, max_new_tokens: int = 64,
                         single_line: bool = False, max_chars: int | None = None,
                         context_tokens: int | None = None) -> Infill:
    """The baseline for a model without an infilling form: greedy continuation of ``prefix``
    alone (it never sees the suffix), under the same stop rules as ``infill_fim``."""
    budget = None if context_tokens is None else max(context_tokens - max_new_tokens, context_tokens // 2)
    prompt, _ = fit_context(encode_text(tokenizer, prefix), [], budget)
    # Packed training rows put EOS before every document: it is the empty prefix's context.
    prompt = prompt or [specials.eos]
    stop = MiddleStop(tokenizer, specials, suffix=suffix, single_line=single_line,
                      max_chars=max_chars)
    model = getattr(model, "lm", model)  # an MTP model: its plain next-token LM
    return _decode_middle(model, prompt, stop, prefix, suffix, max_new_tokens=max_new_tokens)


# ------------------------------------------------------------------------------ sentinels
def sentinel_count(text: str) -> int:
    """Number of sentinels in ``text``; they must be ``<extra_id_0>``, ``<extra_id_1>``, ...
    in order, as span corruption numbers them (ValueError otherwise)."""
    found = [int(m) for m in SENTINEL_RE.findall(text)]
    if found != list(range(len(found))):
        raise ValueError("sentinels must be <extra_id_0>, <extra_id_1>, ... in order, each "
                         f"once; found {', '.join(f'<extra_id_{k}>' for k in found) or 'none'}")
    return len(found)


def parse_spans(tokens: list[int], specials: SpecialIds, n: int) -> list[list[int] | None]:
    """Split an answer ``<extra_id_0> a <extra_id_1> b ... EOS`` into the ids of each of the
    ``n`` spans; None for a span the answer never opened. Tokens before the first sentinel
    belong to no span.

    >>> sp = SpecialIds.default(); s0, s1 = sp.sentinels[:2]
    >>> parse_spans([s0, 307, 308, s1, 309, sp.eos], sp, 2)
    [[307, 308], [309]]
    """
    index = {s: k for k, s in enumerate(specials.sentinels)}
    spans: list[list[int] | None] = [None] * n
    current: int | None = None
    for t in tokens:
        if t == specials.eos:
            break
        if t in index:
            current = index[t] if index[t] < n else None
            if current is not None:
                spans[current] = []
            else:
                break
        elif current is not None:
            spans[current].append(t)
    return spans


def sentinel_stop(specials: SpecialIds, n: int) -> StopRule:
    """Stop at EOS, or at a sentinel past the ``n`` the text holds (every span answered)."""
    after = frozenset(specials.sentinels[n:])

    def stop(tokens: list[int]) -> str | None:
        if tokens[-1] == specials.eos:
            return "eos"
        if tokens[-1] in after:
            return "complete"
        return None

    return stop


@dataclass
class SpanInfill:
    text: str  # the text with every sentinel replaced by its span ("" where none came)
    spans: list[str | None]
    tokens: list[int]
    prompt_tokens: int
    stopped_by: str
    forward_passes: int

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "spans": self.spans, "tokens": self.tokens,
                "prompt_tokens": self.prompt_tokens, "stopped_by": self.stopped_by,
                "forward_passes": self.forward_passes}


def infill_sentinels(model: torch.nn.Module, tokenizer: Any, specials: SpecialIds, text: str, *,
                     architecture: str, mode_token: int | None = None, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> SpanInfill:
    """Fill the sentinel spans of ``text`` with a span-corruption or UL2 model
    (``architecture`` ``encoder_decoder`` or ``prefix_lm``; ``mode_token`` for UL2)."""
    n = sentinel_count(text)
    if n == 0:
        raise ValueError("the text holds no sentinel: mark each missing span with "
                         "<extra_id_0>, <extra_id_1>, ...")
    prompt = ([] if mode_token is None else [mode_token]) + encode_text(tokenizer, text) \
        + [specials.eos]
    was_training = model.training
    model.eval()
    try:
        if architecture == "encoder_decoder":
            start, step = encoder_decoder_rungs(model, prompt, decoder_start=specials.pad)
        elif architecture == "prefix_lm":
            start, step = prefix_lm_rungs(model, prompt)
        else:
            raise ValueError(f"sentinel infilling needs an encoder_decoder or prefix_lm model, "
                             f"not {architecture}")
        g = decode_until(start, step, sentinel_stop(specials, n), max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seed=seed)
    finally:
        model.train(was_training)
    special = frozenset(specials.all_ids())
    spans = [None if ids is None else
             tokenizer.decode([t for t in ids if t not in special], skip_special_tokens=False)
             for ids in parse_spans(g.tokens, specials, n)]
    filled = SENTINEL_RE.sub(lambda m: spans[int(m.group(1))] or "", text)
    return SpanInfill(text=filled, spans=spans, tokens=g.tokens, prompt_tokens=len(prompt),
                      stopped_by=g.stopped_by, forward_passes=g.forward_passes)
