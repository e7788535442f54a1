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

Decode steps take their positions from the full-length bookkeeping of
``generate`` (attention mask, ``cache_position``). Layers ``< K`` cache every
position. Layers ``>= K`` share one slot layout: each row's cache holds the
prefill's kept positions plus the decoded tokens admitted so far, and the
pruner keeps a per-row map from cache slot to original position (``-1`` for an
empty slot), through which the attention mask's columns are read.

Decode-time admission (``admit``): at each decode step, ``admit(hidden)`` sees
the input hidden states of layer ``K`` ``(B, 1, D)`` and returns a ``(B,)``
bool. The new token attends to itself and its row's cached context at every
layer either way; a row that admits it keeps its K/V in layers ``>= K`` for
later tokens, a row that does not evicts them after the step:

- no row admits: the slot is removed from layers ``>= K``;
- rows differ: the rows that did not admit mark the slot empty (masked out);
  when the cache's slack (its length minus the largest number of filled slots
  in a row) exceeds ``slack``, every layer ``>= K`` is compacted, each row's
  filled slots packed to the front, so the cache holds at most
  ``max filled + slack`` slots per layer.

`TokenPruner.cache_stats` counts what the cache holds against an unpruned one.
Admission rewrites the ``keys``/``values`` tensors of transformers'
``DynamicCache`` layers ``>= K``; other cache classes (static, sliding-window,
quantized, offloaded) are refused, and so is beam search, whose cache reorder
the per-row map would not follow (greedy and sampling are supported).

Batch > 1: every row keeps the same number of positions at the prefill
(``select`` returns a rectangular index), which is the case for LLaVA-style
models where each image gives the same number of tokens and the text is always
kept. Rows may keep different positions and admit different decoded tokens.

Supported: a ``DynamicCache`` (or no cache), attention masks that are tensors or
None (eager and sdpa). attach/detach restores the model's attention
implementation and removes the hooks; `TokenPruner.reset` clears the
per-call state between calls.
"""

from __future__ import annotations

import weakref
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
        admit: ``admit(hidden) -> (B,)`` bool, called at every decode step with the input
            hidden states of layer ``K`` ``(B, 1, D)``: True admits the new token's K/V to the
            cache of layers ``>= K``, False evicts them after the step (the token still attends
            to itself and its row's cached context). None admits every decoded token.
        slack: the most empty slots per row the cache of layers ``>= K`` may carry beyond
            the fullest row before it is compacted (rows admitting different tokens).
    """

    def __init__(
        self,
        model: Any,
        layer: int,
        select: Callable[[Any, torch.Tensor], torch.Tensor],
        score: Callable[[torch.Tensor], Any] | None = None,
        admit: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        slack: int = 4,
    ):
        self.model = model
        self.decoder = text_decoder(model)
        n = len(self.decoder.layers)
        if not 1 <= layer < n:
            raise AttachError(
                f"token pruning layer must be in [1, {n - 1}] for this model, got {layer}"
            )
        if slack < 0:
            raise AttachError(f"token pruning slack must be >= 0, got {slack}")
        self.layer = layer
        self.select = select
        self.score = score
        self.admit = admit
        self.slack = slack
        self.keep: torch.Tensor | None = None  # (B, Lk) original positions kept at prefill
        self.prefill_len = 0
        self.scores: Any = None
        self._saved: dict[str, Any] | None = None
        self.reset()

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
        # after the decoder's forward: the decode step's admission decision reaches the cache
        self._handles.append(decoder.register_forward_hook(self._post_decoder))

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
        """Forget the current call (kept set, cache map, counts); the next forward is a prefill."""
        self.keep, self.prefill_len, self.scores = None, 0, None
        self._slots: torch.Tensor | None = None  # (B, S) original position of each slot, -1 empty
        self._filled: list[int] = []  # per row: filled slots of layers >= K
        self._holes = False  # some slot of _slots is empty
        self._cache_ref: weakref.ref | None = None
        self._step: dict[str, Any] | None = None  # the decode step in flight
        self._memo: tuple | None = None  # (model's mask, slots, mask read at the slots)
        self._slot_bytes: list[int] | None = None  # per layer: bytes of one cached position
        self._last_keys: torch.Tensor | None = None  # layer K's keys as the last step left them
        self._admitted = 0
        self._decoded = 0

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

    # -- the cache ----------------------------------------------------------------------------
    def _cache(self) -> Any:
        return None if self._cache_ref is None else self._cache_ref()

    def _pruned_layers(self, cache: Any) -> list[Any]:
        """The cache layers ``>= K``, checked to be plain growing ``DynamicCache`` layers."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        n = len(self.decoder.layers)
        if (
            layers is None
            or len(layers) < n
            or getattr(cache, "offloading", False)
            or any(type(lay) is not DynamicLayer for lay in layers[self.layer : n])
        ):
            kinds = sorted({type(lay).__name__ for lay in (layers or [])[self.layer : n]})
            raise RuntimeError(
                f"token pruning with decode-time admission needs transformers' DynamicCache (not "
                f"offloaded, full-attention layers); got {type(cache).__name__} with layers "
                f"{kinds or 'none'}. Let generate create its default cache."
            )
        return list(layers[self.layer : n])

    def cache_stats(self) -> dict[str, Any]:
        """What the cache of the current call holds, counted against an unpruned cache.

        Returns:
            ``kv_slots``: slots allocated in layers ``>= K``, summed over those layers and rows;
            ``kv_attended``: the filled ones among them (kept prefill positions, left padding a
            row keeps included, and admitted decoded tokens); ``kv_slots_full``: the same count
            for an unpruned cache of the same length; ``kv_bytes``: bytes of every layer's K/V
            tensors; ``kv_bytes_full``: what an unpruned cache of the same length would hold;
            ``admitted`` / ``decoded``: decoded tokens admitted / decode steps, summed over rows.
            All zero before a cached prefill.
        """
        stats = {
            "kv_slots": 0,
            "kv_attended": 0,
            "kv_slots_full": 0,
            "kv_bytes": 0,
            "kv_bytes_full": 0,
            "admitted": self._admitted,
            "decoded": self._decoded,
        }
        if self._slots is None or self._slot_bytes is None:
            return stats
        above = len(self.decoder.layers) - self.layer  # layers >= K
        rows, slots = self._slots.shape
        full = self.prefill_len + self._decoded // max(rows, 1)
        stats["kv_slots"] = above * rows * slots
        stats["kv_attended"] = above * sum(self._filled)
        stats["kv_slots_full"] = above * rows * full
        for i, per_slot in enumerate(self._slot_bytes):
            stats["kv_bytes"] += per_slot * (full if i < self.layer else slots)
            stats["kv_bytes_full"] += per_slot * full
        return stats

    def _record_slot_bytes(self) -> None:
        """Bytes of one position of every cache layer (all rows, K and V), for `cache_stats`
        once the cache itself is gone."""
        cache = self._cache()
        layers = getattr(cache, "layers", None)
        n = len(self.decoder.layers)
        if layers is None or len(layers) < n:
            return
        sizes = []
        for lay in layers[:n]:
            tensors = [getattr(lay, "keys", None), getattr(lay, "values", None)]
            if any(t is None or t.dim() != 4 or t.shape[-2] == 0 for t in tensors):
                return
            sizes.append(sum(t.numel() // t.shape[-2] * t.element_size() for t in tensors))
        self._slot_bytes = sizes

    def _admit_step(self, hidden: torch.Tensor, cache: Any) -> None:
        """At layer K of a decode step: the slot map of this step, and the rows that admit."""
        if cache is not self._cache():
            raise RuntimeError(
                "token pruning: a decode step with a different cache than the prefill's; call "
                "reset() between calls and decode with the cache the prefill filled."
            )
        rows = hidden.shape[0]
        admitted = None
        if self.admit is not None:
            layers = self._pruned_layers(cache)
            if self._last_keys is not None and layers[0].keys is not self._last_keys:
                raise RuntimeError(
                    "token pruning: the cache of layers >= K was changed outside the pruner "
                    "(beam search reorders it, assisted decoding crops it); decode-time admission "
                    "supports greedy decoding and sampling."
                )
            decision = self.admit(hidden)
            if (
                not isinstance(decision, torch.Tensor)
                or decision.dtype != torch.bool
                or decision.shape != (rows,)
            ):
                got = (
                    f"{tuple(decision.shape)} {decision.dtype}"
                    if isinstance(decision, torch.Tensor)
                    else type(decision).__name__
                )
                raise RuntimeError(
                    f"token pruning: admit must return a ({rows},) bool tensor, got {got}"
                )
            admitted = decision.tolist()
        # the new token's original position: layer K-1 has cached every position, this one too
        position = cache.get_seq_length(self.layer - 1) - 1
        current = torch.cat(
            [self._slots, self._slots.new_full((rows, 1), position)], dim=1
        )  # (B, S + 1): the step attends to its own slot in every row
        self._step = {"slots": current, "admitted": admitted}

    def _post_decoder(self, module, args, output) -> None:
        step, self._step, self._memo = self._step, None, None
        if self._slot_bytes is None and self._slots is not None:
            self._record_slot_bytes()
        if step is None:
            return
        current, admitted = step["slots"], step["admitted"]
        rows = current.shape[0]
        self._decoded += rows
        if admitted is None or all(admitted):
            self._slots = current
            self._filled = [f + 1 for f in self._filled]
            self._admitted += rows
            if admitted is not None:
                self._last_keys = self._cache().layers[self.layer].keys
            return
        layers = self._pruned_layers(self._cache())
        if not any(admitted):  # evict the new slot everywhere: the cache shrinks back
            for lay in layers:
                lay.keys, lay.values = lay.keys[:, :, :-1], lay.values[:, :, :-1]
        else:  # rows differ: the rows that did not admit leave the slot empty
            evicted = torch.tensor([not a for a in admitted], device=current.device)
            current[:, -1] = current[:, -1].masked_fill(evicted, -1)
            self._slots, self._holes = current, True
            self._filled = [f + int(a) for f, a in zip(self._filled, admitted, strict=True)]
            self._admitted += sum(admitted)
            if self._slots.shape[1] - max(self._filled) > self.slack:
                self._compact(layers)
        self._last_keys = layers[0].keys

    def _compact(self, layers: list[Any]) -> None:
        """Pack each row's filled slots to the front of every layer ``>= K``; drop the rest."""
        width = max(self._filled)
        empty = (self._slots < 0).to(torch.int8)
        order = torch.sort(empty, dim=1, stable=True).indices[:, :width]  # (B, width)
        self._slots = torch.gather(self._slots, 1, order)
        self._holes = min(self._filled) < width
        for lay in layers:
            lay.keys = _gather_positions(lay.keys, order, 2)
            lay.values = _gather_positions(lay.values, order, 2)

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
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            self._step, self._last_keys, self._memo, self._slot_bytes = None, None, None, None
            self._admitted = self._decoded = 0
            if cache is None:
                self._slots, self._filled, self._cache_ref = None, [], None
            else:
                if self.admit is not None and len(getattr(cache, "layers", ())) > self.layer:
                    self._pruned_layers(cache)  # refuse a cache admission cannot rewrite early
                self._slots, self._holes = keep, False
                self._filled = [keep.shape[1]] * keep.shape[0]
                self._cache_ref = weakref.ref(cache)
            hidden = _gather_positions(hidden, keep, 1)
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        elif self.keep is None or (first and self._slots is None):
            raise RuntimeError("token pruning: a cached step before any cached prefill forward")
        elif first and hidden.shape[1] != 1:
            raise RuntimeError(
                "token pruning supports one prefill forward then one token per step; got a "
                f"cached forward of {hidden.shape[1]} tokens"
            )
        elif first:
            self._admit_step(hidden, kwargs.get("cache", kwargs.get("past_key_values")))
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

    def _key_slots(self) -> torch.Tensor:
        """``(B, S)``: the original position of each key of layers >= K at this forward."""
        return self.keep if self._step is None else self._step["slots"]

    def _attend(self, module, query, key, value, attention_mask, **kwargs):
        idx = module.layer_idx
        if idx == self.layer - 1 and self.score is not None and query.shape[2] > 1:
            out, weights = eager_attention(module, query, key, value, attention_mask, **kwargs)
            self.scores = self.score(weights)
            return out, weights
        if idx >= self.layer and self.keep is not None:
            slots = self._key_slots()
            if slots.shape[1] != key.shape[2]:
                raise RuntimeError(
                    f"token pruning: layer {idx} holds {key.shape[2]} keys where the pruner "
                    f"expects {slots.shape[1]}; token pruning needs a cache that grows by the "
                    "keys it is given (transformers' DynamicCache, not a static one) and that only "
                    "the pruner shortens (no beam search or cropping)."
                )
            # the layers of one forward share the mask: read it at the slots once
            memo = self._memo
            if memo is None or memo[0] is not attention_mask or memo[1] is not slots:
                memo = (attention_mask, slots, self._mask(attention_mask, slots, query.shape[2]))
                self._memo = memo
            attention_mask = memo[2]
        return self._base(module, query, key, value, attention_mask, **kwargs)

    def _mask(self, mask: Any, slots: torch.Tensor, q_len: int) -> Any:
        """The model's mask read at ``slots`` (columns) and, at the prefill, the kept rows."""
        holes = self._step is not None and self._holes
        if mask is None:
            if not holes:
                return None  # no padding, no empty slot: the base attention's causal rule
            return (slots >= 0)[:, None, None, :]  # one query: the causal rule is all-true
        if not isinstance(mask, torch.Tensor):
            raise RuntimeError(
                f"token pruning needs a tensor attention mask, got {type(mask).__name__}"
            )
        if mask.shape[-1] != slots.shape[1] or self._step is not None:
            mask = _gather_positions(mask, slots.clamp(min=0), mask.dim() - 1)
            if holes:
                empty = (slots < 0)[:, None, None, :]
                if mask.dtype == torch.bool:
                    mask = mask & ~empty
                else:
                    mask = mask.masked_fill(empty, torch.finfo(mask.dtype).min)
        if mask.shape[-2] != q_len and mask.shape[-2] == self.prefill_len:
            mask = _gather_positions(mask, self.keep, mask.dim() - 2)
        return mask
