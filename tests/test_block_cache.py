"""block-cache: Fast-dLLM's prefix cache and DualCache on tiny bidirectional Llamas (float64).

The oracle is Fast-dLLM's algorithm (NVlabs/Fast-dLLM ``generate_with_prefix_cache`` /
``generate_with_dual_cache``) written here on transformers' own ``DynamicCache``: a
full forward at each block's first step keeps every layer's K/V; a later step feeds
the block and the suffix (prefix) or the block alone (dual) with the prefix (and
suffix) K/V taken from that forward. It runs as a strategy in the same pipeline
loop, so the two differ only in how the logits are computed.
"""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.hookspecs import hookimpl
from decodekit.plugins.block_cache import BlockCache
from decodekit.remasking import FactorRemasking
from decodekit.strategy import Strategy
from decodekit.testing import MASK, StrategyTesterMixin, tiny_mdm_pipeline

from tests.tiny import MDM_PROMPTS as PROMPTS

KW = dict(gen_length=16, block_length=8, steps=8)


def block(mode="dual", **params):
    return {"name": "block-cache", "params": {"mode": mode, **params}}


class FastDllmReference(Strategy):
    """Fast-dLLM's block caches on transformers' DynamicCache, as the reference computes them."""

    name = "fast-dllm-reference"
    loops = ("masked-diffusion",)
    slot = "kv-cache"

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.logits: list[torch.Tensor] = []

    def reset(self, run) -> None:
        self.kv = None
        self.logits = []

    @hookimpl
    def decodekit_mdm_forward(
        self, run, step, block_step, model, x, attention_mask, position_ids, mask_index,
        need_logits, logits_window,
    ):  # fmt: skip
        from transformers import DynamicCache

        lo, hi = logits_window
        if block_step == 0:  # the whole sequence; every layer's K/V kept
            out = model(
                input_ids=x, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True,
            )  # fmt: skip
            self.kv = [(layer.keys, layer.values) for layer in out.cache.layers]
            logits = out.logits[:, lo:hi]
        else:
            end = x.shape[1] if self.mode == "prefix" else hi
            cached = torch.ones(x.shape[1], dtype=torch.bool)
            cached[lo:end] = False  # the fed columns; the cache holds the others
            cache = DynamicCache()
            for i, (k, v) in enumerate(self.kv):
                cache.update(k[:, :, cached], v[:, :, cached], i)
            # attention order is immaterial (no causal mask): cached keys first, then the fed
            mask = torch.cat([attention_mask[:, cached], attention_mask[:, lo:end]], dim=1)
            logits = model(
                input_ids=x[:, lo:end], attention_mask=mask, position_ids=position_ids[:, lo:end],
                cache=cache, use_cache=True,
            ).logits[:, : hi - lo]  # fmt: skip
        self.logits.append(logits)
        return logits


class Recording(BlockCache):
    """block-cache, keeping the logits it serves."""

    def reset(self, run) -> None:
        super().reset(run)
        self.logits = []

    @hookimpl
    def decodekit_mdm_forward(
        self, run, step, block_step, model, x, attention_mask, position_ids, mask_index,
        need_logits, logits_window,
    ):  # fmt: skip
        out = super().decodekit_mdm_forward(
            run=run, step=step, block_step=block_step, model=model, x=x,
            attention_mask=attention_mask, position_ids=position_ids, mask_index=mask_index,
            need_logits=need_logits, logits_window=logits_window,
        )  # fmt: skip
        if out is not None:
            self.logits.append(out[0])
        return out


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_equals_fast_dllms_algorithm_step_by_step(mode):
    pipe = tiny_mdm_pipeline(layers=2)
    ref = FastDllmReference(mode)
    with decodekit.attach(pipe, [ref]):
        want = pipe(input_ids=PROMPTS, **KW)
    ours = Recording(mode=mode)
    with decodekit.attach(pipe, [ours]) as run:
        got = pipe(input_ids=PROMPTS, **KW)
    assert torch.equal(got.sequences, want.sequences)
    assert got.steps_per_block == want.steps_per_block
    assert len(ours.logits) == len(ref.logits) == KW["steps"]
    for a, b in zip(ours.logits, ref.logits, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    stats = run.stats["strategies"]["block-cache"]
    assert stats["refreshes"] == 2  # each block's first step
    # after a block's first step only the block (dual) or block and suffix (prefix) run
    assert stats["tokens_computed"] < (0.6 if mode == "dual" else 0.8) * stats["tokens_full"]


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_layer_model_is_exact(mode):
    # One layer: a position's K/V depend only on its own token, so reusing them is exact.
    pipe = tiny_mdm_pipeline(layers=1)
    base = pipe(input_ids=PROMPTS, **KW)
    with decodekit.attach(pipe, [block(mode)]):
        out = pipe(input_ids=PROMPTS, **KW)
    assert torch.equal(out.sequences, base.sequences)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_step_blocks_equal_no_cache(mode):
    pipe = tiny_mdm_pipeline(layers=2)
    kw = dict(gen_length=16, block_length=4, steps=4)  # one step per block: all refreshes
    base = pipe(input_ids=PROMPTS, **kw)
    with decodekit.attach(pipe, [block(mode)]) as run:
        out = pipe(input_ids=PROMPTS, **kw)
    assert torch.equal(out.sequences, base.sequences)
    assert run.stats["strategies"]["block-cache"]["refreshes"] == 4


def test_two_layers_differ_from_no_cache():
    # The control: with two layers the cached K/V are stale, so some logits move.
    pipe = tiny_mdm_pipeline(layers=2)
    ref = FastDllmReference("dual")
    with decodekit.attach(pipe, [ref]):
        pipe(input_ids=PROMPTS, **KW)
    base_logits = []

    class Full(FastDllmReference):
        name = "full-reference"

        @hookimpl
        def decodekit_mdm_forward(self, run, step, block_step, model, x, attention_mask,
                                  position_ids, mask_index, need_logits, logits_window):  # fmt: skip
            lo, hi = logits_window
            out = model(input_ids=x, attention_mask=attention_mask, position_ids=position_ids)
            base_logits.append(out.logits[:, lo:hi])
            return out.logits[:, lo:hi]

    with decodekit.attach(pipe, [Full("dual")]):
        pipe(input_ids=PROMPTS, **KW)
    diffs = [float((a - b).abs().max()) for a, b in zip(ref.logits, base_logits, strict=True)]
    assert diffs[0] == 0.0 and max(diffs) > 1e-6


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_ragged_batch_row_equals_row_alone(mode):
    pipe = tiny_mdm_pipeline()
    with decodekit.attach(pipe, [block(mode)]):
        batch = pipe(input_ids=PROMPTS, **KW).sequences
        for i, row in enumerate(PROMPTS):
            assert torch.equal(batch[i : i + 1], pipe(input_ids=[row], **KW).sequences)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("rule", [{"threshold": 0.05}, {"factor": 3.0}])
def test_composes_with_threshold_or_factor_cfg_and_shift(mode, rule):
    pipe = tiny_mdm_pipeline(layers=1)  # exact, so the comparison is token for token
    kw = dict(KW, cfg_scale=1.0, shift=True)
    if "factor" in rule:
        base = pipe(input_ids=PROMPTS, remasking=FactorRemasking(rule["factor"]), **kw)
    else:
        base = pipe(input_ids=PROMPTS, remasking="threshold", threshold=rule["threshold"], **kw)
    strategies = [block(mode), {"name": "parallel-threshold", "params": rule}]
    with decodekit.attach(pipe, strategies):
        out = pipe(input_ids=PROMPTS, **kw)
    assert torch.equal(out.sequences, base.sequences)
    assert out.steps_per_block == base.steps_per_block
    if "factor" in rule:  # several tokens committed in a step (this model: 4 steps a block)
        assert sum(out.steps_per_block) < KW["gen_length"]
    assert not (out.sequences == MASK).any()


def test_conflicts_with_dkv_cache_and_bad_params_are_refused():
    pipe = tiny_mdm_pipeline()
    with pytest.raises(decodekit.CompositionError, match="kv-cache"):
        decodekit.attach(pipe, [block(), {"name": "dkv-cache"}])
    with pytest.raises(decodekit.ConfigError, match="mode"):
        decodekit.attach(pipe, [block("suffix")])
    with pytest.raises(decodekit.ConfigError, match="factor"):
        decodekit.attach(pipe, [{"name": "parallel-threshold", "params": {"factor": 0}}])


class TestBlockCacheContract(StrategyTesterMixin):
    strategies = [block("prefix")]
    atol = 0

    def make_pipeline(self):
        return tiny_mdm_pipeline()

    def sample_inputs(self):
        return PROMPTS

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        gens = [
            torch.Generator().manual_seed(seed * 1000 + row_offset + i) for i in range(len(inputs))
        ]
        return pipe(
            input_ids=inputs, gen_length=8, block_length=4, steps=4, temperature=0.7, generator=gens
        ).sequences

    def broken_call(self, pipe):
        pipe(input_ids=PROMPTS, gen_length=8, block_length=4, steps=4, temperature=1.0)


@pytest.mark.parametrize("threshold", [False, True], ids=["alone", "threshold"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_host_reads_per_step_do_not_grow_with_depth(mode, threshold):
    # A GPU waits at every read back: none per layer, and none beyond the uncached
    # loop's own (the fed widths are the block's, known without reading the device);
    # with threshold decoding, none beyond the uncached loop with the same rule.
    from decodekit.testing import HostReads

    rule = [{"name": "parallel-threshold", "params": {"threshold": 0.9}}] if threshold else []
    per_depth = {}
    for layers in (1, 4):
        pipe = tiny_mdm_pipeline(layers=layers)
        with decodekit.attach(pipe, [block(mode), *rule]):
            with HostReads() as reads:
                pipe(input_ids=PROMPTS, **KW)
        per_depth[layers] = reads.total
    base_pipe = tiny_mdm_pipeline(layers=4)
    with decodekit.attach(base_pipe, rule), HostReads() as base:
        base_pipe(input_ids=PROMPTS, **KW)
    assert per_depth[1] == per_depth[4]
    assert per_depth[4] <= base.total, (per_depth, base.counts)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_one_query_width_per_block(mode):
    # The shapes a GPU sees: after a block's full first step, every step of the block
    # feeds the same number of positions (the block, or the block and the suffix).
    widths = []

    class Widths(Recording):
        def _partial_forward(self, model, x, position_ids, fed, valid, step, window):
            logits, computed = super()._partial_forward(
                model, x, position_ids, fed, valid, step, window
            )
            widths.append(computed // x.shape[0])
            return logits, computed

    pipe = tiny_mdm_pipeline()
    with decodekit.attach(pipe, [Widths(mode=mode)]):
        pipe(input_ids=PROMPTS, **KW)
    per_block = KW["steps"] // (KW["gen_length"] // KW["block_length"])
    blocks = [widths[i : i + per_block] for i in range(0, len(widths), per_block)]
    assert all(len(set(b[1:])) == 1 for b in blocks), widths
    if mode == "dual":
        assert all(b[1] == KW["block_length"] for b in blocks), widths
