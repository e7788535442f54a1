"""deep-cache: DeepCache's shallow-branch steps, against the DeepCache package, on tiny SD, SDXL, ControlNet."""

from __future__ import annotations

import ast
import functools
import math
import warnings
from pathlib import Path

import decodekit
import numpy as np
import pytest
import torch
from decodekit import compat
from decodekit.plugins.deep_cache import (
    DeepCache,
    DeepCacheParams,
    full_steps_for,
    quadratic_full_steps,
    skipped_modules,
    uniform_full_steps,
)
from decodekit.testing import (
    StrategyTesterMixin,
    assert_restored,
    fingerprint,
    sd_latents,
    tiny_controlnet_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
    tiny_unet,
)
from PIL import Image

PROMPTS = ["a small red circle", "a big blue square on the right"]


def dc(**params) -> DeepCache:
    """A deep-cache strategy object (attach takes it as it takes a name or a dict)."""
    return DeepCache(params)


def deep_sd_pipeline():
    """A tiny SD pipeline whose UNet has SD 1.5's 2 layers per block and 3 blocks: 8 skip branches."""
    from diffusers import StableDiffusionPipeline

    base = tiny_sd_pipeline()
    torch.manual_seed(1)
    unet = tiny_unet(
        layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


MAKERS = {
    "sd": tiny_sd_pipeline,
    "sd-deep": deep_sd_pipeline,
    "sdxl": tiny_sdxl_pipeline,
    "controlnet": tiny_controlnet_pipeline,
    "euler": functools.partial(tiny_sd_pipeline, scheduler="euler"),
    "heun": functools.partial(tiny_sd_pipeline, scheduler="heun"),
}


@functools.cache
def shared(kind: str, dtype: torch.dtype = torch.float32):
    """One pipeline per kind for the whole module: detach restores it exactly."""
    return MAKERS[kind]().to(dtype)


def run(kind: str, pipe, steps: int = 8, prompts=PROMPTS, **kw):
    """One seeded call; returns the final latents (B, 4, 8, 8)."""
    rows = 1 if prompts is None else len(prompts)  # one row for prompt_embeds
    latents = sd_latents(pipe, rows, seed=0).to(pipe.unet.dtype)
    if kind == "sdxl":
        kw.update(height=32, width=32)
    elif kind == "controlnet":  # a seeded random RGB condition, 32x32 like the images
        pixels = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))
        kw.update(image=Image.fromarray((pixels * 255).to(torch.uint8).numpy()))
    return pipe(
        prompts, num_inference_steps=steps, latents=latents, output_type="latent", **kw
    ).images


def with_package(pipe, fn, **params):
    """``fn()`` with the DeepCache package's helper enabled on ``pipe`` (its ``set_params``)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(**params)
    helper.enable()
    try:
        return fn()
    finally:
        helper.disable()


def package_quad_center():
    """The package's ``sample_from_quad_center``, read from its source: the module that holds it
    imports names diffusers 0.42 no longer has, so it is compiled alone (numpy is its only name)."""
    import DeepCache

    source = Path(DeepCache.__file__).parent / "sd/pipeline_stable_diffusion.py"
    tree = ast.parse(source.read_text())
    (fn,) = [n for n in tree.body if getattr(n, "name", None) == "sample_from_quad_center"]
    namespace = {"np": np}
    exec(compile(ast.Module([fn], []), str(source), "exec"), namespace)
    return namespace["sample_from_quad_center"]


# -- the package as the oracle ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,interval,branch",
    [
        ("sd", 2, 0),
        ("sd", 3, 1),
        ("sd", 3, 3),
        ("sd", 2, 4),
        ("sdxl", 3, 0),
        ("controlnet", 3, 0),
    ],
)
def test_equals_the_deepcache_package(kind, interval, branch):
    pipe = shared(kind)
    params = {"interval": interval, "branch": branch}
    if kind == "controlnet":
        params["controlnet"] = "every-step"  # the package leaves the ControlNet alone
    theirs = with_package(
        pipe, lambda: run(kind, pipe), cache_interval=interval, cache_branch_id=branch
    )
    with decodekit.attach(pipe, [dc(**params)]) as r:
        ours = run(kind, pipe)
    assert torch.equal(ours, theirs)
    st = r.stats["strategies"]["deep-cache"]
    assert st["full_steps"] == list(range(0, 8, interval))
    assert (r.last["nfe"], r.last["served"]) == (st["full_calls"], st["shallow_calls"])
    assert st["shallow_calls"] == 8 - len(st["full_steps"]) > 0
    assert not torch.equal(ours, run(kind, pipe))  # the shallow steps did change the result


def test_every_branch_of_an_sd15_layout_equals_the_package():
    """Two layers per block as SD 1.5: branch ids 0..8 are (block, layer) = divmod(id, 3)."""
    pipe = shared("sd-deep")
    for branch in range(9):
        theirs = with_package(
            pipe, lambda: run("sd", pipe, steps=5), cache_interval=2, cache_branch_id=branch
        )
        with decodekit.attach(pipe, [dc(interval=2, branch=branch)]) as r:
            ours = run("sd", pipe, steps=5)
        assert torch.equal(ours, theirs), branch
        st = r.stats["strategies"]["deep-cache"]
        assert (st["block"], st["layer"]) == divmod(branch, 3)
    # block/layer name the same branch as the package's id
    with decodekit.attach(pipe, [dc(interval=2, block=1, layer=2)]):
        same = run("sd", pipe, steps=5)
    with decodekit.attach(pipe, [dc(interval=2, branch=5)]):
        assert torch.equal(run("sd", pipe, steps=5), same)


def test_skipped_modules_deepen_with_the_branch():
    unet = shared("sd-deep").unet
    names = {b: {n for n, _ in skipped_modules(unet, *divmod(b, 3))} for b in range(9)}
    assert names[0] == {
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2.resnets.0",
        "up_blocks.2.attentions.0",
        "up_blocks.2.resnets.1",
        "up_blocks.2.attentions.1",
    }
    assert names[2] == {
        "down_blocks.0.downsamplers.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    }
    assert names[8] == {"mid_block"}  # the deepest block, its last branch: only the mid block


# -- schedules ---------------------------------------------------------------------------------------
def test_uniform_and_explicit_schedules():
    assert uniform_full_steps(10, 3) == [0, 3, 6, 9]
    assert full_steps_for(DeepCacheParams(interval=1), 4) == [0, 1, 2, 3]
    assert full_steps_for(DeepCacheParams(interval=4), 10) == [0, 4, 8]
    assert full_steps_for(DeepCacheParams(full_steps=[5, 0, 2, 2]), 6) == [0, 2, 5]


@pytest.mark.parametrize(
    "steps,interval,center,power",
    [(50, 5, 15, 1.4), (50, 3, 15, 1.4), (50, 2, 15, 1.4), (50, 10, 15, 1.4), (20, 3, 5, 1.4),
     (10, 3, 15, 1.4), (50, 5, 0, 1.4), (25, 4, 8, 1.2), (30, 7, 12, 1.6)],
)  # fmt: skip
def test_non_uniform_schedule_is_the_packages(steps, interval, center, power):
    count = math.ceil(steps / interval)
    with warnings.catch_warnings(action="ignore"):  # numpy: "casting complex values to real"
        theirs, _ = package_quad_center()(steps, count, center=center, pow=power)
    ours = quadratic_full_steps(steps, count, center, power)
    assert ours == [int(x) for x in theirs] and len(ours) == count
    params = DeepCacheParams(interval=interval, schedule="non-uniform", center=center, pow=power)
    assert full_steps_for(params, steps) == sorted(set(ours))


def test_non_uniform_schedule_documented_values():
    # The package's script setting: interval 5, pow 1.4, center 15 on 50 steps.
    params = DeepCacheParams(interval=5, schedule="non-uniform")
    assert full_steps_for(params, 50) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]


def test_non_uniform_run_uses_those_full_steps():
    pipe = shared("sd")
    params = DeepCacheParams(interval=3, schedule="non-uniform", center=4)
    expected = full_steps_for(params, 10)
    assert expected != uniform_full_steps(10, 3)
    with decodekit.attach(pipe, [dc(interval=3, schedule="non-uniform", center=4)]) as r:
        out = run("sd", pipe, steps=10)
    assert r.stats["strategies"]["deep-cache"]["full_steps"] == expected
    with decodekit.attach(pipe, [dc(full_steps=expected)]) as r2:
        assert torch.equal(run("sd", pipe, steps=10), out)
    assert r2.last["nfe"] == len(expected)


def test_repeated_timesteps_counted_by_call_where_the_package_is_not():
    """Euler with custom timesteps that repeat: steps by call index (0, 2, 4, 6 full at interval 2);
    the package looks each timestep up with ``timesteps.index(t)`` and runs calls 0, 4, 5, 6 in full."""
    pipe = shared("euler")
    timesteps = [900, 700, 700, 500, 300, 300, 100]

    def call():
        calls, full = [], []  # UNet call index; calls where the mid block really ran
        h1 = pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(len(calls)))
        h2 = pipe.unet.mid_block.resnets[0].register_forward_hook(
            lambda m, a, o: full.append(calls[-1])
        )
        try:
            out = pipe(
                PROMPTS[:1],
                timesteps=timesteps,
                latents=sd_latents(pipe, 1, 0),
                output_type="latent",
            ).images
        finally:
            h1.remove()
            h2.remove()
        return out, full

    theirs, theirs_full = with_package(pipe, call, cache_interval=2, cache_branch_id=0)
    with decodekit.attach(pipe, [dc(interval=2)]) as r:
        ours, ours_full = call()
    assert ours_full == r.stats["strategies"]["deep-cache"]["full_steps"] == [0, 2, 4, 6]
    assert theirs_full == [0, 4, 5, 6]
    assert not torch.equal(ours, theirs)


# -- exactness and step counting -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd", "controlnet"])
def test_interval_one_equals_the_baseline(kind):
    pipe = shared(kind)
    base = run(kind, pipe)
    with decodekit.attach(pipe, [dc(interval=1)]) as r:
        out = run(kind, pipe)
    assert torch.equal(out, base)
    assert (r.last["nfe"], r.last["served"]) == (8, 0)
    assert r.ideal_speedup() == pytest.approx(1.0)


def test_outputs_part_at_the_first_shallow_step():
    pipe = shared("sd")

    def latents_per_step(strategies) -> list[torch.Tensor]:
        steps: list[torch.Tensor] = []

        def keep(p, i, t, kw):
            steps.append(kw["latents"].clone())
            return {}

        with decodekit.attach(pipe, strategies):
            run("sd", pipe, callback_on_step_end=keep)
        return steps

    base, ours = latents_per_step([]), latents_per_step([dc(full_steps=[0, 1, 2, 5])])
    assert [torch.equal(a, b) for a, b in zip(base, ours)][:4] == [True, True, True, False]


def test_heun_counts_solver_steps():
    # Heun: 7 calls for 4 steps; full steps 0 and 2 are calls 0, 1, 4, 5.
    pipe = shared("heun")
    with decodekit.attach(pipe, [dc(interval=2)]) as r:
        run("sd", pipe, steps=4)
    st = r.stats["strategies"]["deep-cache"]
    assert (st["full_calls"], st["shallow_calls"]) == (4, 3)


def test_cfg_off_and_images_per_prompt_equal_the_package():
    pipe = shared("sd")

    def call():  # 2 prompts x 2 images, no unconditional rows
        kw = {"guidance_scale": 1.0, "num_images_per_prompt": 2, "output_type": "latent"}
        return pipe(PROMPTS, num_inference_steps=7, latents=sd_latents(pipe, 4, 0), **kw).images

    theirs = with_package(pipe, call, cache_interval=3, cache_branch_id=0)
    with decodekit.attach(pipe, [dc(interval=3)]) as r:
        ours = call()
    assert ours.shape[0] == 4 and torch.equal(ours, theirs)
    assert r.stats["strategies"]["deep-cache"]["shallow_calls"] == 4


# -- ControlNet, composition, FLOPs ---------------------------------------------------------------
def test_controlnet_runs_only_on_full_steps_by_default():
    pipe = shared("controlnet")
    base = run("controlnet", pipe)
    every = {}
    for mode in ("full-steps", "every-step"):
        with decodekit.attach(pipe, [dc(interval=3, controlnet=mode)]) as r:
            every[mode] = run("controlnet", pipe)
        every[mode + " aux"] = (r.adapter.aux_nfe, r.adapter.aux_served)
    assert every["full-steps aux"] == (3, 5) and every["every-step aux"] == (8, 0)
    # Reused residuals feed only the shallow skips: close to the every-step run.
    err = float((every["full-steps"] - every["every-step"]).norm() / base.norm())
    assert 0 < err < 0.2


def test_composes_with_prior_noise_and_refuses_a_second_denoiser_cache():
    pipe = shared("sd")
    with decodekit.attach(pipe, ["prior-noise"]):
        noise_only = run("sd", pipe)
    with decodekit.attach(pipe, [dc(interval=1), "prior-noise"]) as r:
        assert torch.equal(run("sd", pipe), noise_only)
    with decodekit.attach(pipe, [dc(interval=2), "prior-noise"]) as r:
        both = run("sd", pipe)
    st = r.stats["strategies"]
    assert st["prior-noise"]["injected_steps"] > 0 and st["deep-cache"]["shallow_calls"] == 4
    assert not torch.equal(both, noise_only)
    with pytest.raises(decodekit.CompositionError, match="both fill the 'denoiser-cache' slot"):
        decodekit.attach(pipe, [dc(), "faster-diffusion"])


@pytest.mark.parametrize("kind,params", [("sd", {"branch": 1}), ("controlnet", {})])
def test_ideal_speedup_is_the_ratio_of_the_loops_counted_flops(kind, params):
    from torch.utils.flop_counter import FlopCounterMode

    pipe = shared(kind)
    embeds, negative = pipe.encode_prompt("a red circle", "cpu", 1, True)

    def loop_flops() -> int:
        with FlopCounterMode(display=False) as counter:
            run(kind, pipe, prompts=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
        return counter.get_total_flops()

    baseline = loop_flops()
    with decodekit.attach(pipe, [dc(interval=3, **params)]) as r:
        ours = loop_flops()
    assert 0 < ours < baseline
    assert r.ideal_speedup() == pytest.approx(baseline / ours, rel=1e-9)


# -- the parallel shallow steps -------------------------------------------------------------------
def test_parallel_batches_the_shallow_steps_after_each_full_step():
    pipe = shared("sd", torch.float64)
    preds = {}
    step = pipe.scheduler.step
    for parallel in (False, True):
        seen: list[torch.Tensor] = []

        def record(model_output, *args, seen=seen, **kwargs):
            seen.append(model_output.clone())
            return step(model_output, *args, **kwargs)

        pipe.scheduler.step = record
        try:
            with decodekit.attach(pipe, [dc(interval=4, parallel=parallel)]) as r:
                run("sd", pipe, steps=10)
        finally:
            del pipe.scheduler.step
        preds[parallel] = torch.stack(seen)  # (10, B, 4, 8, 8)
        st = r.stats["strategies"]["deep-cache"]
        assert (st["full_calls"], st["shallow_calls"]) == (3, 7)
        assert st["shallow_batches"] == (3 if parallel else 7)
    # Up to the first shallow step of the first group both run the same computation;
    # the group's later steps reuse that step's shallow encoder features.
    torch.testing.assert_close(preds[True][:2], preds[False][:2], rtol=0, atol=1e-10)
    assert not torch.allclose(preds[True][2], preds[False][2], rtol=0, atol=1e-6)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,msg",
    [
        ({"interval": 0}, "greater than or equal to 1"),
        ({"full_steps": [2, 4]}, "must include step 0"),
        ({"full_steps": [0, 3], "interval": 2}, "full_steps replaces interval"),
        ({"pow": 1.2}, "add schedule: non-uniform"),
        ({"layer": 1}, "layer needs block"),
        ({"branch": 1, "block": 0}, "not both"),
        ({"pow": 1.0, "schedule": "non-uniform"}, "greater than 1"),
        ({"max_group": 4}, "max_group applies to parallel"),
    ],
)
def test_bad_params_are_clear_errors(params, msg):
    with pytest.raises(decodekit.ConfigError, match=msg) as e:
        DeepCache(params, path="strategies.0.params")
    assert e.value.path.startswith("strategies.0.params")


@pytest.mark.parametrize(
    "params,msg",
    [
        ({"branch": 2}, r"branch 2 \(block 0, layer 2\) does not exist.*Valid branch values: \[0, 1, 3, 4\]"),
        ({"branch": 6}, "branch 6 .* does not exist"),
        ({"block": 0, "layer": 3}, "block 0, layer 3 does not exist"),
    ],
)  # fmt: skip
def test_a_branch_this_unet_lacks_is_refused_with_nothing_changed(params, msg):
    pipe = shared("sd")
    before = fingerprint(pipe)
    with pytest.raises(decodekit.AttachError, match=msg):
        decodekit.attach(pipe, [dc(**params)])
    assert_restored(before, fingerprint(pipe))


def test_full_steps_past_the_last_step_is_a_clear_error():
    pipe = shared("sd")
    with pytest.raises(decodekit.DecodekitError, match=r"\[9\] past the last step"):
        with decodekit.attach(pipe, [dc(full_steps=[0, 9])]):
            run("sd", pipe, steps=4)


def test_impossible_non_uniform_spacing_is_a_clear_error():
    # 3 full steps over 6 around step 3: no power in (1, 1.4] spaces them apart (nor in the package)
    with warnings.catch_warnings(action="ignore"), pytest.raises(ValueError, match="Cannot find"):
        package_quad_center()(6, 3, center=3, pow=1.4)
    pipe = shared("sd")
    with pytest.raises(decodekit.DecodekitError, match=r"no pow in \(1, 1.4\] spaces 3 full"):
        with decodekit.attach(pipe, [dc(interval=2, schedule="non-uniform", center=3)]):
            run("sd", pipe, steps=6)


# -- the shared contract --------------------------------------------------------------------------
class TestDeepCacheContract(StrategyTesterMixin):
    """The contract on a ControlNet pipeline: its ControlNet is hooked too, and skipped."""

    atol = 1e-3  # float32 batched convolutions differ by ~1e-4 on latents of magnitude ~70
    strategies = [dc(interval=2, branch=1)]

    def make_pipeline(self):
        return tiny_controlnet_pipeline()

    def sample_inputs(self):
        return PROMPTS

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        latents = sd_latents(pipe, len(inputs), seed, row_offset)
        image = Image.new("RGB", (32, 32), (200, 40, 90))  # one condition for every row
        steps = {"num_inference_steps": 5, "output_type": "latent"}
        return pipe(inputs, image=image, latents=latents, **steps).images

    def broken_call(self, pipe):
        embeds = torch.zeros(1, 4, 32)  # and a prompt too: the pipeline's check_inputs refuses both
        pipe("a red circle", image=Image.new("RGB", (32, 32)), prompt_embeds=embeds)

    def test_detach_removes_the_block_hooks(self):
        pipe = self.make_pipeline()
        with decodekit.attach(pipe, self.strategies) as r:
            names = [n for n, _ in r.strategies[0].skipped]
            hooked = [m for n, m in pipe.unet.named_modules() if compat.hook_registry(m)]
            assert len(hooked) == len(names) + 1  # the skipped modules and the UNet itself
            self.run_pipeline(pipe, PROMPTS[:1], seed=0)
            assert (r.adapter.aux_nfe, r.adapter.aux_served) == (3, 2)
        assert not any(compat.hook_registry(m) for m in pipe.unet.modules())
