"""Block-wise K/V caches of Fast-dLLM, from "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding" (arXiv:2505.22618).

A masked diffusion LM decoding block by block (semi-autoregressive
remasking) changes only the current block's tokens within a block. Fast-dLLM
therefore computes the whole sequence once at each block's first step and
reuses keys and values for the rest of the block:

- ``prefix``: the K/V of every position before the current block come from
  the block's first step; each later step recomputes the current block and
  everything after it (its queries attend to the cached prefix).
- ``dual``: the K/V after the block (still masks) are cached too; each later
  step recomputes the current block alone.

Both are approximations: a cached position's K/V were computed when the
current block held more masks than it does now. They are exact when a
position's K/V cannot see the change — a one-layer model, whose K/V depend only
on the position's own token — and a block of one step is a full forward.

How it attaches: through the same attention hook as ``dkv-cache``
(`decodekit.plugins.dkv_cache`): transformers' ``AttentionInterface`` with a
decodekit function, a `decodekit.kv_cache.PositionalKVCache` of K/V by
absolute position, and the model fed only the positions it recomputes. The
same models are supported (Llama, Mistral, Qwen2, Qwen3 with bidirectional
attention; LLaDA after ``decodekit convert-llada``), with classifier-free
guidance, ragged batches and Dream's shifted logits (the block then starts one
column to the left, where the first masked position reads its logits).

Where it differs from the reference code (NVlabs/Fast-dLLM,
``llada/generate.py``: ``generate_with_prefix_cache``,
``generate_with_dual_cache``): batch > 1 with prompts of different lengths
(rows left-padded, the cache per row), classifier-free guidance, and the
pipeline's own step schedule (fixed steps per block, or the threshold and
factor rules of ``parallel-threshold``). The reference's cached forward and
ours compute the same logits (tests/test_block_cache.py checks ours against
that algorithm written on transformers' own ``DynamicCache``).
"""

from __future__ import annotations

from typing import Literal

import torch
from decodekit.hookspecs import hookimpl
from decodekit.plugins.dkv_cache import DKVCache
from decodekit.strategy import Params
from pydantic import Field


class BlockCacheParams(Params):
    """Parameters of `block-cache`."""

    mode: Literal["prefix", "dual"] = Field(
        "dual",
        description="prefix: reuse the K/V before the current block, recompute the block and "
        "everything after it; dual: reuse the K/V after the block too, recompute the block "
        "alone (Fast-dLLM's DualCache). Both refresh every position at each block's first step.",
    )
    query_bucket: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Round the number of positions fed per step up to a multiple of this "
        "(extra columns computed and dropped) so a GPU sees few distinct shapes. None: 16 on "
        "CUDA, 1 elsewhere.",
    )


class BlockCache(DKVCache):
    """Reuse keys and values within a block: Fast-dLLM's prefix cache and DualCache."""

    name = "block-cache"
    Params = BlockCacheParams
    paper = (
        "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and "
        "Parallel Decoding, arXiv:2505.22618"
    )

    @property
    def _commit_delay(self) -> int:
        return 1  # not read: positions are chosen by block, not by when they were decoded

    def _positions(self, step, block_step, mask_index, valid, logits_window):
        """The whole sequence at a block's first step; then the block (dual) or block and suffix (prefix)."""
        if block_step == 0:
            return torch.ones_like(valid), True
        lo, hi = logits_window
        column = torch.arange(valid.shape[1], device=valid.device)[None, :]  # (1, L)
        fed = column >= lo
        if self.params.mode == "dual":
            fed = fed & (column < hi)
        return fed.expand_as(valid), False


@hookimpl
def decodekit_register_strategies(register):
    register(BlockCache)
