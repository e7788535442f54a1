"""Layer-level token pruning for transformers decoder LMs: after layer K, keep a subset of positions.

`TokenPruner` attaches to a transformers model whose text decoder has Llama-style
layers (``layers[i]`` called with ``hidden_states``, ``attention_mask``,
``position_ids``, ``position_embeddings`` and a ``cache``; attention dispatched
through ``AttentionInterface``). At the prefill forward it:

- optionally asks for the attention weights of layer ``K - 1`` (computed eagerly
  at that layer only) and hands them to ``score(weights)``;
- before layer ``K`` calls ``select(scores, hidden_states)`` for the kept
  positions per row, a ``(B, Lk)`` index of original positions, and gathers the
  hidden states, ``position_ids`` and RoPE ``(cos, sin)`` there, so kept tokens
  keep their original positions;
- from layer ``K`` on, its attention function gathers the attention mask's rows
  and columns at the kept positions, so layers ``>= K`` store only the kept
  tokens' K/V in the cache and attend to them alone.

Decode steps need nothing else: their positions come from the full-length
bookkeeping of ``generate`` (attention mask, ``cache_position``), layers ``< K``
cache every position, and layers ``>= K`` see the mask's columns at the kept
prompt positions plus every decoded position.

Batch > 1: every row keeps the same number of positions (``select`` returns a
rectangular index), which is the case for LLaVA-style models where each image
gives the same number of tokens and the text is always kept. Rows may keep
different positions.

Supported: a ``DynamicCache`` (or no cache), attention masks that are tensors or
None (eager and sdpa). attach/detach restores the model's attention
implementation and removes the hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import compat
from .errors import AttachError

ATTN_NAME = "decodekit_token_pruning"
"""The name the pruning attention function is registered under in transformers' AttentionInterface."""

# id(attention module) -> the TokenPruner that owns it while attached.
_OWNERS: dict[int, TokenPruner] = {}


def eager_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Plain attention that returns its weights ``(B, H, q, k)``; a causal mask when ``attention_mask`` is None."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scale
    q, k = query.shape[2], key.shape[2]
    if attention_mask is None:
        if q > 1:
            causal = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
            weights = weights.masked_fill(~causal, torch.finfo(weights.dtype).min)
    elif attention_mask.dtype == torch.bool:
        weights = weights.masked_fill(~attention_mask[..., :k], torch.finfo(weights.dtype).min)
    else:
        weights = weights + attention_mask[..., :k]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _pruning_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: the owner's pruning rules, then the model's own attention."""
    owner = _OWNERS.get(id(module))
    if owner is None:
        raise RuntimeError(
            f"this model's attention is set to decodekit's {ATTN_NAME} while a token-pruning "
            "strategy is attached; detach it to call the model without pruning."
        )
    return owner._attend(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    """Register `_pruning_attention` under `ATTN_NAME` (idempotent; the name stays registered,
    unused once every model's own implementation is back)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _pruning_attention)
    # boolean masks (True = attend), as for sdpa; the eager path here reads them too
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def text_decoder(model: Any) -> Any:
    """The decoder stack (the module with ``layers``) of a causal LM or a LLaVA-style VLM."""
    for path in ("model.language_model", "language_model", "model"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and isinstance(getattr(obj, "layers", None), torch.nn.ModuleList):
            return obj
    raise AttachError(
        f"{type(model).__name__}: no decoder with .layers found (looked at model.language_model, "
        "language_model, model); token pruning supports Llama-style decoders."
    )


def _gather_positions(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` at the positions ``keep`` ``(B, Lk)`` along ``dim`` (dim 1 or -2/-1 of a mask)."""
    if x.shape[0] != keep.shape[0]:
        x = x.expand(keep.shape[0], *x.shape[1:])
    shape = [1] * x.dim()
    shape[0], shape[dim] = keep.shape
    index = keep.view(shape).expand(
        *[s if i != dim else keep.shape[1] for i, s in enumerate(x.shape)]
    )
    return torch.gather(x, dim, index)


class TokenPruner:
    """Prune positions after decoder layer ``layer`` of ``model`` (see the module doc).

    Args:
        model: a transformers ``PreTrainedModel`` (causal LM or LLaVA-style VLM).
        layer: K, the first layer that runs on the kept positions only (1 <= K < layers).
        select: ``select(scores, hidden_states) -> (B, Lk)`` long tensor of kept positions per
            row, sorted, at the prefill forward; ``scores`` is what ``score`` returned (None
            without ``score``).
        score: ``score(weights) -> Tensor``: called with layer ``K - 1``'s attention weights
            ``(B, H, L, L)`` at the prefill forward (that layer then runs eager attention).
    """

    def __init__(
        self,
        model: Any,
        layer: int,
        select: Callable[[Any, torch.Tensor], torch.Tensor],
        score: Callable[[torch.Tensor], Any] | None = None,
    ):
        self.model = model
        self.decoder = text_decoder(model)
        n = len(self.decoder.layers)
        if not 1 <= layer < n:
            raise AttachError(
                f"token pruning layer must be in [1, {n - 1}] for this model, got {layer}"
            )
        self.layer = layer
        self.select = select
        self.score = score
        self.keep: torch.Tensor | None = None  # (B, Lk) original positions kept at prefill
        self.prefill_len = 0
        self.scores: Any = None
        self._saved: dict[str, Any] | None = None

    # -- attach / detach ------------------------------------------------------------------
    def attach(self) -> None:
        decoder = self.decoder
        if not hasattr(decoder, "set_attn_implementation"):
            raise AttachError(f"{type(decoder).__name__} has no set_attn_implementation.")
        attns = [getattr(block, "self_attn", None) for block in decoder.layers]
        if any(a is None for a in attns):
            raise AttachError("token pruning needs decoder layers with a self_attn module.")
        if any(id(a) in _OWNERS for a in attns):
            raise AttachError("this model already has a token-pruning hook attached.")
        _register_attention()
        impl = compat.attn_implementation(decoder)
        self._saved = {"impl": impl}
        self._base = self._base_attention(impl)
        for a in attns:
            _OWNERS[id(a)] = self
        self._attns = attns
        decoder.set_attn_implementation(ATTN_NAME)
        # every layer from K on: the model passes each layer the full-length RoPE and positions
        self._handles = [
            block.register_forward_pre_hook(self._pre_layer, with_kwargs=True)
            for block in decoder.layers[self.layer :]
        ]

    def detach(self) -> None:
        if self._saved is None:
            return
        for h in self._handles:
            h.remove()
        for a in self._attns:
            _OWNERS.pop(id(a), None)
        self.decoder.set_attn_implementation(self._saved["impl"])
        self._saved = None
        self.reset()

    def reset(self) -> None:
        self.keep, self.prefill_len, self.scores = None, 0, None

    @staticmethod
    def _base_attention(impl: str) -> Callable:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if impl in (None, "eager") or impl not in ALL_ATTENTION_FUNCTIONS:
            if impl != "eager":
                raise AttachError(
                    f"token pruning runs on eager or sdpa attention, not {impl!r}; load the model "
                    "with attn_implementation='sdpa' or 'eager'."
                )
            return eager_attention
        return ALL_ATTENTION_FUNCTIONS[impl]

    # -- the forward --------------------------------------------------------------------------
    @staticmethod
    def _is_prefill(kwargs: dict[str, Any], layer: int, q_len: int) -> bool:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            return True  # every call without a cache sees the whole sequence
        return cache.get_seq_length(layer) == 0 and q_len > 0

    def _pre_layer(self, module, args: tuple, kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs["hidden_states"]
        first = module is self.decoder.layers[self.layer]
        if first and self._is_prefill(kwargs, self.layer, hidden.shape[1]):
            keep = self.select(self.scores, hidden)
            if keep.dim() != 2 or keep.shape[0] != hidden.shape[0] or keep.dtype != torch.long:
                raise RuntimeError(
                    f"token pruning: select must return a (batch, kept) long tensor, got "
                    f"{tuple(keep.shape)} {keep.dtype}"
                )
            self.keep, self.prefill_len = keep, hidden.shape[1]
            hidden = _gather_positions(hidden, keep, 1)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        elif self.keep is None:
            raise RuntimeError("token pruning: a cached step before any prefill forward")
        elif first and hidden.shape[1] != 1:
            raise RuntimeError(
                "token pruning supports one prefill forward then one token per step; got a "
                f"cached forward of {hidden.shape[1]} tokens"
            )
        # the prefill forward: RoPE and position ids of the kept positions (their original ones)
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None and cos_sin[0].shape[1] == self.prefill_len != hidden.shape[1]:
            kwargs["position_embeddings"] = tuple(
                _gather_positions(t, self.keep, 1) for t in cos_sin
            )
        ids = kwargs.get("position_ids")
        if ids is not None and ids.shape[-1] == self.prefill_len != hidden.shape[1]:
            kwargs["position_ids"] = _gather_positions(ids, self.keep, 1)
        return args, kwargs

    def _key_index(self, kv_len: int) -> torch.Tensor:
        keep = self.keep
        tail = torch.arange(self.prefill_len, kv_len, device=keep.device)
        return torch.cat([keep, tail.expand(keep.shape[0], -1)], dim=1)

    def _attend(self, module, query, key, value, attention_mask, **kwargs):
        idx = module.layer_idx
        if idx == self.layer - 1 and self.score is not None and query.shape[2] > 1:
            out, weights = eager_attention(module, query, key, value, attention_mask, **kwargs)
            self.scores = self.score(weights)
            return out, weights
        if idx >= self.layer and self.keep is not None and attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise RuntimeError(
                    f"token pruning needs a tensor attention mask, got {type(attention_mask).__name__}"
                )
            mask = attention_mask
            if mask.shape[-1] != key.shape[2]:
                mask = _gather_positions(mask, self._key_index(mask.shape[-1]), mask.dim() - 1)
            if mask.shape[-2] != query.shape[2] and mask.shape[-2] == self.prefill_len:
                mask = _gather_positions(mask, self.keep, mask.dim() - 2)
            attention_mask = mask
        return self._base(module, query, key, value, attention_mask, **kwargs)
