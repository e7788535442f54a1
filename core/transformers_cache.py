"""A transformers ``Cache`` over a `PositionalKVCache`.

`TransformersKVCache` is passed to a transformers model (``generate`` or
a forward) as its cache; its layers read and write a
`PositionalKVCache`, so the model and decodekit's own
crop, row selection and evict/admit act on the same tensors between forwards.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .kv_cache import CacheError, PositionalKVCache

__all__ = ["TransformersKVCache"]


class _PositionalLayer(CacheLayerMixin):
    """A transformers cache layer whose tensors live in a `PositionalKVCache` (internal)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, store: PositionalKVCache, layer_idx: int):
        # CacheLayerMixin.__init__ would assign keys/values, which are views of the store here.
        self.store = store
        self.layer_idx = layer_idx

    @property
    def is_initialized(self) -> bool:  # type: ignore[override]
        return self.store.holds_kv(self.layer_idx)

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.store.kv(self.layer_idx)[0] if self.is_initialized else None  # (B, H, L, D)

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.store.kv(self.layer_idx)[1] if self.is_initialized else None  # (B, H, L, Dv)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the store allocates on the first write."""

    def kept_slots(self) -> torch.Tensor | None:
        """``(K,)`` slot indices attention sees, or None when it sees every slot."""
        if not self.is_initialized:
            return None
        valid = self.store.key_mask(self.layer_idx)  # (B, L)
        if bool(valid.all()):
            return None
        if not bool((valid == valid[:1]).all()):
            raise CacheError(
                f"layer {self.layer_idx}: rows hold different positions, which a transformers "
                f"model cannot mask through its 2-D attention_mask; evict the same positions in "
                f"every row, or use PositionalKVCache.gather(compact=True) in your own attention."
            )
        return valid[0].nonzero().squeeze(1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H, Q, D)`` at the next slots; return the K/V attention should see."""
        self.store.append(self.layer_idx, key_states, value_states)
        kept = self.kept_slots()  # (K,) or None
        keys, values = self.store.kv(self.layer_idx)  # (B, H, L, D)
        if kept is None:
            return keys, values
        if self.layer_idx > 0 and self.store.holds_kv(0):
            reference_kept = int(self.store.key_mask(0)[0].sum())
            if reference_kept != kept.numel():
                raise CacheError(
                    f"layer {self.layer_idx} keeps {kept.numel()} positions but layer 0 keeps "
                    f"{reference_kept}; transformers builds one mask for all layers, so evict "
                    f"the same positions in every layer (evict(..., layer=None))."
                )
        # Packed: evicted slots vanish from attention, the rest keep their order.
        return keys.index_select(2, kept), values.index_select(2, kept)  # (B, H, K, D)

    def attended_length(self) -> int:
        """Number of slots attention sees in this layer."""
        kept = self.kept_slots()
        return self.store.length(self.layer_idx) if kept is None else int(kept.numel())

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the mask of a forward over ``query_length`` new tokens."""
        return self.attended_length() + query_length, 0

    def get_seq_length(self) -> int:
        """Slots held (tokens processed), evicted ones included: positions continue from here."""
        return self.store.length(self.layer_idx)

    def get_max_length(self) -> int:
        """The store's ``max_length``, or -1 for unbounded."""
        return -1 if self.store.max_length is None else self.store.max_length

    def reset(self) -> None:
        """Refuse: a layer cannot be reset alone; call ``reset()`` on the cache."""
        raise CacheError("reset a TransformersKVCache as a whole (cache.reset()), not one layer.")

    def _whole_cache_only(self, *args, **kwargs) -> None:
        raise CacheError(
            "crop/reorder/select act on every layer of the shared store at once; call them on "
            "the TransformersKVCache, not on one of its layers."
        )

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _whole_cache_only


class TransformersKVCache(Cache):
    """A transformers ``Cache`` backed by a `PositionalKVCache`; pass it as the model's cache.

    Slot ``p`` of the store holds the K/V of the ``p``-th token the model has
    processed (left padding included), exactly where ``DynamicCache`` would put
    it, so greedy/beam generation matches ``DynamicCache``. ``crop``,
    ``reorder_cache``, ``batch_repeat_interleave`` and ``batch_select_indices``
    act on the store, and decodekit code may call the store directly
    (``cache.store.crop``, ``select_rows``, ``evict``) between forwards.

    Eviction: positions evicted in the store vanish from attention (the layer
    returns only kept slots, and reports the packed length to the mask builder),
    while ``get_seq_length`` still counts every slot, so new tokens get their
    original position ids. transformers builds one mask for all layers and rows
    from its 2-D ``attention_mask``, read against the packed slots: every row
    and layer must keep the same slots, and with left padding no evicted slot
    may lie before the end of any row's padding.

    Pass it as ``cache=`` (transformers 5.x; ``past_key_values=`` is the
    deprecated name) to a forward or to ``generate``.

    Args:
        store: the store to use; a new one when None.
        config: a model config, to size a new store (``num_hidden_layers`` of its text config).
        num_layers: size of a new store, when no ``config`` is given.
    """

    def __init__(
        self,
        store: PositionalKVCache | None = None,
        *,
        config: Any = None,
        num_layers: int | None = None,
    ):
        if store is None:
            if config is not None:
                text_config = config.get_text_config(decoder=True)
                layer_types = getattr(text_config, "layer_types", None)
                if layer_types and any(t != "full_attention" for t in layer_types):
                    raise CacheError(
                        f"TransformersKVCache supports full-attention layers only; this model has "
                        f"{sorted(set(layer_types))}. Use transformers' DynamicCache for it."
                    )
                num_layers = text_config.num_hidden_layers
            if num_layers is None:
                raise CacheError("TransformersKVCache needs a store, a model config or num_layers.")
            store = PositionalKVCache(num_layers)
        self.store = store
        layers = [_PositionalLayer(store, i) for i in range(store.num_layers)]
        super().__init__(layers=layers)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new K/V ``(B, H, Q, D)`` of ``layer_idx``; return the K/V to attend to."""
        if layer_idx >= len(self.layers):
            raise CacheError(
                f"the model wrote layer {layer_idx} but this cache has {len(self.layers)} layers; "
                f"build it with config=model.config."
            )
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        """Index of the first new query among the attended keys (packed after eviction)."""
        return self.layers[layer_idx].attended_length() if layer_idx < len(self.layers) else 0

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' crop: ``n <= 0`` removes ``-n`` tokens; ``n > 0`` (legacy) keeps ``n``."""
        current = self.store.length()
        target = current + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        self.store.crop(max(target, 0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder rows for beam search (``select_rows``)."""
        if self.store.batch_size is not None:
            self.store.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place (row ``b`` becomes rows ``b*r .. b*r+r-1``)."""
        if self.store.batch_size is not None:
            self.store.select_rows(torch.arange(self.store.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only rows ``indices``."""
        if self.store.batch_size is not None:
            self.store.select_rows(indices)

    def reset(self) -> None:
        """Empty the store (same layers, same store object)."""
        self.store.clear()
