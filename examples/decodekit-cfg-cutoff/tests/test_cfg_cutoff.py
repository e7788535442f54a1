"""cfg-cutoff on a tiny random Stable Diffusion pipeline built from configs (no download).

The pipeline and its seeded latents come from `decodekit.testing` (`tiny_sd_pipeline`,
`sd_latents`): a plugin package depends on `decodekit`, not on its test folder.
"""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.testing import (
    StrategyTesterMixin,
    assert_restored,
    fingerprint,
    sd_latents,
    tiny_sd_pipeline,
)
from decodekit_cfg_cutoff import CfgCutoff

torch.set_num_threads(2)
STEPS = 6


def generate(pipe, prompts, seed=0, row_offset=0, output_type="np", **kw):
    out = pipe(
        prompts,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=sd_latents(pipe, len(prompts), seed, row_offset),
        output_type=output_type,
        **kw,
    ).images
    return torch.as_tensor(out)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def unet_batches(pipe):
    """Record the batch size of every UNet call; returns (list, remove-callable)."""
    seen: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen, handle.remove


# -- the claims -------------------------------------------------------------------------
def test_registered_from_its_entry_point():
    info = decodekit.get_manager().origin("strategies", "cfg-cutoff")
    assert decodekit.get_manager().strategy("cfg-cutoff") is CfgCutoff
    assert info.package == "decodekit-cfg-cutoff"


def test_fraction_one_equals_baseline_exactly(pipe):
    base = generate(pipe, ["a red circle"])
    with decodekit.attach(pipe, [{"name": "cfg-cutoff", "params": {"fraction": 1.0}}]) as run:
        out = generate(pipe, ["a red circle"])
    assert torch.equal(out, base)
    stats = run.stats["strategies"]["cfg-cutoff"]
    assert stats == {**stats, "steps_with_cfg": STEPS, "steps_without_cfg": 0, "cutoff_step": None}


@pytest.mark.parametrize("fraction, guided", [(0.5, 3), (0.34, 3), (0.2, 2), (0.01, 1)])
def test_unet_batch_halves_after_the_cutoff(pipe, fraction, guided):
    prompts = ["a red circle", "a blue square"]
    seen, remove = unet_batches(pipe)
    try:
        with decodekit.attach(
            pipe, [{"name": "cfg-cutoff", "params": {"fraction": fraction}}]
        ) as run:
            generate(pipe, prompts, output_type="latent")
    finally:
        remove()
    assert seen == [4] * guided + [2] * (STEPS - guided)
    stats = run.stats["strategies"]["cfg-cutoff"]
    assert (stats["steps_with_cfg"], stats["steps_without_cfg"]) == (guided, STEPS - guided)
    assert stats["cutoff_step"] == guided - 1
    assert run.ideal_speedup() == pytest.approx(2 * STEPS / (2 * guided + STEPS - guided))


def test_cutoff_changes_the_output_and_matches_a_hand_written_loop(pipe):
    """After the cut-off the loop is plain conditional denoising: check against a reference loop."""
    prompt = ["a green triangle"]
    with decodekit.attach(pipe, [{"name": "cfg-cutoff", "params": {"fraction": 0.5}}]):
        out = generate(pipe, prompt, output_type="latent")

    # Reference: the same DDIM loop, guided for 3 steps, conditional only for the last 3.
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    pipe.scheduler.set_timesteps(STEPS)
    latents = sd_latents(pipe, 1, 0) * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(pipe.scheduler.timesteps):
            if i < 3:
                eps_u, eps_c = pipe.unet(
                    torch.cat([latents] * 2), t, encoder_hidden_states=embeds
                ).sample.chunk(2)
                eps = eps_u + 7.5 * (eps_c - eps_u)
            else:
                eps = pipe.unet(latents, t, encoder_hidden_states=cond).sample
            latents = pipe.scheduler.step(eps, t, latents).prev_sample
    torch.testing.assert_close(out, latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, generate(pipe, prompt, output_type="latent"))


def test_detach_restores_the_pipeline(pipe):
    base = generate(pipe, ["a blue square"])
    before = fingerprint(pipe)
    with decodekit.attach(pipe, ["cfg-cutoff"]):
        generate(pipe, ["a blue square"])
        assert pipe._guidance_scale == 7.5  # put back at the end of the call
    assert_restored(before, fingerprint(pipe))
    assert torch.equal(generate(pipe, ["a blue square"]), base)
    seen, remove = unet_batches(pipe)
    try:
        generate(pipe, ["a blue square"], output_type="latent")
    finally:
        remove()
    assert seen == [2] * STEPS


def test_bad_fraction_names_the_key(pipe):
    with pytest.raises(decodekit.ConfigError, match=r"strategies\.0\.params\.fraction"):
        decodekit.attach(pipe, [{"name": "cfg-cutoff", "params": {"fraction": 0.0}}])


def test_refuses_a_pipeline_it_cannot_handle(pipe):
    """A pipeline class outside SUPPORTED_PIPELINES is refused at attach, and left untouched."""
    from diffusers import DiffusionPipeline

    class OtherPipeline(DiffusionPipeline):  # a UNet pipeline that is not SD's
        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        _callback_tensor_inputs = ["latents", "prompt_embeds"]

        def __call__(self, callback_on_step_end=None, callback_on_step_end_tensor_inputs=None):
            raise NotImplementedError

    other = OtherPipeline(pipe.unet, pipe.scheduler)
    before = fingerprint(other)
    with pytest.raises(decodekit.DecodekitError, match="cfg-cutoff supports"):
        decodekit.attach(other, ["cfg-cutoff"], pipeline="stable-diffusion")
    assert_restored(before, fingerprint(other))


def fail_at_step(at: int):
    """A user step callback that raises at loop step ``at`` (to test detach on an exception)."""

    def callback(pipe, i, t, callback_kwargs):
        if i == at:
            raise RuntimeError("boom")
        return callback_kwargs

    return callback


def test_exception_after_the_cutoff_restores_guidance(pipe):
    run = decodekit.attach(pipe, ["cfg-cutoff"])
    with pytest.raises(RuntimeError, match="boom"):
        generate(pipe, ["a red circle"], output_type="latent", callback_on_step_end=fail_at_step(4))
    assert run.stats["strategies"]["cfg-cutoff"]["cutoff_step"] == 2
    assert not run.attached
    assert pipe._guidance_scale == 7.5


class TestCfgCutoffContract(StrategyTesterMixin):
    """decodekit's shared contract tests (restore, attach twice, reset, seeds, batch, exceptions)."""

    strategies = [{"name": "cfg-cutoff", "params": {"fraction": 0.5}}]
    atol = 1e-12  # float64: rows of a batch equal the rows run alone

    def make_pipeline(self):
        pipe = tiny_sd_pipeline().to(torch.float64)
        self.run_pipeline(
            pipe, ["a red circle"], seed=0
        )  # a called pipeline has its per-call attributes
        return pipe

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        latents = sd_latents(pipe, len(inputs), seed, row_offset).double()
        return pipe(
            inputs,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            latents=latents,
            output_type="latent",
        ).images

    def sample_inputs(self):
        return ["a red circle", "a blue square"]

    def broken_call(self, pipe):
        latents = sd_latents(pipe, 1, 0).double()
        pipe(
            ["a red circle"],
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            latents=latents,
            output_type="latent",
            callback_on_step_end=fail_at_step(4),
        )
