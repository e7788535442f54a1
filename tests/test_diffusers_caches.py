"""diffusers' caches as strategies: each equals diffusers' own cache applied by hand, and detaches exactly.

The oracle is diffusers used directly: ``transformer.enable_cache(config)`` on the
tiny Flux pipeline (``CacheMixin``); ``apply_*`` with a timestep callback and a
cache context on the tiny SD3 pipeline and on the SD UNet (no ``CacheMixin``);
same config, same seed.
"""

from __future__ import annotations

import dataclasses

import decodekit
import pytest
import torch
from decodekit.errors import AttachError, CompositionError, ConfigError, DecodekitError
from decodekit.plugins import diffusers_caches as dc
from decodekit.session import build_strategies
from decodekit.testing import (
    StrategyTesterMixin,
    assert_restored,
    fingerprint,
    run_dit,
    run_sd,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)
from diffusers import hooks
from diffusers.hooks.hooks import CacheContext, StateManager
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

PROMPTS = ["a red circle", "a blue square"]
STEPS = 4

# name -> (decodekit params, the same config for diffusers; ``t()`` is the current timestep)
CASES = {
    "first-block-cache": (
        {"threshold": 2.0},
        lambda t: hooks.FirstBlockCacheConfig(threshold=2.0),
    ),
    "pyramid-attention-broadcast": (
        {
            "spatial_attention_block_skip_range": 2,
            "spatial_attention_timestep_skip_range": [0, 1000],
        },
        lambda t: hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=t,
        ),
    ),
    "faster-cache": (
        {"is_guidance_distilled": True, "spatial_attention_timestep_skip_range": [-1, 900]},
        lambda t: hooks.FasterCacheConfig(
            is_guidance_distilled=True,
            spatial_attention_timestep_skip_range=(-1, 900),
            tensor_format="BCHW",
            current_timestep_callback=t,
        ),
    ),
    "taylorseer-cache": (
        {"cache_interval": 2, "disable_cache_before_step": 1, "taylor_factors_dtype": "float32"},
        lambda t: hooks.TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32
        ),
    ),
    "mag-cache": (
        {"mag_ratios": "flux", "threshold": 0.5, "retention_ratio": 0.1},
        lambda t: hooks.MagCacheConfig(
            mag_ratios=FLUX_MAG_RATIOS,
            threshold=0.5,
            retention_ratio=0.1,
            num_inference_steps=STEPS,
        ),
    ),
}


def strategy(name: str, **params):
    return {"name": name, "params": params}


def timestep_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The timestep a denoiser call was given (UNets take it second, transformers by keyword)."""
    t = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return torch.as_tensor(t).reshape(-1)[0]


def by_hand(model: torch.nn.Module, apply, make_config, call) -> torch.Tensor:
    """``call()`` under a diffusers cache applied to ``model`` by hand, as its docs show.

    ``apply(model, make_config(t))`` with ``t()`` the timestep the call under way was
    given, and every hook's state under one cache context (what a ``CacheMixin``
    pipeline's ``cache_context("cond")`` does).
    """
    now = {}

    def before(module, args, kwargs):
        now["t"] = timestep_of(args, kwargs)
        for sub in model.modules():
            for hook in getattr(getattr(sub, "_diffusers_hook", None), "hooks", {}).values():
                for v in vars(hook).values():
                    if isinstance(v, StateManager):
                        v.set_context(CacheContext("cond"))

    handle = model.register_forward_pre_hook(before, with_kwargs=True)
    apply(model, make_config(lambda: now["t"]))
    try:
        return call()
    finally:
        handle.remove()


# -- a UNet: PAB hooks its attention layers, the others refuse it -------------------------------
PAB_UNET = {"spatial_attention_block_skip_range": 2, "cross_attention_block_skip_range": 3}


def test_unet_pyramid_attention_broadcast_equals_apply_by_hand():
    pipe = tiny_sd_pipeline()
    base = run_sd(pipe, PROMPTS)
    with decodekit.attach(pipe, [strategy("pyramid-attention-broadcast", **PAB_UNET)]) as run:
        ours = run_sd(pipe, PROMPTS)
    assert run.stats["strategies"]["pyramid-attention-broadcast"]["hooked_attention_layers"] > 0
    assert not torch.equal(ours, base)
    theirs = by_hand(
        pipe.unet,
        hooks.apply_pyramid_attention_broadcast,
        lambda t: hooks.PyramidAttentionBroadcastConfig(**PAB_UNET, current_timestep_callback=t),
        lambda: run_sd(pipe, PROMPTS),
    )
    assert torch.equal(ours, theirs)


class TestPABOnUNetContract(StrategyTesterMixin):
    """The contract where the timestep comes from the stable-diffusion adapter and hooks sit on a UNet."""

    strategies = [strategy("pyramid-attention-broadcast", **PAB_UNET)]
    atol = 1e-3  # float32 batched convolutions differ by ~1e-4 on latents of magnitude ~70

    def make_pipeline(self):
        pipe = tiny_sd_pipeline()
        run_sd(pipe, PROMPTS[:1], steps=2)  # the per-call attributes broken_call sets exist
        return pipe

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        return run_sd(pipe, inputs, seed=seed, row_offset=row_offset, steps=4)

    def sample_inputs(self):
        return PROMPTS

    def broken_call(self, pipe):
        run_sd(pipe, PROMPTS[:1], steps=2, callback_on_step_end=_boom)


def _boom(pipe, i, t, kwargs):
    raise RuntimeError("boom")


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, params",
    [
        ("first-block-cache", {}),
        ("faster-cache", {}),
        ("taylorseer-cache", {}),
        ("mag-cache", {"mag_ratios": "flux"}),
    ],
)
def test_unet_is_refused_at_attach_and_left_untouched(name, params):
    pipe = tiny_sd_pipeline()
    before = fingerprint(pipe)
    with pytest.raises(AttachError, match=r"UNet2DConditionModel.*faster-diffusion"):
        decodekit.attach(pipe, [strategy(name, **params)])
    assert_restored(before, fingerprint(pipe))
    decodekit.attach(pipe, ["faster-diffusion"]).detach()  # nothing left attached


def test_taylorseer_refusal_says_how_to_name_the_modules():
    with pytest.raises(AttachError, match=r"params\.cache_identifiers \(regexes matched in full"):
        decodekit.attach(tiny_sd_pipeline(), ["taylorseer-cache"])


def test_one_denoiser_cache_at_a_time():
    with pytest.raises(CompositionError, match="denoiser-cache"):
        decodekit.attach(tiny_sd_pipeline(), ["faster-diffusion", "pyramid-attention-broadcast"])


# -- params -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, params, where, says",
    [
        ("mag-cache", {}, "strategies.0.params", "mag_ratios is required"),
        (
            "mag-cache",
            {"retention_ratio": 2, "mag_ratios": "flux"},
            "params.retention_ratio",
            "less than or equal to 1",
        ),
        (
            "taylorseer-cache",
            {"cache_interval": 0},
            "params.cache_interval",
            "greater than or equal to 1",
        ),
        (
            "taylorseer-cache",
            {"taylor_factors_dtype": "int8"},
            "params.taylor_factors_dtype",
            "bfloat16",
        ),
        ("taylorseer-cache", {"cache_identifiers": ["("]}, "params", "not a regular expression"),
        (
            "pyramid-attention-broadcast",
            {"spatial_attention_block_skip_range": None},
            "params",
            "set at least one",
        ),
        (
            "pyramid-attention-broadcast",
            {"cross_attention_timestep_skip_range": [800, 100]},
            "params",
            "low < high",
        ),
        ("faster-cache", {"tensor_format": "BHWC"}, "params.tensor_format", "BCHW"),
        ("first-block-cache", {"treshold": 0.1}, "params.treshold", "takes: threshold"),
    ],
)
def test_bad_params_name_the_key(name, params, where, says):
    with pytest.raises(ConfigError) as e:
        build_strategies([strategy(name, **params)], decodekit.get_manager())
    assert where in e.value.path and says in str(e.value), str(e.value)


@pytest.mark.parametrize("cls", dc.STRATEGIES)
def test_params_are_diffusers_config_fields(cls):
    """Every field of diffusers' config a YAML file can hold is a param, with diffusers' default
    unless the docs say why not; callbacks and private fields are decodekit's wiring."""
    changed = {
        "spatial_attention_block_skip_range": 2,  # PAB: diffusers falls back to 2 with a warning
        "tensor_format": "BCHW",  # FasterCache: images, not diffusers' video layout
        "taylor_factors_dtype": "bfloat16",  # TaylorSeer: a name for torch.bfloat16
        "num_inference_steps": None,  # MagCache: each call's step count
    }
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    wired = {n for n in fields if n.startswith("_") or n.endswith("_callback")}
    own = set(cls.Params.model_fields) - {"attention_weight"}
    assert own == set(fields) - wired
    for name in own:
        expected = changed.get(name, fields[name].default)
        if cls is dc.PyramidAttentionBroadcast or name != "spatial_attention_block_skip_range":
            assert cls.Params.model_fields[name].default == expected, name
        assert cls.Params.model_fields[name].description, name


# -- diffusion transformers -------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_baseline() -> torch.Tensor:
    return run_dit(tiny_flux_pipeline(), PROMPTS, steps=STEPS)


@pytest.mark.parametrize("name", list(CASES))
def test_equals_diffusers_enable_cache_and_detaches_exactly(name, flux_baseline):
    params, make_config = CASES[name]
    pipe = tiny_flux_pipeline()
    before = fingerprint(pipe.transformer)
    with decodekit.attach(pipe, [strategy(name, **params)]) as run:
        ours = run_dit(pipe, PROMPTS, steps=STEPS)
        stats = run.stats["strategies"][name]
    assert_restored(before, fingerprint(pipe.transformer))
    assert torch.equal(run_dit(pipe, PROMPTS, steps=STEPS), flux_baseline)

    pipe.transformer.enable_cache(make_config(lambda: pipe.current_timestep))
    theirs = run_dit(pipe, PROMPTS, steps=STEPS)
    pipe.transformer.disable_cache()
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, flux_baseline)  # the cache did skip work
    assert stats["denoiser_calls"] == STEPS
    assert 0 < stats.get("cached_calls", 1) < STEPS


def test_threshold_zero_first_block_cache_is_the_baseline(flux_baseline):
    pipe = tiny_flux_pipeline()
    with decodekit.attach(pipe, [strategy("first-block-cache", threshold=0.0)]) as run:
        out = run_dit(pipe, PROMPTS, steps=STEPS)
    assert torch.equal(out, flux_baseline)
    assert run.stats["strategies"]["first-block-cache"]["cached_calls"] == 0


def test_mag_cache_follows_each_calls_step_count():
    pipe = tiny_flux_pipeline()
    with decodekit.attach(pipe, [strategy("mag-cache", mag_ratios="flux", threshold=0.5)]):
        ours = {n: run_dit(pipe, PROMPTS[:1], steps=n) for n in (4, 8)}
    for n, out in ours.items():
        cfg = hooks.MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, threshold=0.5, num_inference_steps=n)
        pipe.transformer.enable_cache(cfg)
        theirs = run_dit(pipe, PROMPTS[:1], steps=n)
        pipe.transformer.disable_cache()
        assert torch.equal(out, theirs), n


# -- SD3: no CacheMixin, no cache context from the pipeline ------------------------------------
# name -> (params, diffusers' apply function, its config for ``t()``), on SD3 and PixArt
BY_HAND = {
    "first-block-cache": (
        {"threshold": 2.0},
        hooks.apply_first_block_cache,
        lambda t: hooks.FirstBlockCacheConfig(threshold=2.0),
    ),
    "pyramid-attention-broadcast": (
        {"spatial_attention_timestep_skip_range": [0, 1000]},
        hooks.apply_pyramid_attention_broadcast,
        lambda t: hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=t,
        ),
    ),
    "faster-cache": (
        {},
        hooks.apply_faster_cache,
        lambda t: hooks.FasterCacheConfig(tensor_format="BCHW", current_timestep_callback=t),
    ),
    "taylorseer-cache": (
        CASES["taylorseer-cache"][0],
        hooks.apply_taylorseer_cache,
        CASES["taylorseer-cache"][1],
    ),
    "mag-cache": (
        {"mag_ratios": [1.0, 1.1, 1.0], "threshold": 0.5, "retention_ratio": 0.1},
        hooks.apply_mag_cache,
        lambda t: hooks.MagCacheConfig(
            mag_ratios=[1.0, 1.1, 1.0],
            threshold=0.5,
            retention_ratio=0.1,
            num_inference_steps=STEPS,
        ),
    ),
}


@pytest.mark.parametrize("name", ["pyramid-attention-broadcast", "taylorseer-cache", "mag-cache"])
def test_sd3_equals_apply_by_hand(name):
    """SD3: no CacheMixin, no cache context from the pipeline; decodekit gives both."""
    params, apply, make_config = BY_HAND[name]
    pipe = tiny_sd3_pipeline()
    with decodekit.attach(pipe, [strategy(name, **params)]) as run:
        ours = run_dit(pipe, PROMPTS, steps=STEPS)
    assert run.stats["strategies"][name].get("cached_calls", 1) > 0
    theirs = by_hand(
        pipe.transformer, apply, make_config, lambda: run_dit(pipe, PROMPTS, steps=STEPS)
    )
    assert torch.equal(ours, theirs)


class TestTaylorSeerContract(StrategyTesterMixin):
    """The contract on SD3, where decodekit gives the stateful hooks their context and resets them."""

    strategies = [strategy("taylorseer-cache", cache_interval=2, disable_cache_before_step=1)]

    def make_pipeline(self):
        pipe = tiny_sd3_pipeline()
        run_dit(pipe, PROMPTS[:1], steps=2)  # the per-call attributes broken_call sets exist
        return pipe

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        return run_dit(pipe, inputs, seed=seed, row_offset=row_offset, steps=4)

    def sample_inputs(self):
        return PROMPTS

    def broken_call(self, pipe):
        run_dit(pipe, PROMPTS[:1], steps=2, callback_on_step_end=_boom)


def test_first_block_cache_needs_two_blocks():
    pipe = tiny_sd3_pipeline()  # one joint block
    before = fingerprint(pipe)
    with pytest.raises(AttachError, match="SD3Transformer2DModel: it has fewer than two"):
        decodekit.attach(pipe, ["first-block-cache"])
    assert_restored(before, fingerprint(pipe))


def two_block_sd3():
    """tiny SD3 with two joint blocks: the last one is context_pre_only, as in SD3."""
    from diffusers import SD3Transformer2DModel

    pipe = tiny_sd3_pipeline()
    pipe.transformer = SD3Transformer2DModel(
        **{**pipe.transformer.config, "num_layers": 2}  # the config's other fields as they are
    )
    return pipe


def test_first_block_cache_refuses_sd3_whose_last_block_returns_no_encoder_states():
    pipe = two_block_sd3()
    with pytest.raises(TypeError):  # diffusers by hand fails at the first call
        by_hand(
            pipe.transformer,
            hooks.apply_first_block_cache,
            lambda t: hooks.FirstBlockCacheConfig(threshold=0.1),
            lambda: run_dit(pipe, PROMPTS, steps=STEPS),
        )
    pipe = two_block_sd3()
    before = fingerprint(pipe)
    with pytest.raises(AttachError, match="SD3Transformer2DModel: its last block returns no"):
        decodekit.attach(pipe, ["first-block-cache"])
    assert_restored(before, fingerprint(pipe))


def test_a_cache_the_user_enabled_is_refused():
    pipe = tiny_flux_pipeline()
    pipe.transformer.enable_cache(hooks.FirstBlockCacheConfig())
    with pytest.raises(AttachError, match="already has a diffusers cache enabled.*disable_cache"):
        decodekit.attach(pipe, ["taylorseer-cache"])
    assert isinstance(pipe.transformer._cache_config, hooks.FirstBlockCacheConfig)


def test_faster_cache_refusals_at_the_first_call_leave_the_pipe_plain(flux_baseline):
    pipe = tiny_flux_pipeline()  # no batched CFG
    with pytest.raises(DecodekitError, match="is_guidance_distilled: true"):
        with decodekit.attach(pipe, ["faster-cache"]):
            run_dit(pipe, PROMPTS, steps=STEPS)
    with pytest.raises(DecodekitError, match="first step's timestep 1000 lies inside"):
        with decodekit.attach(
            pipe,
            [
                strategy(
                    "faster-cache",
                    is_guidance_distilled=True,
                    spatial_attention_timestep_skip_range=[0, 1001],
                )
            ],
        ):
            run_dit(pipe, PROMPTS, steps=STEPS)
    assert torch.equal(run_dit(pipe, PROMPTS, steps=STEPS), flux_baseline)
    sd3 = tiny_sd3_pipeline()  # batched CFG, but pooled_projections are not halved by diffusers
    with pytest.raises(DecodekitError, match="pooled_projections"):
        with decodekit.attach(sd3, ["faster-cache"]):
            run_dit(sd3, PROMPTS, steps=STEPS)


PIXART = {"use_resolution_binning": False}


@pytest.mark.filterwarnings("ignore:torch.meshgrid")  # diffusers' FasterCache frequency split
@pytest.mark.parametrize(
    "name", ["first-block-cache", "pyramid-attention-broadcast", "faster-cache", "mag-cache"]
)
def test_pixart_equals_apply_by_hand(name):
    """PixArt: batched classifier-free guidance, attention layers named attn1/attn2."""
    params, apply, make_config = BY_HAND[name]
    pipe = tiny_pixart_pipeline()
    with decodekit.attach(pipe, [strategy(name, **params)]) as run:
        ours = run_dit(pipe, PROMPTS, steps=STEPS, **PIXART)
    assert run.stats["strategies"][name].get("cached_calls", 1) > 0
    theirs = by_hand(
        pipe.transformer, apply, make_config, lambda: run_dit(pipe, PROMPTS, steps=STEPS, **PIXART)
    )
    assert torch.equal(ours, theirs)


SANA = {"use_resolution_binning": False, "complex_human_instruction": None}


def test_sana_runs_what_diffusers_can_hook_and_refuses_the_rest():
    pipe = (
        tiny_sana_pipeline()
    )  # one linear-attention block of a class diffusers has no metadata for
    base = run_dit(pipe, PROMPTS, steps=STEPS, **SANA)
    before = fingerprint(pipe.transformer)
    for name in ("pyramid-attention-broadcast", "faster-cache"):
        params = BY_HAND[name][0]
        with decodekit.attach(pipe, [strategy(name, **params)]):
            assert not torch.equal(run_dit(pipe, PROMPTS, steps=STEPS, **SANA), base), name
        assert_restored(before, fingerprint(pipe.transformer))
    with pytest.raises(AttachError, match="SanaTransformerBlock.*not registered"):
        decodekit.attach(pipe, [strategy("mag-cache", mag_ratios="flux")])
    assert_restored(before, fingerprint(pipe.transformer))
    assert torch.equal(run_dit(pipe, PROMPTS, steps=STEPS, **SANA), base)


TRUE_CFG = {"negative_prompt": "", "true_cfg_scale": 3.0}
TIMESTEP_CASES = {  # timestep ranges inside the schedule, so a wrong timestep changes the output
    "pyramid-attention-broadcast": (
        {"spatial_attention_timestep_skip_range": [100, 800]},
        lambda t: hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=t,
        ),
    ),
    "faster-cache": (
        {"is_guidance_distilled": True, "spatial_attention_timestep_skip_range": [-1, 700]},
        lambda t: hooks.FasterCacheConfig(
            is_guidance_distilled=True,
            spatial_attention_timestep_skip_range=(-1, 700),
            tensor_format="BCHW",
            current_timestep_callback=t,
        ),
    ),
}


@pytest.mark.parametrize("name", list(TIMESTEP_CASES))
def test_flux_true_cfg_calls_get_their_loop_steps_timestep(name):
    """Flux with ``true_cfg_scale`` calls the transformer twice a loop step (cond, uncond): both
    calls read that step's timestep, as ``pipe.current_timestep`` gives diffusers by hand."""
    params, make_config = TIMESTEP_CASES[name]
    pipe = tiny_flux_pipeline()
    with decodekit.attach(pipe, [strategy(name, **params)]):
        ours = run_dit(pipe, PROMPTS, steps=8, **TRUE_CFG)
    pipe.transformer.enable_cache(make_config(lambda: pipe.current_timestep))
    theirs = run_dit(pipe, PROMPTS, steps=8, **TRUE_CFG)
    pipe.transformer.disable_cache()
    assert torch.equal(ours, theirs)
