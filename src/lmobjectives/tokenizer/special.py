"""The reserved special tokens every lmobjectives tokenizer carries, with these exact strings.

Other tools depend on the strings, so they never change. Ids are assigned in this order
at the start of the vocabulary, so every tokenizer we train has the same special ids.
"""

from __future__ import annotations

from dataclasses import dataclass

EOS = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
N_SENTINELS = 100  # T5 reserves 100 sentinels (<extra_id_0> ... <extra_id_99>).
SENTINELS = tuple(f"<extra_id_{i}>" for i in range(N_SENTINELS))
FIM_PREFIX = "<fim_prefix>"
FIM_MIDDLE = "<fim_middle>"
FIM_SUFFIX = "<fim_suffix>"
FIM_PAD = "<fim_pad>"
# UL2 mode tokens (UL2 §3.1.3): R-denoisers, X-denoisers, S-denoiser.
NLU = "[NLU]"
NLG = "[NLG]"
S2S = "[S2S]"

SPECIAL_TOKENS: tuple[str, ...] = (
    EOS, PAD, MASK, *SENTINELS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, NLU, NLG, S2S,
)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the reserved tokens in one tokenizer; objectives receive this, never a tokenizer."""

    eos: int
    pad: int
    mask: int
    sentinels: tuple[int, ...]
    fim_prefix: int
    fim_middle: int
    fim_suffix: int
    fim_pad: int
    nlu: int
    nlg: int
    s2s: int
    vocab_size: int

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], vocab_size: int) -> "SpecialIds":
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            from lmobjectives.errors import UserError

            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise UserError(
                f"tokenizer lacks {len(missing)} reserved special token(s): {shown}; "
                "train one with `lmobj tokenizer train` or add them"
            )
        return cls(
            eos=vocab[EOS], pad=vocab[PAD], mask=vocab[MASK],
            sentinels=tuple(vocab[s] for s in SENTINELS),
            fim_prefix=vocab[FIM_PREFIX], fim_middle=vocab[FIM_MIDDLE],
            fim_suffix=vocab[FIM_SUFFIX], fim_pad=vocab[FIM_PAD],
            nlu=vocab[NLU], nlg=vocab[NLG], s2s=vocab[S2S], vocab_size=vocab_size,
        )

    @classmethod
    def default(cls, vocab_size: int = 8192) -> "SpecialIds":
        """The ids a tokenizer trained by `lmobj tokenizer train` has (specials first, in order)."""
        return cls.from_vocab({t: i for i, t in enumerate(SPECIAL_TOKENS)}, vocab_size)

    def all_ids(self) -> tuple[int, ...]:
        return (self.eos, self.pad, self.mask, *self.sentinels, self.fim_prefix,
                self.fim_middle, self.fim_suffix, self.fim_pad, self.nlu, self.nlg, self.s2s)

    def is_special(self, tokens):  # noqa: ANN001,ANN201 - numpy in, numpy bool out
        """Boolean mask of special tokens; specials are one contiguous id range when trained by us."""
        import numpy as np

        ids = np.asarray(self.all_ids())
        lo, hi = int(ids.min()), int(ids.max())
        if hi - lo + 1 == len(ids):
            return (tokens >= lo) & (tokens <= hi)
        return np.isin(tokens, ids)

    def as_dict(self) -> dict[str, int]:
        out = {"eos": self.eos, "pad": self.pad, "mask": self.mask,
               "fim_prefix": self.fim_prefix, "fim_middle": self.fim_middle,
               "fim_suffix": self.fim_suffix, "fim_pad": self.fim_pad,
               "nlu": self.nlu, "nlg": self.nlg, "s2s": self.s2s}
        out.update({f"extra_id_{i}": s for i, s in enumerate(self.sentinels)})
        return out
