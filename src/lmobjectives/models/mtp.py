"""Multi-token prediction heads around an HF ``LlamaForCausalLM``. Returns hidden states and
logits; the loss lives in ``step/mtp.py``.

Two designs (``MTPSpec.head_design``):

* ``parallel`` (Gloeckle et al. 2024 §2): a shared trunk, then n heads that are each one
  transformer layer of the backbone's own kind, then the shared final norm and unembedding.
  Head 1 *is* the HF model's last layer, so trunk + head 1 is exactly the wrapped
  ``LlamaForCausalLM`` and exports with ``save_pretrained``; heads 2..n are extra
  ``LlamaDecoderLayer``s reading the same trunk output z::

      logits_k = lm_head(norm(head_k(z)))      z = layers[:-1](embed(x)),  head_1 = layers[-1]

* ``sequential`` (DeepSeek-V3 §2.2, Eqs. 21–23): the whole HF model is the main model and
  head 1; depth k ≥ 2 combines the previous depth's hidden state h^{k-1} with the embedding of
  the token it follows, t_{i+k-1} (RMSNorm each, concatenate, project 2d → d), then one
  transformer block and its own final norm; embedding and unembedding are shared::

      h^k_i = block_k(W_k [enorm(emb(t_{i+k-1})); hnorm(h^{k-1}_i)])    logits_k = lm_head(norm_k(h^k))

  The concatenation order [embedding; hidden] follows the public implementations (vLLM's
  ``deepseek_mtp.py``, Megatron's ``_concat_embeddings``), not Eq. 21's written order.

Trade-off: parallel heads cost one layer each and all read the same z, so a decoding step
drafts every future token at once; sequential depths keep the causal chain (each sees the
token before its target) at the price of drafting one depth after another.

Extra heads are stored next to the exported HF model as ``mtp_heads.safetensors`` and
``mtp_heads.json``; ``load_heads`` puts them back on a loaded ``LlamaForCausalLM``.
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HEADS_FILE = "mtp_heads.safetensors"
HEADS_JSON = "mtp_heads.json"
HEADS_FORMAT = 1


def _layer_classes():  # noqa: ANN202 - (decoder layer class, RMSNorm class)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

    return LlamaDecoderLayer, LlamaRMSNorm


@functools.cache
def _cache_keyword() -> str:
    """transformers renamed ``past_key_values`` to ``cache`` in 5.x layer signatures; an
    unknown keyword would be swallowed by ``**kwargs`` and silently disable the cache."""
    layer_cls, _ = _layer_classes()
    return "cache" if "cache" in inspect.signature(layer_cls.forward).parameters else "past_key_values"


@functools.cache
def _mask_cache_keyword() -> str:
    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@dataclass(frozen=True)
class MTPSpec:
    n_heads: int  # head 1 = next token; heads 2..n predict t+2..t+n
    head_design: str = "parallel"  # parallel | sequential

    def __post_init__(self) -> None:
        if self.n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {self.n_heads}")
        if self.head_design not in ("parallel", "sequential"):
            raise ValueError(f"unknown head_design {self.head_design!r}")


@dataclass
class Context:
    """What every layer of one forward shares: the attention mask (packed documents are kept
    apart through ``position_ids``), rotary embeddings and positions."""

    mask: Any  # torch.Tensor | None (None: plain causal, sdpa's is_causal)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor  # (B, T)


class SequentialDepth(nn.Module):
    """One DeepSeek-V3 MTP module (names as in its checkpoints: enorm, hnorm, eh_proj)."""

    def __init__(self, config) -> None:  # noqa: ANN001 - LlamaConfig
        super().__init__()
        layer_cls, norm_cls = _layer_classes()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = norm_cls(d, eps=eps)
        self.hnorm = norm_cls(d, eps=eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        # Each depth decodes with its own cache (its stream lags the main one), hence index 0.
        self.block = layer_cls(config, layer_idx=0)
        self.norm = norm_cls(d, eps=eps)

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor, ctx: Context,
                cache=None) -> torch.Tensor:  # noqa: ANN001
        x = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(hidden)], dim=-1))  # (B, T, d)
        return run_layer(self.block, x, ctx, cache)


def run_layer(layer: nn.Module, x: torch.Tensor, ctx: Context, cache=None) -> torch.Tensor:  # noqa: ANN001
    kw = {_cache_keyword(): cache, "use_cache": cache is not None} if cache is not None else {}
    return layer(x, attention_mask=ctx.mask, position_ids=ctx.position_ids,
                 position_embeddings=ctx.position_embeddings, **kw)


class MTPModel(nn.Module):
    """An HF ``LlamaForCausalLM`` plus n - 1 extra heads. ``forward`` is the wrapped model's
    own (next-token logits only), so evaluation and plain generation see a causal LM."""

    def __init__(self, lm: nn.Module, spec: MTPSpec) -> None:
        super().__init__()
        layer_cls, _ = _layer_classes()
        self.lm = lm
        self.spec = spec
        cfg = lm.config
        if spec.head_design == "parallel":
            self.heads = nn.ModuleList(layer_cls(cfg, layer_idx=i) for i in range(spec.n_heads - 1))
        else:
            self.heads = nn.ModuleList(SequentialDepth(cfg) for _ in range(spec.n_heads - 1))

    # ------------------------------------------------------------------ plain model
    @property
    def config(self):  # noqa: ANN201 - the wrapped model's config (export, generation)
        return self.lm.config

    @property
    def n_heads(self) -> int:
        return self.spec.n_heads

    def forward(self, *args: Any, **kwargs: Any):  # noqa: ANN201
        return self.lm(*args, **kwargs)

    # The output head of ``forward`` is the wrapped model's: evaluation that applies it in
    # chunks (``models/output.py``) finds and swaps it here.
    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def set_output_embeddings(self, head: nn.Module) -> None:
        self.lm.set_output_embeddings(head)

    # ------------------------------------------------------------------ pieces
    @property
    def trunk_layers(self) -> nn.ModuleList:
        layers = self.lm.model.layers
        return layers[:-1] if self.spec.head_design == "parallel" else layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(input_ids)  # (B, T, d)

    def context(self, x: torch.Tensor, position_ids: torch.Tensor | None, cache=None) -> Context:  # noqa: ANN001
        """Mask and rotary embeddings for a forward over ``x`` (B, T, d) after ``cache``."""
        from transformers.masking_utils import create_causal_mask

        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None]  # (1, T)
        mask = create_causal_mask(config=self.lm.config, inputs_embeds=x, attention_mask=None,
                                  position_ids=position_ids, **{_mask_cache_keyword(): cache})
        pe = self.lm.model.rotary_emb(x, position_ids=position_ids)
        return Context(mask=mask, position_embeddings=pe, position_ids=position_ids)

    def trunk(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
              cache=None) -> tuple[torch.Tensor, Context]:  # noqa: ANN001
        """Shared trunk: z (B, T, d) and the context the heads reuse. Parallel: all layers but
        the last; sequential: every layer (z = h^0, the main model's last hidden state)."""
        x = self.embed(input_ids)  # (B, T, d)
        ctx = self.context(x, position_ids, cache)
        for layer in self.trunk_layers:
            x = run_layer(layer, x, ctx, cache)
        return x, ctx

    def head_hidden(self, k: int, x: torch.Tensor, ctx: Context, tokens: torch.Tensor | None = None,
                    cache=None) -> torch.Tensor:  # noqa: ANN001
        """Hidden state of head ``k`` (1-based), (B, T, d).

        Parallel: ``x`` is the trunk output z for every k. Sequential: ``x`` is h^{k-1} (z for
        k = 1, which returns it unchanged) and ``tokens`` (B, T) are t_{i+k-1}, the tokens
        each position's depth-k module reads.
        """
        if k == 1:
            if self.spec.head_design == "parallel":
                return run_layer(self.lm.model.layers[-1], x, ctx, cache)
            return x
        head = self.heads[k - 2]
        if self.spec.head_design == "parallel":
            return run_layer(head, x, ctx, cache)
        if tokens is None:
            raise ValueError("sequential heads need the tokens they read")
        return head(x, self.embed(tokens), ctx, cache)

    def logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Shared unembedding of head ``k``'s hidden state: (B, T, V)."""
        return self.lm.lm_head(self.projection_input(k, hidden))

    def projection_input(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head ``k``'s final norm, (B, T, d): what the shared ``lm.lm_head`` projects (the loss
        may apply that projection chunk by chunk)."""
        if self.spec.head_design == "sequential" and k > 1:
            return self.heads[k - 2].norm(hidden)
        return self.lm.model.norm(hidden)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """The wrapped model as a plain HF causal LM, plus the extra heads beside it."""
        from safetensors.torch import save_file

        path = Path(path)
        self.lm.save_pretrained(str(path), **kwargs)
        state = {k: v.detach().contiguous().cpu() for k, v in self.heads.state_dict().items()}
        save_file(state, str(path / HEADS_FILE), metadata={"format": str(HEADS_FORMAT)})
        meta = {"format": HEADS_FORMAT, **asdict(self.spec),
                "base_layers": self.lm.config.num_hidden_layers,
                "hidden_size": self.lm.config.hidden_size,
                "note": "extra multi-token-prediction heads for lmobjectives; the HF model in this "
                        "directory is the next-token model on its own"}
        (path / HEADS_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def init_heads(model: MTPModel, seed: int, copy_last_layer: bool = False) -> None:
    """Initialise the extra heads like the backbone (normal(0, initializer_range), norms 1),
    under their own seed; with ``copy_last_layer`` every head's transformer layer starts as a
    copy of the backbone's last layer (a warm start when adding heads to a trained model)."""
    std = getattr(model.config, "initializer_range", 0.02)
    _, norm_cls = _layer_classes()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.heads.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, norm_cls):
                nn.init.ones_(module.weight)
    if copy_last_layer:
        last = model.lm.model.layers[-1].state_dict()
        for head in model.heads:
            target = head if model.spec.head_design == "parallel" else head.block
            target.load_state_dict(last)


def read_heads_spec(directory: str | Path) -> MTPSpec | None:
    f = Path(directory) / HEADS_JSON
    if not f.is_file():
        return None
    meta = json.loads(f.read_text())
    return MTPSpec(n_heads=int(meta["n_heads"]), head_design=str(meta["head_design"]))


def load_heads(lm: nn.Module, directory: str | Path, spec: MTPSpec | None = None) -> MTPModel:
    """Wrap ``lm`` (loaded from ``directory``) with the extra heads stored there."""
    from safetensors.torch import load_file

    found = read_heads_spec(directory)
    if found is None:
        raise FileNotFoundError(f"{directory} has no {HEADS_JSON}")
    if spec is not None and spec != found:
        raise ValueError(f"{directory} holds heads {found}, expected {spec}")
    model = MTPModel(lm, found)
    state = load_file(str(Path(directory) / HEADS_FILE))
    model.heads.load_state_dict(state, strict=True)
    device = next(lm.parameters()).device
    return model.to(device)
