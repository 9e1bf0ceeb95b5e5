"""Byte-level BPE tokenizers: train, save as an HF directory, load, fingerprint.

Algorithm (GPT-2's byte-level BPE, trained with HF `tokenizers`):

1. Text is split by the GPT-2 regex into pieces (words with their leading space, runs of
   digits, punctuation, whitespace); every byte of a piece is mapped to a printable stand-in
   character, so the 256 byte values are the initial alphabet and no text is ever unknown.
2. BPE repeatedly merges the most frequent adjacent pair inside pieces until the vocabulary
   holds `vocab_size` entries: the reserved specials (ids 0..109, `SPECIAL_TOKENS` order),
   the 256 bytes, then the merges.
3. Decoding maps the stand-in characters back to bytes and the bytes back to UTF-8.

No normalizer and no prefix space, so `decode(encode(text)) == text` for every Unicode
string (lone surrogates are not Unicode text and cannot be encoded). Worked example with the
shipped tokenizer (ids differ per vocabulary):

    "def f(x):\\n    return x"  ->  ["def", "Ġf", "(", "x", "):", "ĊĠĠĠ", "Ġreturn", "Ġx"]
                             ->  decode -> "def f(x):\\n    return x"

Trade-off: byte-level BPE never fails on unseen text (a rare character costs up to 4 byte
tokens) at the price of merges spent on byte-fragments of common non-ASCII characters.

Data text that happens to contain a special string such as "<|endoftext|>" must not become
the special id; encode corpus text with `encode(text, add_special_tokens=False)` after
setting `tok.encode_special_tokens = True` (see `encode_data`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lmobjectives.errors import UserError
from lmobjectives.tokenizer.special import EOS, MASK, PAD, SPECIAL_TOKENS

N_BYTES = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + N_BYTES
TOKENIZER_FILE = "tokenizer.json"
# transformers' own value for "no length limit" (VERY_LARGE_INTEGER, int(1e30)).
NO_MAX_LENGTH = int(1e30)
_ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"


def _special_added_tokens() -> list[AddedToken]:
    # normalized=False: specials match the raw text; no stripping of neighbouring spaces.
    return [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for t in SPECIAL_TOKENS]


def new_bpe_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with our pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Adds nothing; spelled out because transformers installs exactly this one when a file has
    # none, and then the file and the loaded tokenizer would fingerprint differently.
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    return tok


def train_tokenizer(documents: Iterable[str], vocab_size: int, out_dir: str | os.PathLike[str] | None = None,
                    *, min_frequency: int = 2) -> Tokenizer:
    """Train byte-level BPE on `documents` (strings); save an HF directory to `out_dir` if given.

    The vocabulary holds at most `vocab_size` entries; a corpus too small to supply that many
    merges gives fewer (read `tok.get_vocab_size()`). Training is deterministic for a given
    document sequence.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"vocab_size {vocab_size} is too small: the {len(SPECIAL_TOKENS)} reserved special tokens "
            f"and {N_BYTES} byte tokens need at least {MIN_VOCAB_SIZE}"
        )
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=_special_added_tokens(),  # the trainer gives them ids 0..N-1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_checked_texts(documents), trainer=trainer)
    _check_specials(tok, "trained tokenizer")
    if out_dir is not None:
        save_hf_tokenizer(tok, out_dir)
    return tok


def _checked_texts(documents: Iterable[str]) -> Iterable[str]:
    n = 0
    for text in documents:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer takes strings, got {type(text).__name__}")
        n += 1
        yield text
    if n == 0:
        raise UserError("cannot train a tokenizer on zero documents")


def _check_specials(tok: Tokenizer, what: str) -> None:
    wrong = [(t, i, tok.token_to_id(t)) for i, t in enumerate(SPECIAL_TOKENS) if tok.token_to_id(t) != i]
    if wrong:
        t, want, got = wrong[0]
        raise UserError(f"{what}: special token {t!r} has id {got}, expected {want}")


def encode_data(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of corpus texts, with special strings in the text encoded as plain text."""
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = previous


def tokenizer_config(model_max_length: int | None = None) -> dict:
    """The tokenizer_config.json that makes `AutoTokenizer.from_pretrained(dir)` round-trip text."""
    named = {EOS, PAD, MASK}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": PAD,
        "mask_token": MASK,
        "extra_special_tokens": [t for t in SPECIAL_TOKENS if t not in named],
        # BPE output must not be "cleaned": it would delete the space in "a ." -> "a.".
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": NO_MAX_LENGTH if model_max_length is None else int(model_max_length),
    }


def save_hf_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike[str], *,
                      model_max_length: int | None = None) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    `model_max_length` is the model's context length when known (a run's final/ directory);
    None writes transformers' "no limit" value.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tokenizer_config(model_max_length)
    _write_atomic(out / TOKENIZER_FILE, canonical_tokenizer_json(tok))
    _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    special_map = {k: config[k] for k in ("eos_token", "pad_token", "mask_token")}
    special_map["additional_special_tokens"] = config["extra_special_tokens"]
    _write_atomic(out / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def canonical_tokenizer_json(tok: Tokenizer) -> str:
    """tokenizer.json with sorted keys and fixed separators: equal tokenizers give equal text."""
    data = json.loads(_backend(tok).to_str())
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def tokenizer_fingerprint(tok: object) -> str:
    """sha256 of the canonical tokenizer.json; accepts a `tokenizers.Tokenizer` or an HF tokenizer."""
    return hashlib.sha256(canonical_tokenizer_json(_backend(tok)).encode("utf-8")).hexdigest()


def _backend(tok: object) -> Tokenizer:
    if isinstance(tok, Tokenizer):
        return tok
    backend = getattr(tok, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(f"expected a tokenizers.Tokenizer or a fast HF tokenizer, got {type(tok).__name__}")


def default_tokenizer_dir() -> Path:
    """The shipped default tokenizer (vocab 8192, trained on the default corpus)."""
    return _ASSET_DIR


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Load a tokenizer from an HF directory or a tokenizer.json file; None -> the shipped default."""
    p = default_tokenizer_dir() if path is None else Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        where = "the shipped default tokenizer is missing" if path is None else "no tokenizer found"
        raise UserError(f"{where}: {file} does not exist (train one with `lmobj tokenizer train`)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        raise UserError(f"{file}: not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
