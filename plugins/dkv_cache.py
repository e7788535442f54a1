"""dKV-Cache, from "dKV-Cache: The Cache for Diffusion Language Models" (arXiv:2505.15781).

A masked diffusion LM recomputes every position at every step. dKV-Cache keeps
each position's keys and values and recomputes only some positions per step:

- ``decode``: a token decoded at step ``t`` is recomputed once at ``t + 1``
  (with its real identity instead of the mask) and its K/V are reused from
  ``t + 2`` on — the one-step delay the paper shows is essential
  (``commit_delay=0`` reproduces the ablation). Every ``refresh_interval``
  steps of a block (and at each block's first step; its first two with
  ``block_refresh_steps=2``, as the reference code does) all positions are recomputed.
- ``greedy``: recompute only the positions whose logits the step reads (the
  current block's masked tokens), the tokens decoded at the previous step and
  masked neighbours within ``window`` of them; everything else comes from the
  cache, stale or not.
- ``prefill``: the prompt's K/V are computed once; the generated region is
  recomputed every step.
- ``pd``: the prompt is cached once for good, and ``decode`` runs on the
  generated tokens (refreshes recompute only those).

How it attaches: a function is registered in transformers' ``AttentionInterface``
under ``ATTN_NAME`` and the model switched to it with
``model.set_attn_implementation`` (detach switches it back to the implementation
it had; the name stays registered, as transformers cannot unregister one, and
refuses to run outside an attached run). The model is then fed
only the positions to recompute, with their own position ids; per layer the
function receives their queries, keys and values after RoPE, stores the K/V in a
`decodekit.kv_cache.PositionalKVCache` at their absolute positions, and
attends over every position of the sequence (fresh K/V where recomputed, cached
elsewhere). Each row feeds the positions whose logits the pipeline reads
(``logits_window``) first, so the LM head runs on those alone
(``logits_to_keep``), and their logits are scattered back to their columns.
Positions are checked once per forward, so the per-layer stores never read back
from the device, and they write with shapes fixed by (batch, query width): the
model call (`_call_model`) compiles with ``torch.compile(fullgraph=True)`` as one
graph (``pipeline.compile``; docs: dkv-cache, Compiling). Rows may recompute
different numbers of positions (ragged batches); GQA models cache K/V heads only.

Supported models: transformers' Llama, Mistral, Qwen2 and Qwen3 families with
bidirectional attention (``config.is_causal = False``) and no sliding window —
their attention applies RoPE and then dispatches through ``AttentionInterface``
with the same arguments. Others are refused by name. LLaDA checkpoints, whose own
modeling code cannot be hooked, convert to a Llama once (``decodekit convert-llada``,
``decodekit.pipelines.convert_llada``). Classifier-free guidance
works (the unconditional copy is cached as extra rows); Dream's shifted logits
work (the pipeline asks for the logits one position to the left).

Measured results (speed-up, NFE, tokens computed, accuracy): docs/benchmarks.md
(section dkv-cache), from ``benchmarks/dkv_cache.py``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from decodekit import compat
from decodekit.errors import AttachError
from decodekit.hookspecs import hookimpl
from decodekit.kv_cache import PositionalKVCache, PreparedPositions
from decodekit.strategy import Params, Strategy
from pydantic import Field

ATTN_NAME = "decodekit_dkv_cache"
"""The name our attention function is registered under in transformers' AttentionInterface."""

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# id(attention module) -> the DKVCache strategy that owns it while attached.
_OWNERS: dict[int, DKVCache] = {}


def _dkv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: serve one layer from the owner's cache."""
    owner = _OWNERS.get(id(module))
    if owner is None or owner._ctx is None:
        raise RuntimeError(
            f"this model's attention is driven by decodekit's {ATTN_NAME} cache (dkv-cache or "
            "block-cache) while it is attached; "
            "call the model through its pipeline, or detach the strategy (leave the `with` "
            "block) to call it directly."
        )
    return owner._attend(module, query, key, value, scaling)


def _register_attention() -> None:
    """Register `_dkv_attention` under `ATTN_NAME` (idempotent).

    transformers offers no public way to unregister a global name (``register`` writes
    the class-wide mapping; ``del`` on an instance removes only its local overrides),
    so the name stays registered after detach. That is harmless: it is unique to
    decodekit, no model uses it once detached (detach puts each model's own
    implementation back), and the function refuses to run outside an attached run.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _dkv_attention)


class DKVCacheParams(Params):
    """Parameters of `dkv-cache`."""

    variant: Literal["decode", "greedy", "prefill", "pd"] = Field(
        "decode",
        description="decode: delayed caching of decoded tokens with periodic refresh; greedy: "
        "recompute only the current block's masked tokens, the just-decoded ones and a window; "
        "prefill: cache the prompt once; pd: prompt once plus decode on generated tokens.",
    )
    refresh_interval: int = Field(
        4,
        ge=1,
        description="Recompute every position at each block step that is a multiple of this "
        "(block step 0 included); 1 refreshes every step, which equals no cache "
        "(paper's cache_reloading_step: 4 or 8). Not used by prefill.",
    )
    block_refresh_steps: int = Field(
        1,
        ge=1,
        description="Recompute every position at each block's first this-many steps too "
        "(besides the multiples of refresh_interval). 1: block step 0 only; 2: steps 0 and 1, "
        "the reference code's schedule (its bookkeeping has no two-steps-old state at step 1). "
        "Not used by prefill.",
    )
    window: int = Field(
        2,
        ge=0,
        le=64,
        description="greedy: masked positions within this distance of a just-decoded token are "
        "recomputed too (the paper uses up to 6).",
    )
    query_bucket: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Round the number of positions fed per step up to a multiple of this "
        "(capped at the sequence length; the extra columns are computed and dropped), so the "
        "GPU sees few distinct shapes: each new query width costs attention and matmul plan "
        "selection on CUDA. None: 16 on CUDA, 1 (exact widths) elsewhere.",
    )
    commit_delay: int = Field(
        1,
        ge=0,
        description="Steps between decoding a token and reusing its K/V (paper: 1; 0 reuses the "
        "K/V computed while the position was still a mask, the ablation that collapses).",
    )


class _Forward:
    """What the attention function needs during one partial forward."""

    __slots__ = ("slots", "key_ok", "length", "attend_mask")

    def __init__(self, slots: PreparedPositions, key_ok: torch.Tensor, length: int):
        self.slots = slots  # where each fed column's K/V go (and the step), checked once
        self.key_ok = key_ok  # (B, L) bool, real (non-padding) positions
        self.length = length
        # (B, 1, 1, L) bool, the keys to attend to: taken at the first layer; every layer
        # stores the same positions, so it is the same for all of them.
        self.attend_mask: torch.Tensor | None = None


class DKVCache(Strategy):
    """Cache keys and values of masked-diffusion LMs with delayed commit (dKV-Cache)."""

    name = "dkv-cache"
    loops = ("masked-diffusion",)
    Params = DKVCacheParams
    slot = "kv-cache"
    paper = "dKV-Cache: The Cache for Diffusion Language Models, arXiv:2505.15781"

    def __init__(self, params=None, *, path: str = "params", **kwargs):
        super().__init__(params, path=path, **kwargs)
        self._ctx: _Forward | None = None
        self._saved_impl: str | None = None  # the model's attention implementation before attach
        self._modules: list[torch.nn.Module] = []
        self.model = None
        self.reset(None)

    # ------------------------------------------------------------------ attach / detach
    def on_attach(self, run) -> None:
        model = run.adapter.model
        if not isinstance(model, torch.nn.Module):
            raise AttachError(f"{self.name} needs the pipeline's model (adapter.model) to hook.")
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type == "llada":
            raise AttachError(
                f"{self.name} cannot hook LLaDA's own modeling code ({type(model).__name__}, "
                "trust_remote_code). Its block is a Llama block: convert the checkpoint once "
                "with `decodekit convert-llada SRC DST` and load DST with "
                "AutoModelForCausalLM.from_pretrained(DST)."
            )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise AttachError(
                f"{self.name} hooks the attention of {', '.join(SUPPORTED_MODEL_TYPES)} models "
                f"(transformers); {type(model).__name__} (model_type={model_type!r}) is not "
                f"supported. Use one of those families, or run without {self.name}."
            )
        if getattr(config, "is_causal", True):
            raise AttachError(
                f"{self.name} needs a bidirectional model, but {type(model).__name__} has "
                "config.is_causal=True (causal attention); masked diffusion LMs set "
                "config.is_causal = False."
            )
        if getattr(config, "use_sliding_window", False) or (
            model_type == "mistral" and getattr(config, "sliding_window", None)
        ):
            raise AttachError(
                f"{self.name} does not support sliding-window attention; set sliding_window=None."
            )
        modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
        if not modules:
            raise AttachError(
                f"found no attention modules with a layer_idx in {type(model).__name__}."
            )
        for m in modules:
            if id(m) in _OWNERS:
                raise AttachError(
                    f"this model's attention is already hooked by another "
                    f"{_OWNERS[id(m)].name} run."
                )
        if not hasattr(model, "set_attn_implementation"):
            raise AttachError(
                f"{self.name} switches the attention of a transformers PreTrainedModel; "
                f"{type(model).__name__} has no set_attn_implementation."
            )
        _register_attention()
        self._saved_impl = compat.attn_implementation(model)
        model.set_attn_implementation(ATTN_NAME)
        unswitched = [m for m in modules if compat.attn_implementation(m) != ATTN_NAME]
        if unswitched:
            model.set_attn_implementation(self._saved_impl)
            raise AttachError(
                f"{type(model).__name__} did not switch its attention implementation "
                f"({type(unswitched[0]).__name__} still uses "
                f"{compat.attn_implementation(unswitched[0])!r}); {self.name} cannot hook it."
            )
        for m in modules:
            _OWNERS[id(m)] = self
        self._modules = modules
        self.model = model
        self.num_layers = 1 + max(int(m.layer_idx) for m in modules)

    def on_detach(self, run) -> None:
        for m in self._modules:
            if _OWNERS.get(id(m)) is self:
                del _OWNERS[id(m)]
        if self.model is not None and self._saved_impl is not None:
            self.model.set_attn_implementation(self._saved_impl)
        self._saved_impl = None
        self._modules = []
        self.model = None
        self.cache = None

    def reset(self, run) -> None:
        self.cache: PositionalKVCache | None = None
        self._prev_x: torch.Tensor | None = None
        self._prompt: torch.Tensor | None = None  # (B, L0) bool: known before step 0
        self._just_decoded: torch.Tensor | None = None  # (B, L) bool: decoded at step - 1
        self._stats = {"steps": 0, "refreshes": 0, "tokens_computed": 0, "tokens_full": 0}

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    @property
    def _commit_delay(self) -> int:
        """Steps between decoding a token and reusing its K/V (`PositionalKVCache`)."""
        return self.params.commit_delay

    def ideal_speedup(self, run) -> float | None:
        """Ratio of the tokens a full forward computes to the tokens this cache computed."""
        if not self._stats["tokens_computed"]:
            return None
        return self._stats["tokens_full"] / self._stats["tokens_computed"]

    # ------------------------------------------------------------------ the hook
    @hookimpl
    def decodekit_mdm_forward(
        self,
        run,
        step,
        block_step,
        model,
        x,
        attention_mask,
        position_ids,
        mask_index,
        need_logits,
        logits_window,
    ):
        if model is not self.model:
            return None
        batch, length = x.shape
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(mask_index)
        self._track(x, mask_index, valid, step)
        cache = self.cache
        stored = (
            _pad_cols(cache.key_mask(0), length) if cache.length(0) else torch.zeros_like(valid)
        )
        fed, refresh = self._positions(step, block_step, mask_index, valid, logits_window)
        fed = (fed | need_logits.bool() | ~stored) & valid  # (B, L)
        self._stats["steps"] += 1
        self._stats["refreshes"] += int(refresh)
        logits, computed = self._partial_forward(
            model, x, position_ids, fed, valid, step, logits_window
        )
        self._stats["tokens_computed"] += computed
        self._stats["tokens_full"] += batch * length
        return logits, computed

    def _positions(
        self,
        step: int,
        block_step: int,
        mask_index: torch.Tensor,
        valid: torch.Tensor,
        logits_window: tuple[int, int],
    ) -> tuple[torch.Tensor, bool]:
        """The positions to recompute this step ``(B, L)`` bool, and whether it is a refresh.

        The positions whose logits are read and those never computed are added by the caller.
        """
        p = self.params
        length = valid.shape[1]
        refresh = p.variant != "prefill" and (
            block_step % p.refresh_interval == 0 or block_step < p.block_refresh_steps
        )
        prompt = _pad_cols(self._prompt, length)
        if p.variant == "prefill":
            return ~prompt, False
        if refresh:
            return (~prompt if p.variant == "pd" else torch.ones_like(valid)), True
        if p.variant == "greedy":
            near = _dilate(self._just_decoded, p.window) & mask_index
            return self._just_decoded | near, False
        # decode, pd: every forward stores the same positions in every layer, so layer 0
        # speaks for all
        cache = self.cache
        reusable = cache.reusable(step, layer=0) if cache.length(0) else None
        fed = ~_pad_cols(reusable, length) if reusable is not None else torch.ones_like(valid)
        return fed, False

    # ------------------------------------------------------------------ internals
    def _track(
        self, x: torch.Tensor, mask_index: torch.Tensor, valid: torch.Tensor, step: int
    ) -> None:
        """Record which positions got (new) tokens since the last forward, and when."""
        prev = self._prev_x
        if prev is None or prev.shape[0] != x.shape[0]:
            self.cache = PositionalKVCache(self.num_layers, commit_delay=self._commit_delay)
            self._prompt = ~mask_index & valid  # (B, L)
            self.cache.mark_decoded(self._prompt, -1)
            self._just_decoded = torch.zeros_like(mask_index)
        else:
            overlap = min(prev.shape[1], x.shape[1])
            changed = torch.zeros_like(mask_index)
            changed[:, :overlap] = x[:, :overlap] != prev[:, :overlap]
            changed[:, overlap:] = ~mask_index[:, overlap:]
            changed &= valid & ~mask_index
            self.cache.mark_decoded(changed, step - 1)  # a dense update: no read back
            self._just_decoded = changed
        self._prev_x = x.clone()

    def _partial_forward(self, model, x, position_ids, fed, valid, step, window):
        """Run ``model`` on the ``fed`` positions only; logits of the columns ``window = (lo, hi)``
        ``(B, hi - lo, V)`` (zero where not fed) and the tokens computed."""
        batch, length = x.shape
        lo, hi = window
        column = torch.arange(length, device=x.device)
        wanted = fed & (column >= lo) & (column < hi)  # (B, L): fed, and its logits are read
        counts, n_wanted = fed.sum(dim=1), wanted.sum(dim=1)  # (B,) each
        width, keep = torch.stack([counts.max(), n_wanted.max()]).tolist()  # one read
        bucket = self.params.query_bucket or (16 if x.device.type == "cuda" else 1)
        width = min(length, -(-width // bucket) * bucket)  # columns past counts[b]: dropped
        if bucket > 1:  # one LM-head width per query width: the window's (extra ones dropped)
            keep = min(width, hi - lo)
        # Each row feeds its wanted positions first, then the other fed ones, in position
        # order: the LM head then runs on the first `keep` columns only.
        rank = (~fed).to(torch.int8) * 2 + (fed & ~wanted).to(torch.int8)  # 0, 1, 2 (not fed)
        order = torch.sort(rank, dim=1, stable=True).indices[:, :width]  # (B, Q)
        real = torch.arange(width, device=x.device)[None, :] < counts[:, None]  # (B, Q)
        ids = x.gather(1, order)  # (B, Q)
        pos_ids = position_ids.gather(1, order)  # (B, Q)
        # Prepared once here (distinct positions < L per row; the padding columns write
        # back what their slots hold), so the per-layer stores never wait for the device and
        # have shapes fixed by (B, Q); the step goes in as a device tensor, so a compiled
        # model sees no per-step number.
        slots = self.cache.prepare(order, width, end=length, step=step, real=real)
        self._ctx = _Forward(slots, valid, length)
        try:
            keep_cols = torch.arange(keep, device=x.device)
            logits_q = _call_model(model, ids, pos_ids, keep_cols)  # (B, keep, V)
        finally:
            self._ctx = None
        # Column q < n_wanted[b] of row b holds position order[b, q]; the rest go to a
        # spare column past the window, dropped after the scatter.
        span = hi - lo
        target = order[:, :keep] - lo  # (B, keep)
        target = torch.where(column[None, :keep] < n_wanted[:, None], target, span)
        logits = logits_q.new_zeros(batch, span + 1, logits_q.shape[-1])  # (B, W + 1, V)
        logits.scatter_(1, target[:, :, None].expand(-1, -1, logits.shape[-1]), logits_q)
        return logits[:, :span], batch * width

    def _attend(self, module, query, key, value, scaling):
        """Store this layer's fresh K/V, then attend over every position (B, H, Q, D) -> (B, Q, H, D)."""
        ctx = self._ctx
        layer = int(module.layer_idx)
        cache = self.cache
        cache.store(layer, key, value, ctx.slots)  # at the step the slots were prepared for
        keys, values = cache.kv(layer)
        keys, values = keys[:, :, : ctx.length], values[:, :, : ctx.length]  # (B, Hkv, L, D)
        if ctx.attend_mask is None:
            valid = cache.key_mask(layer)[:, : ctx.length] & ctx.key_ok[:, : keys.shape[2]]
            ctx.attend_mask = valid[:, None, None, :]  # (B, 1, 1, L)
        groups = query.shape[1] // keys.shape[1]
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=1)  # (B, H, L, D)
            values = values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=ctx.attend_mask, scale=scaling
        )  # (B, H, Q, D)
        return out.transpose(1, 2).contiguous(), None


def _call_model(model, ids, pos_ids, keep):
    """The cached forward: the model on the fed columns ``ids`` ``(B, Q)``; logits ``(B, K, V)``
    of the columns ``keep`` ``(K,)``.

    Everything that reads from the device happened before (the widths, the slots); inside
    are only the model's own ops and the per-layer stores, all with shapes fixed by
    ``(B, Q)`` and the sequence length, so ``torch.compile(model, fullgraph=True)``
    traces it as one graph (tests/test_compile.py).
    """
    return model(input_ids=ids, position_ids=pos_ids, use_cache=False, logits_to_keep=keep).logits


def _pad_cols(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A (B, L') bool mask cut or padded with False to (B, length)."""
    if mask.shape[1] >= length:
        return mask[:, :length]
    pad = torch.zeros(mask.shape[0], length - mask.shape[1], dtype=torch.bool, device=mask.device)
    return torch.cat([mask, pad], dim=1)


def _dilate(mask: torch.Tensor, window: int) -> torch.Tensor:
    """Positions within ``window`` of a true entry, (B, L) bool."""
    if window == 0 or not bool(mask.any()):
        return mask
    grown = F.max_pool1d(mask[:, None].float(), 2 * window + 1, stride=1, padding=window)
    return grown[:, 0] > 0


@hookimpl
def decodekit_register_strategies(register):
    register(DKVCache)
