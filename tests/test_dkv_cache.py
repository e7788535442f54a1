"""dkv-cache: exactness oracles on tiny random bidirectional Llamas (float64, temperature 0)."""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.hookspecs import hookimpl
from decodekit.strategy import Strategy
from decodekit.testing import (
    MASK,
    CommitRecorder,
    StrategyTesterMixin,
    tiny_bidirectional_llama,
    tiny_mdm_pipeline,
)

from tests.tiny import MDM_PROMPTS as PROMPTS
from tests.tiny import EchoModel

KW = dict(gen_length=16, block_length=8, steps=8)
VARIANTS = ["decode", "greedy", "prefill", "pd"]


def dkv(variant="decode", **params):
    return {"name": "dkv-cache", "params": {"variant": variant, **params}}


@pytest.mark.parametrize("variant", ["decode", "greedy"])  # pd, prefill: prompt never recomputed
def test_refresh_every_step_equals_no_cache(variant):
    pipe = tiny_mdm_pipeline()
    base = pipe(input_ids=PROMPTS, **KW).sequences
    with decodekit.attach(pipe, [dkv(variant, refresh_interval=1)]) as run:
        out = pipe(input_ids=PROMPTS, **KW).sequences
    assert torch.equal(out, base)
    assert run.stats["strategies"]["dkv-cache"]["refreshes"] == 8


@pytest.mark.parametrize("variant", VARIANTS)
def test_query_bucket_pads_widths_without_changing_tokens(variant):
    # On a GPU every new query width costs plan selection; buckets cap the shape count.
    # The padded columns are computed and dropped: tokens equal the exact-width run.
    import decodekit.plugins.dkv_cache as dkv_module

    pipe = tiny_mdm_pipeline()
    widths = []
    real = dkv_module.DKVCache._partial_forward

    def spy(self, model, x, *args):
        logits, computed = real(self, model, x, *args)
        widths.append((computed // x.shape[0], x.shape[1]))
        return logits, computed

    outs, seen = {}, {}
    for bucket in (1, 5):
        widths.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dkv_module.DKVCache, "_partial_forward", spy)
            with decodekit.attach(pipe, [dkv(variant, refresh_interval=4, query_bucket=bucket)]):
                outs[bucket] = pipe(input_ids=PROMPTS, gen_length=24, block_length=8, steps=24)
        seen[bucket] = list(widths)
    assert all(w % 5 == 0 or w == length for w, length in seen[5])
    assert any(w % 5 for w, _ in seen[1])  # the control: exact widths are not all multiples
    assert torch.equal(outs[1].sequences, outs[5].sequences)
    assert sum(outs[5].tokens_computed) > sum(outs[1].tokens_computed)


@pytest.mark.parametrize("variant", VARIANTS)
def test_host_reads_per_step_do_not_grow_with_depth(variant):
    # On a GPU every read-back waits for the device; reads per layer would serialise
    # the forward (seen on an H200: decode slower than no cache). Count them on CPU.
    from decodekit.testing import HostReads

    per_depth = {}
    for layers in (1, 4):
        pipe = tiny_mdm_pipeline(layers=layers)
        with decodekit.attach(pipe, [dkv(variant, refresh_interval=4)]):
            with HostReads() as reads:
                pipe(input_ids=PROMPTS, **KW)
        per_depth[layers] = reads.total
    with HostReads() as base:
        tiny_mdm_pipeline(layers=4)(input_ids=PROMPTS, **KW)
    assert per_depth[1] == per_depth[4]
    # none per layer (the per-layer stores take fixed shapes), and none beyond the uncached
    # loop's own; greedy reads at most once a step more (its window's neighbours)
    extra = KW["steps"] if variant == "greedy" else 0
    assert per_depth[4] <= base.total + extra, (per_depth, base.total)


class LogitsSpy(Strategy):
    """Serves each step through the cache itself and records x and the logits (runs first)."""

    name = "logits-spy"
    loops = ("masked-diffusion",)
    before = ("dkv-cache",)

    def reset(self, run):
        self.records = []

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
        cache = next(s for s in run.strategies if s.name == "dkv-cache")
        logits, _ = cache.decodekit_mdm_forward(  # every column, to compare at need_logits
            run,
            step,
            block_step,
            model,
            x,
            attention_mask,
            position_ids,
            mask_index,
            need_logits,
            (0, x.shape[1]),
        )
        self.records.append(
            (x.clone(), attention_mask.clone(), position_ids.clone(), need_logits.clone(), logits)
        )
        lo, hi = logits_window
        return logits[:, lo:hi]


def step_errors(pipe, **params) -> tuple[torch.Tensor, float, float]:
    """Run the cache with a `LogitsSpy`; compare every step's logits with an uncached forward
    on the same x. Returns the sequences, the largest |difference| over the positions the
    sampler reads, and the share of those positions whose top token is the uncached one."""
    from decodekit.plugins.dkv_cache import DKVCache

    spy = LogitsSpy()
    with decodekit.attach(pipe, [DKVCache(params), spy]):
        sequences = pipe(input_ids=PROMPTS, **KW).sequences
    assert len(spy.records) == KW["steps"]
    worst, same, read = 0.0, 0, 0
    for x, attn, pos, need, logits in spy.records:
        with torch.no_grad():
            ref = pipe.model(input_ids=x, attention_mask=attn, position_ids=pos).logits
        worst = max(worst, float((logits[need] - ref[need]).abs().max()))
        same += int((logits[need].argmax(-1) == ref[need].argmax(-1)).sum())
        read += int(need.sum())
    return sequences, worst, same / read


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_layer_model_every_variant_is_exact(variant):
    # One layer: a position's K/V depend only on its own token and position, so any
    # cached K/V of an unchanged token are exact, and logits must equal uncached ones.
    _, worst, _ = step_errors(tiny_mdm_pipeline(layers=1), variant=variant, refresh_interval=4)
    assert worst < 1e-10


def test_without_delay_one_layer_is_not_exact():
    # The control: reusing K/V computed while the token was still a mask is wrong.
    pipe = tiny_mdm_pipeline(layers=1)
    _, worst, _ = step_errors(pipe, variant="decode", refresh_interval=8, commit_delay=0)
    assert worst > 1e-4


def test_cache_computes_fewer_tokens_and_decode_stays_close():
    # Two layers: a decoded token's K/V are kept from the step after it was decoded, while
    # the uncached model recomputes them as the context fills in (the paper's approximation),
    # so logits move, boundedly. Measured on this seed (float64, deterministic): logits of
    # magnitude <= 0.29 move by <= 0.038, the top token of 92% of the read positions is the
    # uncached one, 38 of the 48 tokens are the uncached run's. The control, K/V reused from
    # while the token was still a mask (commit_delay=0), measured 0.117, 55% and 22 of 48;
    # random K/V (a cache serving garbage) 0.41, 7% and 2 of 48.
    pipe = tiny_mdm_pipeline()
    base = pipe(input_ids=PROMPTS, **KW)
    with decodekit.attach(pipe, [dkv("decode", refresh_interval=4)]) as run:
        out = pipe(input_ids=PROMPTS, **KW)
    assert out.nfe == base.nfe == 8 and run.last["served"] == 8
    assert sum(out.tokens_computed) < 0.8 * sum(base.tokens_computed)
    assert run.ideal_speedup() > 1.2

    sequences, worst, top1 = step_errors(pipe, variant="decode", refresh_interval=4)
    assert torch.equal(sequences, out.sequences)  # the spy changes nothing
    same = float((sequences == base.sequences).float().mean())
    assert worst < 0.06 and top1 > 0.85 and same > 0.7
    sequences, worst, top1 = step_errors(pipe, variant="decode", refresh_interval=4, commit_delay=0)
    same = float((sequences == base.sequences).float().mean())
    assert worst > 0.06 and top1 < 0.85 and same < 0.7  # the control fails each bound


def test_ragged_batch_row_equals_row_alone_with_cache():
    pipe = tiny_mdm_pipeline()
    with decodekit.attach(pipe, [dkv("decode", refresh_interval=4)]):
        batch = pipe(input_ids=PROMPTS, **KW).sequences
        for i, row in enumerate(PROMPTS):
            alone = pipe(input_ids=[row], **KW).sequences
            assert torch.equal(batch[i : i + 1], alone)


def test_composes_with_threshold_and_cfg_and_shift():
    pipe = tiny_mdm_pipeline()
    rec = CommitRecorder()
    strategies = [
        dkv("decode", refresh_interval=1),
        {"name": "parallel-threshold", "params": {"threshold": 0.05}},
        rec,
    ]
    kw = dict(KW, cfg_scale=1.0, shift=True)
    base = pipe(input_ids=PROMPTS, remasking="threshold", threshold=0.05, **kw)
    with decodekit.attach(pipe, strategies) as run:
        out = pipe(input_ids=PROMPTS, **kw)
    assert torch.equal(out.sequences, base.sequences)
    assert out.steps_per_block == base.steps_per_block
    assert run.stats["strategies"]["parallel-threshold"]["steps"] == out.nfe
    # threshold rule: each step commits >= 1 per unfinished row, the top one always.
    assert all((c.sum(dim=1) >= 1).all() for _, _, c in rec.steps if c.any())
    assert not (out.sequences == MASK).any()


def test_two_selectors_or_two_caches_are_refused():
    pipe = tiny_mdm_pipeline()
    with pytest.raises(decodekit.CompositionError, match="kv-cache"):
        decodekit.attach(
            pipe,
            [
                dkv("decode"),
                {"name": "dkv-cache"},
            ],
        )


def test_refuses_causal_and_unsupported_models():
    from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline

    causal = tiny_bidirectional_llama(is_causal=True)
    pipe = MaskedDiffusionLMPipeline(causal, mask_token_id=MASK)
    with pytest.raises(decodekit.AttachError, match="is_causal"):
        decodekit.attach(pipe, ["dkv-cache"])
    echo = MaskedDiffusionLMPipeline(EchoModel(), mask_token_id=MASK)
    with pytest.raises(decodekit.AttachError, match="not supported"):
        decodekit.attach(echo, ["dkv-cache"])
    with pytest.raises(decodekit.ConfigError, match="variant"):
        decodekit.attach(pipe, [dkv("nope")])


def test_calling_the_model_directly_while_attached_is_explained():
    pipe = tiny_mdm_pipeline()
    with decodekit.attach(pipe, ["dkv-cache"]):
        with pytest.raises(RuntimeError, match="through its pipeline"):
            pipe.model(torch.tensor([[3, 4]]))
    pipe.model(torch.tensor([[3, 4]]))  # restored


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_detach_restores_attention_through_public_calls(implementation):
    from decodekit import compat
    from decodekit.plugins.dkv_cache import ATTN_NAME
    from transformers import AttentionInterface

    pipe = tiny_mdm_pipeline()
    pipe.model.set_attn_implementation(implementation)
    with decodekit.attach(pipe, ["dkv-cache"]):  # registers ATTN_NAME once, for good
        assert compat.attn_implementation(pipe.model) == ATTN_NAME
    registered = dict(AttentionInterface())
    with decodekit.attach(pipe, ["dkv-cache"]):
        pass
    assert compat.attn_implementation(pipe.model) == implementation
    assert all(
        compat.attn_implementation(m) == implementation
        for m in pipe.model.modules()
        if hasattr(m, "k_proj")
    )
    assert dict(AttentionInterface()) == registered  # a second attach adds nothing


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_supported_families_refresh_equals_no_cache(model_type):
    import transformers

    cfg_cls, model_cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[model_type]
    torch.manual_seed(0)
    cfg = cfg_cls(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        is_causal=False,
        sliding_window=None,
    )
    from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline

    pipe = MaskedDiffusionLMPipeline(model_cls(cfg).double().eval(), mask_token_id=MASK)
    kw = dict(gen_length=8, block_length=4, steps=4)
    base = pipe(input_ids=PROMPTS, **kw).sequences
    with decodekit.attach(pipe, [dkv("decode", refresh_interval=1)]):
        assert torch.equal(pipe(input_ids=PROMPTS, **kw).sequences, base)


class TestDKVCacheContract(StrategyTesterMixin):
    strategies = [{"name": "dkv-cache", "params": {"variant": "decode", "refresh_interval": 4}}]
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


def test_lm_head_runs_on_the_current_block_only():
    # The pipeline reads the current block's logits alone, so the LM head (a vocabulary-
    # sized matmul per position) runs on those columns, uncached and cached alike.
    pipe = tiny_mdm_pipeline()
    widths = []
    handle = pipe.model.lm_head.register_forward_pre_hook(
        lambda m, args: widths.append(args[0].shape[1])
    )
    try:
        base = pipe(input_ids=PROMPTS, **KW).sequences
        assert widths and set(widths) == {KW["block_length"]}
        widths.clear()
        with decodekit.attach(pipe, [dkv("decode", refresh_interval=4)]):
            out = pipe(input_ids=PROMPTS, **KW).sequences
    finally:
        handle.remove()
    assert out.shape == base.shape
    # the block's decoded, reusable positions are not fed, so some steps need fewer
    assert widths and max(widths) <= KW["block_length"] and min(widths) < KW["block_length"]


@pytest.mark.parametrize("variant", ["decode", "greedy", "pd"])
def test_block_refresh_steps_adds_full_forwards_at_each_block_start(variant):
    # KW: 2 blocks of 4 steps. refresh_interval 4 refreshes block step 0 only; with
    # block_refresh_steps=2 steps 0 and 1 (the reference code's schedule), and with 4,
    # every step, which is the uncached run token for token (decode, greedy).
    pipe = tiny_mdm_pipeline()
    base = pipe(input_ids=PROMPTS, **KW)
    counts, computed = {}, {}
    for first in (1, 2, 4):
        with decodekit.attach(
            pipe, [dkv(variant, refresh_interval=4, block_refresh_steps=first)]
        ) as run:
            out = pipe(input_ids=PROMPTS, **KW)
        counts[first] = run.stats["strategies"]["dkv-cache"]["refreshes"]
        computed[first] = sum(out.tokens_computed)
        if first == 4 and variant != "pd":
            assert torch.equal(out.sequences, base.sequences)
    assert counts == {1: 2, 2: 4, 4: 8}
    assert computed[1] < computed[2] < computed[4]
