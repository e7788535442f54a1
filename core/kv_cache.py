"""K/V held by absolute position: `PositionalKVCache` and its position specs.

Layer ``i`` holds keys ``(B, H, L, D)`` and values ``(B, H, L, Dv)`` whose
sequence index *is* the absolute position, with a per-row ``(B, L)`` validity
mask. One store serves delayed commit (dKV-Cache), crop to a length (the
rejected tail of speculative decoding), row selection (beam search), and
evict/admit that keep original positions (visual-token pruning). A transformers
model reads and writes the same store through
`decodekit.transformers_cache.TransformersKVCache`.

Positions are given in one of three forms everywhere (a *position spec*):

- a 1-D ``LongTensor`` (or list of ints) ``(Q,)``: the same positions in every row;
- a 2-D ``LongTensor`` ``(B, Q)``: per-row positions; ``-1`` entries are padding and
  are ignored, so rows can name different numbers of positions (ragged batches);
- a 2-D ``BoolTensor`` ``(B, P)``: position ``p`` of row ``b`` is named where
  ``mask[b, p]`` is true (``P`` may be shorter or longer than the cache).

A spec is checked and flattened where it is used, which reads values back from
the device. A strategy that stores the same positions in every layer of one
forward checks them once with `PositionalKVCache.prepare` and passes the
returned `PreparedPositions` to `PositionalKVCache.store`: the
per-layer writes then never wait for the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DecodekitError

__all__ = [
    "CacheError",
    "KVView",
    "PositionSpec",
    "PositionalKVCache",
    "PreparedPositions",
]

PositionSpec = torch.Tensor | Sequence[int]
"""A position spec: ``(Q,)`` or ``(B, Q)`` long (``-1`` pads), or a ``(B, P)`` bool mask."""

_NEVER = torch.iinfo(torch.int64).min  # "not decoded" / "never stored" in the step records


class CacheError(DecodekitError, ValueError):
    """A cache was used wrongly (bad shape, position out of range, rows that disagree)."""


@dataclass
class KVView:
    """What attention needs from one layer: keys, values, and which keys are real.

    Attributes:
        keys: ``(B, H, K, D)``.
        values: ``(B, H, K, Dv)``.
        key_mask: ``(B, K)`` bool, true where the key holds valid K/V (attend to it).
        key_positions: ``(B, K)`` long, the absolute position of each key; ``-1`` on
            padding (only in a compact view).
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_mask: torch.Tensor
    key_positions: torch.Tensor


@dataclass(frozen=True)
class PreparedPositions:
    """A position spec checked and flattened once (`PositionalKVCache.prepare`).

    Two forms. Flat (any spec): ``rows``, ``positions``, ``columns``, each ``(N,)``.
    Column (``prepare(..., end=, real=)``): ``index`` and ``real``, each ``(B, Q)``; a
    store then writes every column (the unreal ones write back what their slot holds),
    so its shapes depend on ``(B, Q)`` alone and nothing is read from the device.

    Attributes:
        rows: ``(N,)`` long, the row of each named slot (None in the column form).
        positions: ``(N,)`` long, its absolute position (None in the column form).
        columns: ``(N,)`` long, the column of the keys passed to ``store`` that goes
            there (None in the column form).
        batch_size: ``B`` of the spec.
        width: ``Q``, the number of key columns the spec was prepared for.
        end: one past the highest position named (0 if none).
        stamp: ``()`` long on the cache's device, the step `store` records when
            it is given no ``step`` (``prepare(..., step=)``); None if not given.
            A device tensor, so a compiled forward does not specialise on the step.
    """

    rows: torch.Tensor | None
    positions: torch.Tensor | None
    columns: torch.Tensor | None
    batch_size: int
    width: int
    end: int
    stamp: torch.Tensor | None = None
    index: torch.Tensor | None = None
    real: torch.Tensor | None = None


class _LayerKV:
    """One layer's tensors in a `PositionalKVCache` (internal)."""

    __slots__ = ("keys", "values", "filled", "evicted", "stored_step")

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # (B, H, L, D)
        self.values: torch.Tensor | None = None  # (B, H, L, Dv)
        self.filled: torch.Tensor | None = None  # (B, L) bool: K/V written and not invalidated
        self.evicted: torch.Tensor | None = None  # (B, L) bool: excluded from attention
        self.stored_step: torch.Tensor | None = None  # (B, L) long: step of the last write

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def apply(self, fn) -> None:
        """Apply ``fn(tensor, seq_dim)`` to every tensor of the layer."""
        if self.keys is None:
            return
        self.keys = fn(self.keys, 2)
        self.values = fn(self.values, 2)
        self.filled = fn(self.filled, 1)
        self.evicted = fn(self.evicted, 1)
        self.stored_step = fn(self.stored_step, 1)


def _grow(tensor: torch.Tensor, dim: int, new_length: int, fill: Any) -> torch.Tensor:
    """Pad ``tensor`` along ``dim`` with ``fill`` up to ``new_length``."""
    missing = new_length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    pad = torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=dim)


class PositionalKVCache:
    """Per-layer K/V addressed by absolute position, with per-row validity and step records.

    Layout: layer ``i`` holds keys ``(B, H, L_i, D)`` and values ``(B, H, L_i, Dv)``
    where sequence index ``p`` *is* absolute position ``p``. ``L_i`` (`length`)
    is the number of position slots the layer holds: the highest position ever
    stored plus one, until `crop` shortens it. A slot holds usable K/V for
    row ``b`` only where the key mask (`key_mask`) is true: it was stored,
    not cropped (`crop`), and not evicted. Rows may hold
    different positions (ragged batches, per-row cache sizes).

    Delayed commit (dKV-Cache, arXiv:2505.15781): a token decoded at step ``t`` was
    a mask token during step ``t``'s forward, so the K/V written then are stale.
    With ``commit_delay=d`` the position becomes *reusable* at step ``s`` when

    - it was decoded at some step ``t`` (`mark_decoded`), and
    - its K/V were last stored at a step ``w >= t + d`` (recomputed with its
      identity), and
    - ``s > w`` (the K/V come from an earlier step's forward), and
    - it holds valid K/V in the layer (`key_mask`).

    With the default ``d = 1``: decoded at ``t``, recomputed and stored at
    ``t + 1``, reusable from ``t + 2``. Prompt tokens are known before step 0:
    mark them decoded at step ``-1`` so that K/V stored at step 0 are reusable
    from step 1. Steps are the loop's step indices (ints), never timestep values.

    Args:
        num_layers: number of attention layers.
        commit_delay: steps between decoding a token and storing reusable K/V (>= 0).
        max_length: optional bound; positions ``>= max_length`` are errors.
    """

    def __init__(self, num_layers: int, *, commit_delay: int = 1, max_length: int | None = None):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise CacheError(f"num_layers must be a positive int, got {num_layers!r}.")
        if not isinstance(commit_delay, int) or commit_delay < 0:
            raise CacheError(
                f"commit_delay must be an int >= 0 (steps between decoding a token and reusing "
                f"its K/V; dKV-Cache uses 1), got {commit_delay!r}."
            )
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise CacheError(f"max_length must be a positive int or None, got {max_length!r}.")
        self.num_layers = num_layers
        self.commit_delay = commit_delay
        self.max_length = max_length
        self._layers = [_LayerKV() for _ in range(num_layers)]
        self._batch_size: int | None = None
        self._device: torch.device | None = None
        self._decoded_at: torch.Tensor | None = None  # (B, Ld) long, _NEVER where not decoded
        self._scalars: dict[tuple, torch.Tensor] = {}  # (value, dtype, device) -> 0-dim tensor

    # ----------------------------------------------------------------- introspection

    @property
    def batch_size(self) -> int | None:
        """Number of rows, or None before anything was stored or marked."""
        return self._batch_size

    def length(self, layer: int | None = None) -> int:
        """Position slots held by ``layer`` (highest stored position + 1), or the max over layers."""
        if layer is None:
            return max(lay.length for lay in self._layers)
        return self._layer(layer).length

    def holds_kv(self, layer: int) -> bool:
        """Whether ``layer`` holds K/V tensors yet (it may hold zero slots after a crop)."""
        return self._layer(layer).keys is not None

    def key_mask(self, layer: int) -> torch.Tensor:
        """``(B, L)`` bool: true where ``layer`` holds valid, non-evicted K/V for that row."""
        lay = self._layer(layer)
        if lay.keys is None:
            raise CacheError(f"layer {layer} holds no K/V yet; store some first.")
        return lay.filled & ~lay.evicted

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_layers={self.num_layers}, batch_size={self._batch_size}, "
            f"length={self.length()}, commit_delay={self.commit_delay})"
        )

    # ----------------------------------------------------------------- writing

    def prepare(
        self,
        positions: PositionSpec,
        q_len: int,
        *,
        end: int | None = None,
        step: int | None = None,
        real: torch.Tensor | None = None,
    ) -> PreparedPositions:
        """Check and flatten ``positions`` for keys with ``q_len`` columns, once.

        The result can be passed to `store` for any number of layers; those
        calls then do no checking that reads from the device (on a GPU: no
        synchronisation per layer). The batch size must match the cache's.

        Args:
            positions: a position spec.
            q_len: the number of key columns the positions are for.
            end: for a caller that builds the positions itself: a ``(B, Q)`` long
                tensor whose entries are -1 (padding) or distinct within a row and
                below ``end``. The values are then not checked (their shape is), and
                flattening reads from the device once (which entries are real)
                instead of about six times. Breaking the promise gives undefined
                writes, so leave it None for positions from elsewhere.
            real: with ``end``: a ``(B, Q)`` bool mask of the columns to write; the
                positions must then all lie in ``[0, end)`` and be distinct within a
                row (no -1), and the other columns write back what their slot holds.
                Nothing is read from the device, and `store` runs with fixed shapes
                (what ``torch.compile`` and CUDA graphs need).
            step: the loop step whose forward will store at these positions; `store`
                then records it when called without ``step`` (as a device tensor, so
                a ``torch.compile``\ d forward sees no per-step Python number).
        """
        batch = self._adopt(positions, "prepare")
        stamp = None
        if step is not None:
            stamp = torch.full((), _check_step(step), dtype=torch.long, device=self._device)
        if end is None:
            if real is not None:
                raise CacheError(
                    "prepare(..., real=) needs end= too (one past the highest position): "
                    "the column form is for positions the caller built itself."
                )
            rows, pos, cols = self._triples(positions, batch, q_len)
            end = int(pos.max()) + 1 if pos.numel() else 0
            return PreparedPositions(rows, pos, cols, batch, q_len, end, stamp)
        if not (
            isinstance(positions, torch.Tensor)
            and positions.dim() == 2
            and positions.dtype == torch.long
            and tuple(positions.shape) == (batch, q_len)
        ):
            raise CacheError(
                f"prepare(..., end=) takes a (B, Q) = ({batch}, {q_len}) long tensor; got "
                f"{getattr(positions, 'dtype', type(positions).__name__)} "
                f"{tuple(getattr(positions, 'shape', ()))}. Leave end=None for other specs."
            )
        if not isinstance(end, int) or isinstance(end, bool) or end < 0:
            raise CacheError(
                f"end must be an int >= 0 (one past the highest position), got {end!r}."
            )
        if end:
            self._check_range(end - 1)
        positions = positions.to(self._device) if self._device is not None else positions
        if real is not None:
            if real.dtype != torch.bool or tuple(real.shape) != (batch, q_len):
                raise CacheError(
                    f"prepare(..., real=) takes a (B, Q) = ({batch}, {q_len}) bool mask of the "
                    f"columns to write; got {real.dtype} {tuple(real.shape)}."
                )
            real = real.to(positions.device)
            return PreparedPositions(
                None, None, None, batch, q_len, end, stamp, index=positions, real=real
            )
        rows, cols = (positions >= 0).nonzero(as_tuple=True)
        return PreparedPositions(rows, positions[rows, cols], cols, batch, q_len, end, stamp)

    def store(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: PositionSpec,
        *,
        step: int | None = None,
    ) -> None:
        """Write K/V of ``layer`` at absolute ``positions``; they become valid (and un-evicted).

        Args:
            layer: layer index.
            keys: ``(B, H, Q, D)``. With index positions, ``keys[:, :, q]`` goes to
                ``positions[..., q]``. With a bool mask ``(B, P)``, keys are dense over
                positions ``0..P-1`` (``Q == P``) and only the masked ones are written.
            values: ``(B, H, Q, Dv)``, laid out like ``keys``.
            positions: a position spec (see the module docstring), or
                `PreparedPositions` from `prepare`.
            step: the loop step whose forward computed these K/V; needed for
                `reusable`. None for loops without steps (token autoregression), or
                to record the step given to `prepare`.
        """
        lay = self._layer(layer)
        stamp = None
        if keys.dim() != 4 or values.dim() != 4 or keys.shape[:3] != values.shape[:3]:
            raise CacheError(
                f"keys and values must be (B, H, Q, D) with the same B, H, Q; got keys "
                f"{tuple(keys.shape)} and values {tuple(values.shape)}."
            )
        batch, heads, q_len = keys.shape[:3]
        self._check_batch(batch, "keys")
        if isinstance(positions, PreparedPositions):
            if (positions.batch_size, positions.width) != (batch, q_len):
                raise CacheError(
                    f"these positions were prepared for (B, Q) = ({positions.batch_size}, "
                    f"{positions.width}) but the keys have ({batch}, {q_len})."
                )
            rows, pos, cols, end = (
                positions.rows,
                positions.positions,
                positions.columns,
                positions.end,
            )
            stamp = positions.stamp if step is None else None
            if positions.index is not None:
                self._store_columns(lay, keys, values, positions, stamp, step)
                return
        else:
            rows, pos, cols = self._triples(positions, batch, q_len)
            end = int(pos.max()) + 1 if pos.numel() else 0
        self._ensure_layer(lay, keys, values)
        if lay.keys.shape[1] != heads or lay.keys.shape[3] != keys.shape[3]:
            raise CacheError(
                f"layer {layer} holds keys with H={lay.keys.shape[1]}, D={lay.keys.shape[3]}; "
                f"got H={heads}, D={keys.shape[3]}."
            )
        if end > lay.length:
            lay.apply(lambda t, dim: _grow(t, dim, end, _fill_for(t)))
        # Advanced indices separated by a slice put the indexed dim first: (N, H, D).
        lay.keys[rows, :, pos, :] = keys[rows, :, cols, :].to(lay.keys.dtype)
        lay.values[rows, :, pos, :] = values[rows, :, cols, :].to(lay.values.dtype)
        # Device scalars, not Python numbers: on CUDA a number written through index
        # tensors is copied from the host, and that copy waits for the device.
        lay.filled.index_put_((rows, pos), self._scalar(True, lay.filled))
        lay.evicted.index_put_((rows, pos), self._scalar(False, lay.evicted))
        if stamp is None:
            number = _NEVER if step is None else _check_step(step)
            stamp = self._scalar(number, lay.stored_step)
        lay.stored_step.index_put_((rows, pos), stamp)

    def _store_columns(
        self,
        lay: _LayerKV,
        keys: torch.Tensor,
        values: torch.Tensor,
        prepared: PreparedPositions,
        stamp: torch.Tensor | None,
        step: int | None,
    ) -> None:
        """`store` of the column form: every column written, the unreal ones with their slot's own data."""
        self._ensure_layer(lay, keys, values)
        if prepared.end > lay.length:
            lay.apply(lambda t, dim: _grow(t, dim, prepared.end, _fill_for(t)))
        if stamp is None:
            stamp = self._scalar(_NEVER if step is None else _check_step(step), lay.stored_step)
        index, real = prepared.index, prepared.real  # (B, Q) each
        for name, new in (("keys", keys), ("values", values)):
            held = getattr(lay, name)  # (B, H, L, D)
            where = index[:, None, :, None].expand(-1, held.shape[1], -1, held.shape[3])
            kept = torch.where(real[:, None, :, None], new.to(held.dtype), held.gather(2, where))
            held.scatter_(2, where, kept)
        lay.filled.scatter_(1, index, lay.filled.gather(1, index) | real)
        lay.evicted.scatter_(1, index, lay.evicted.gather(1, index) & ~real)
        steps = lay.stored_step.gather(1, index)
        lay.stored_step.scatter_(1, index, torch.where(real, stamp, steps))

    def append(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor, *, step: int | None = None
    ) -> torch.Tensor:
        """Write K/V ``(B, H, Q, D)`` at the next ``Q`` slots of ``layer``; returns those positions ``(Q,)``."""
        if keys.dim() != 4:
            raise CacheError(f"keys must be (B, H, Q, D), got {tuple(keys.shape)}.")
        start = self._layer(layer).length
        lay = self._layer(layer)
        if lay.keys is not None and keys.shape[0] == lay.keys.shape[0] and step is None:
            # Fast path (every autoregressive step): one concatenation, like DynamicCache.
            self._check_batch(keys.shape[0], "keys")
            if keys.shape[1:2] != lay.keys.shape[1:2] or keys.shape[3] != lay.keys.shape[3]:
                raise CacheError(
                    f"layer {layer} holds keys (B, H, L, D) = {tuple(lay.keys.shape)}; "
                    f"got {tuple(keys.shape)}."
                )
            q_len = keys.shape[2]
            self._check_range(start + q_len - 1)
            lay.keys = torch.cat([lay.keys, keys.to(lay.keys.dtype)], dim=2)  # (B, H, L+Q, D)
            lay.values = torch.cat([lay.values, values.to(lay.values.dtype)], dim=2)
            ones = lay.filled.new_ones(lay.filled.shape[0], q_len)
            lay.filled = torch.cat([lay.filled, ones], dim=1)  # (B, L+Q)
            lay.evicted = torch.cat([lay.evicted, ~ones], dim=1)
            never = lay.stored_step.new_full((lay.stored_step.shape[0], q_len), _NEVER)
            lay.stored_step = torch.cat([lay.stored_step, never], dim=1)
            return torch.arange(start, start + q_len, device=keys.device)
        positions = torch.arange(start, start + keys.shape[2], device=keys.device)
        self.store(layer, keys, values, positions, step=step)
        return positions

    # ----------------------------------------------------------------- reading

    def gather(self, layer: int, *, compact: bool = False) -> KVView:
        """K/V of ``layer`` for attention, with the key mask.

        Args:
            layer: layer index.
            compact: False returns every slot ``(B, H, L, D)`` (position ``p`` at index
                ``p``; invalid slots have ``key_mask`` false). True packs each row's
                valid keys to the left in position order, ``(B, H, K, D)`` with ``K``
                the largest valid count over rows; shorter rows are padded
                (``key_mask`` false, ``key_positions`` -1). Compact views cut
                attention cost after eviction.
        """
        lay = self._layer(layer)
        if lay.keys is None:
            raise CacheError(f"layer {layer} holds no K/V yet; store some first.")
        valid = lay.filled & ~lay.evicted  # (B, L)
        batch, length = valid.shape
        if not compact:
            positions = torch.arange(length, device=valid.device).expand(batch, length)
            return KVView(lay.keys, lay.values, valid, positions.clone())  # valid is new
        counts = valid.sum(dim=1)  # (B,)
        kept = int(counts.max()) if batch else 0
        # Stable sort on "is invalid" puts each row's valid slots first, in ascending position.
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :kept]  # (B, K)
        key_mask = torch.arange(kept, device=valid.device)[None, :] < counts[:, None]  # (B, K)
        key_positions = torch.where(key_mask, order, torch.full_like(order, -1))
        index = order[:, None, :, None]  # (B, 1, K, 1)
        keys = lay.keys.gather(2, index.expand(-1, lay.keys.shape[1], -1, lay.keys.shape[3]))
        values = lay.values.gather(
            2, index.expand(-1, lay.values.shape[1], -1, lay.values.shape[3])
        )
        return KVView(keys, values, key_mask, key_positions)  # keys (B, H, K, D)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys ``(B, H, L, D)`` and values of ``layer``, every slot, as stored (no copy).

        For a caller that already knows which slots are valid (e.g. it stored the same
        positions in every layer and took `key_mask` once); otherwise use `gather`.
        """
        lay = self._layer(layer)
        if lay.keys is None:
            raise CacheError(f"layer {layer} holds no K/V yet; store some first.")
        return lay.keys, lay.values

    # ----------------------------------------------------------------- delayed commit

    def mark_decoded(self, positions: PositionSpec, step: int) -> None:
        """Record that ``positions`` got their final token at the end of loop step ``step``.

        Use ``step=-1`` for prompt tokens (known before step 0). Marking again
        overwrites the step. Positions may lie beyond what is stored yet.
        """
        step = _check_step(step)
        batch = self._adopt(positions, "mark_decoded")
        if (
            isinstance(positions, torch.Tensor)
            and positions.dtype == torch.bool
            and positions.dim() == 2
            and positions.shape[0] == batch
            and (self.max_length is None or positions.shape[1] <= self.max_length)
        ):  # a mask: one dense update, nothing read back from the device
            width = positions.shape[1]
            decoded = self._decoded(width)
            mask = positions.to(decoded.device)
            decoded[:, :width] = torch.where(mask, self._scalar(step, decoded), decoded[:, :width])
            return
        rows, pos, _ = self._triples(positions, batch, None)
        decoded = self._decoded(max(int(pos.max()) + 1 if pos.numel() else 0, 0))
        decoded.index_put_((rows, pos), self._scalar(step, decoded))

    def reusable(self, step: int, layer: int | None = None) -> torch.Tensor:
        """``(B, L)`` bool: positions whose cached K/V may be reused in step ``step``'s forward.

        See the class docstring for the rule. With ``layer=None`` a position must
        be reusable in every layer; ``L`` is then ``length()``.
        """
        step = _check_step(step)
        layers = range(self.num_layers) if layer is None else [layer]
        length = self.length() if layer is None else self.length(layer)
        if self._batch_size is None:
            raise CacheError("nothing is stored yet; store K/V before asking what is reusable.")
        decoded_at = self._decoded(length)[:, :length]  # (B, L)
        result = decoded_at != _NEVER
        for index in layers:
            lay = self._layer(index)
            if lay.keys is None:
                return torch.zeros_like(result)
            full = lambda t, dim: _grow(t, dim, length, _fill_for(t))  # noqa: E731
            valid = full(lay.filled & ~lay.evicted, 1)
            stored = full(lay.stored_step, 1)
            fresh = (
                (stored != _NEVER) & (stored >= decoded_at + self.commit_delay) & (stored < step)
            )
            result &= valid & fresh
        return result

    # ----------------------------------------------------------------- crop / rows / evict

    def crop(self, length: int | torch.Tensor) -> None:
        """Roll back to ``length`` positions: drop every position ``>= length`` (K/V and records).

        Args:
            length: an int for every row, or a ``(B,)`` long tensor of per-row lengths
                (speculative decoding accepts different counts per row). Slots beyond
                the largest length are freed; per row, positions beyond its own
                length become invalid and undecoded. Larger than the current
                length is a no-op for that row.
        """
        if isinstance(length, torch.Tensor):
            if length.dim() != 1 or length.dtype in (torch.bool,) or length.is_floating_point():
                raise CacheError(
                    f"per-row crop lengths must be a (B,) integer tensor, got {length.dtype} "
                    f"{tuple(length.shape)}."
                )
            if self._batch_size is not None and length.shape[0] != self._batch_size:
                raise CacheError(
                    f"crop got {length.shape[0]} row lengths but the cache has {self._batch_size} rows."
                )
            if (length < 0).any():
                raise CacheError(f"crop lengths must be >= 0, got {length.tolist()}.")
            keep_upto = int(length.max()) if length.numel() else 0
            per_row = length
        else:
            if not isinstance(length, int) or isinstance(length, bool) or length < 0:
                raise CacheError(f"crop length must be an int >= 0, got {length!r}.")
            keep_upto, per_row = length, None

        def cut(t: torch.Tensor, dim: int) -> torch.Tensor:
            return t if t.shape[dim] <= keep_upto else t.narrow(dim, 0, keep_upto).clone()

        for lay in self._layers:
            lay.apply(cut)  # keys (B, H, min(L, keep_upto), D)
            if per_row is not None and lay.keys is not None:
                beyond = self._beyond(per_row, lay.length, lay.filled.device)  # (B, L)
                lay.filled &= ~beyond
                lay.evicted &= ~beyond
                lay.stored_step.masked_fill_(beyond, _NEVER)
        if self._decoded_at is not None:
            self._decoded_at = cut(self._decoded_at, 1)
            if per_row is not None:
                beyond = self._beyond(per_row, self._decoded_at.shape[1], self._decoded_at.device)
                self._decoded_at.masked_fill_(beyond, _NEVER)

    def select_rows(self, index: torch.Tensor | Sequence[int]) -> None:
        """Keep rows ``index`` in that order: reorder (beams), repeat, or drop rows.

        ``index`` is a 1-D long tensor of row indices into the current batch; the
        new batch size is ``len(index)``. ``[2, 0, 0]`` gives new row 0 = old row 2,
        rows 1 and 2 = old row 0.
        """
        if self._batch_size is None:
            raise CacheError("select_rows on an empty cache: store something first.")
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype in (torch.bool,) or index.is_floating_point():
            raise CacheError(
                f"select_rows needs a 1-D integer tensor of row indices, got {index.dtype} "
                f"{tuple(index.shape)}."
            )
        if index.numel() and (index.min() < 0 or index.max() >= self._batch_size):
            raise CacheError(
                f"row indices must lie in [0, {self._batch_size}), got {index.tolist()}."
            )
        for lay in self._layers:
            if lay.keys is not None:
                lay.apply(lambda t, _dim: t.index_select(0, index.to(t.device)))  # (B', ...)
        if self._decoded_at is not None:
            self._decoded_at = self._decoded_at.index_select(0, index.to(self._decoded_at.device))
        self._batch_size = int(index.numel())

    def evict(self, positions: PositionSpec, layer: int | None = None) -> None:
        """Exclude ``positions`` from attention (of ``layer``, or every layer); slots stay.

        Absolute positions never shift: the remaining keys keep the positions (and
        the rotary phases) they were stored with. Evicting a position that holds no
        K/V is an error. Memory is not reclaimed; `gather` with
        ``compact=True`` skips evicted keys.
        """
        for index, lay in self._indexed_layers(layer):
            rows, pos = self._existing(index, lay, positions, "evict")
            lay.evicted.index_put_((rows, pos), self._scalar(True, lay.evicted))

    def admit(self, positions: PositionSpec, layer: int | None = None) -> None:
        """Undo `evict`: ``positions`` take part in attention again with their stored K/V.

        Only positions that still hold K/V can be admitted (not ones dropped by
        `crop`); to add new positions use `store`.
        """
        for index, lay in self._indexed_layers(layer):
            rows, pos = self._existing(index, lay, positions, "admit")
            lay.evicted.index_put_((rows, pos), self._scalar(False, lay.evicted))

    def clear(self) -> None:
        """Forget everything: K/V, records and the batch size."""
        self._layers = [_LayerKV() for _ in range(self.num_layers)]
        self._batch_size = None
        self._device = None
        self._decoded_at = None

    # ----------------------------------------------------------------- internals

    def _scalar(self, value: bool | int, like: torch.Tensor) -> torch.Tensor:
        """``value`` as a 0-dim tensor on ``like``'s device and dtype (made there, not copied)."""
        key = (value, like.dtype, like.device)
        tensor = self._scalars.get(key)
        if tensor is None:
            if len(self._scalars) >= 64:  # step stamps change every step
                self._scalars.clear()
            tensor = self._scalars[key] = torch.full(
                (), value, dtype=like.dtype, device=like.device
            )
        return tensor

    def _layer(self, layer: int) -> _LayerKV:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise CacheError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}.")
        return self._layers[layer]

    def _indexed_layers(self, layer: int | None) -> list[tuple[int, _LayerKV]]:
        if layer is None:
            return list(enumerate(self._layers))
        return [(layer, self._layer(layer))]

    def _check_batch(self, batch: int, what: str) -> None:
        if self._batch_size is None:
            self._batch_size = batch
        elif batch != self._batch_size:
            raise CacheError(
                f"{what} have {batch} rows but the cache holds {self._batch_size}; use "
                f"select_rows() to change the batch, or clear() to start over."
            )

    def _adopt(self, positions: PositionSpec, verb: str) -> int:
        """The batch size of ``positions`` (taken from them while the cache is empty); the
        cache takes their device if it has none yet, so its records live where the K/V will."""
        batch = self._batch_size
        if batch is None:
            if not (isinstance(positions, torch.Tensor) and positions.dim() == 2):
                raise CacheError(
                    f"{verb} before anything is stored needs per-row positions (B, Q) or a "
                    "(B, P) bool mask, so that the batch size is known."
                )
            batch = positions.shape[0]
            self._check_batch(batch, "positions")
        if self._device is None and isinstance(positions, torch.Tensor):
            self._device = positions.device
        return batch

    def _check_range(self, highest: int) -> None:
        if self.max_length is not None and highest >= self.max_length:
            raise CacheError(
                f"position {highest} is out of range: this cache holds positions "
                f"[0, {self.max_length}) (max_length)."
            )

    def _ensure_layer(self, lay: _LayerKV, keys: torch.Tensor, values: torch.Tensor) -> None:
        if lay.keys is not None:
            return
        batch, heads, _, head_dim = keys.shape
        device = keys.device
        lay.keys = keys.new_zeros(batch, heads, 0, head_dim)  # (B, H, 0, D)
        lay.values = values.new_zeros(batch, values.shape[1], 0, values.shape[3])
        lay.filled = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # (B, 0)
        lay.evicted = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        lay.stored_step = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self._device = device
        if self._decoded_at is not None:  # marked before the first store, perhaps elsewhere
            self._decoded_at = self._decoded_at.to(device)

    def _decoded(self, length: int) -> torch.Tensor:
        """The decoded-step record, grown to at least ``length`` slots."""
        if self._decoded_at is None:
            device = self._device or torch.device("cpu")
            self._decoded_at = torch.full(
                (self._batch_size, 0), _NEVER, dtype=torch.long, device=device
            )
        self._decoded_at = _grow(self._decoded_at, 1, length, _NEVER)
        return self._decoded_at

    @staticmethod
    def _beyond(lengths: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(width, device=device)[None, :]  # (1, L)
        return positions >= lengths.to(device)[:, None]  # (B, L)

    def _existing(
        self, index: int, lay: _LayerKV, positions: PositionSpec, verb: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if lay.keys is None:
            raise CacheError(f"cannot {verb} in layer {index}: it holds no K/V yet.")
        rows, pos, _ = self._triples(positions, lay.keys.shape[0], None)
        if pos.numel() and int(pos.max()) >= lay.length:
            raise CacheError(
                f"cannot {verb} position {int(pos.max())}: layer {index} holds positions "
                f"[0, {lay.length})."
            )
        missing = ~lay.filled[rows, pos]
        if missing.any():
            row, p = int(rows[missing][0]), int(pos[missing][0])
            raise CacheError(
                f"cannot {verb} position {p} of row {row} in layer {index}: it holds no K/V "
                f"(never stored, or cropped); store() it instead."
            )
        return rows, pos

    def _triples(
        self, positions: PositionSpec, batch: int, q_len: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flatten a position spec to ``(rows, positions, source columns)``, each ``(N,)``."""
        device = self._device
        if not isinstance(positions, torch.Tensor):
            positions = torch.as_tensor(list(positions), dtype=torch.long)
        if device is not None:
            positions = positions.to(device)
        if positions.dtype == torch.bool:
            if positions.dim() != 2 or positions.shape[0] != batch:
                raise CacheError(
                    f"a position mask must be (B, P) bool with B={batch}, got "
                    f"{tuple(positions.shape)}."
                )
            if q_len is not None and positions.shape[1] != q_len:
                raise CacheError(
                    f"with a (B, P) position mask, keys must be dense over positions 0..P-1: "
                    f"P={positions.shape[1]} but keys have Q={q_len}."
                )
            rows, pos = positions.nonzero(as_tuple=True)
            if pos.numel():
                self._check_range(int(pos.max()))
            return rows, pos, pos
        if positions.is_floating_point() or positions.is_complex():
            raise CacheError(
                f"positions must be integer indices or a bool mask, got dtype {positions.dtype}."
            )
        positions = positions.long()
        if positions.dim() == 1:
            if (positions < 0).any():
                raise CacheError(
                    f"positions must be >= 0, got {positions.tolist()} (use a (B, Q) tensor with "
                    f"-1 padding for ragged rows)."
                )
            positions = positions[None, :].expand(batch, -1)  # (B, Q)
        elif positions.dim() != 2 or positions.shape[0] != batch:
            raise CacheError(
                f"positions must be (Q,) or (B, Q) with B={batch}, got {tuple(positions.shape)}."
            )
        if q_len is not None and positions.shape[1] != q_len:
            raise CacheError(
                f"positions name {positions.shape[1]} slots per row but keys have Q={q_len}."
            )
        if (positions < -1).any():
            raise CacheError(
                f"positions must be >= 0 (or -1 for padding in a (B, Q) tensor), got "
                f"{int(positions.min())}."
            )
        real = positions >= 0  # (B, Q)
        if real.any():
            self._check_range(int(positions.max()))
            ordered = positions.sort(dim=1).values
            repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
            if repeated.any():
                row = int(repeated.any(dim=1).nonzero()[0])
                raise CacheError(f"row {row} names a position twice: {positions[row].tolist()}.")
        rows, cols = real.nonzero(as_tuple=True)
        return rows, positions[rows, cols], cols


def _fill_for(tensor: torch.Tensor) -> Any:
    if tensor.dtype == torch.bool:
        return False
    if tensor.dtype == torch.long:
        return _NEVER
    return 0


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        raise CacheError(
            f"step must be the loop's step index as an int, got {type(step).__name__} {step!r}; "
            f"pass the index i of `for i, t in enumerate(timesteps)`, not the timestep t."
        )
    return step
