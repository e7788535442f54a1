"""The stable-diffusion adapter: hooks called at the right points, steps counted by call, exact restore."""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit import Strategy, hookimpl
from decodekit.testing import (
    StrategyTesterMixin,
    assert_restored,
    fingerprint,
    run_sd,
    sd_latents,
    tiny_controlnet_pipeline,
    tiny_sd_img2img_pipeline,
    tiny_sd_pipeline,
)


class Recorder(Strategy):
    """Records the hook calls it sees, serving nothing."""

    name = "recorder"
    loops = ("continuous-denoising",)

    def reset(self, run):
        self.events = []

    @hookimpl
    def decodekit_call_start(self, run, call_kwargs):
        self.events.append(("start",))

    @hookimpl
    def decodekit_denoiser_forward(self, run, step, module, args, kwargs):
        self.events.append(("forward", step))

    @hookimpl
    def decodekit_denoiser_output(self, run, step, module, args, kwargs, output):
        self.events.append(("output", step))

    @hookimpl
    def decodekit_step_end(self, run, step, timestep, callback_kwargs):
        self.events.append(("step_end", step))

    @hookimpl
    def decodekit_call_end(self, run, output):
        self.events.append(("end",))


class ServeCached(Strategy):
    """Serves every odd step with the previous step's output (a crude denoiser cache)."""

    name = "serve-cached"
    loops = ("continuous-denoising",)
    slot = "denoiser-cache"

    def reset(self, run):
        self.last = None

    @hookimpl
    def decodekit_denoiser_forward(self, run, step, role, args, kwargs):
        if role == "denoiser" and step % 2 == 1 and self.last is not None:
            return self.last

    @hookimpl
    def decodekit_denoiser_output(self, run, step, role, output):
        if role == "denoiser":
            self.last = output


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def test_hooks_called_in_loop_order(pipe):
    rec = Recorder()
    with decodekit.attach(pipe, [rec]) as run:
        run_sd(pipe, ["a red circle"], steps=3)
    assert rec.events == [("start",)] + [
        e for s in range(3) for e in (("forward", s), ("output", s), ("step_end", s))
    ] + [("end",)]
    assert run.stats["nfe"] == 3 and run.stats["served"] == 0 and run.stats["calls"] == 1


def test_no_strategy_is_exact_and_counts(pipe):
    base = run_sd(pipe, ["a red circle", "a blue square"])
    with decodekit.attach(pipe, []) as run:
        out = run_sd(pipe, ["a red circle", "a blue square"])
    assert torch.equal(base, out)
    assert run.stats["nfe"] == 6


def test_served_calls_counted_and_change_output(pipe):
    base = run_sd(pipe, ["a red circle"])
    with decodekit.attach(pipe, [ServeCached()]) as run:
        out = run_sd(pipe, ["a red circle"])
    assert run.last == {"nfe": 3, "served": 3, "time_s": run.last["time_s"]}
    assert not torch.equal(base, out)


@pytest.mark.parametrize("scheduler,calls", [("ddim", 4), ("dpm", 4), ("euler", 4), ("heun", 7)])
def test_steps_counted_by_call_not_timestep(scheduler, calls):
    p = tiny_sd_pipeline(scheduler=scheduler)
    rec = Recorder()
    with decodekit.attach(p, [rec]) as run:
        p("a red circle", num_inference_steps=4, output_type="latent")
    steps = [e[1] for e in rec.events if e[0] == "forward"]
    assert steps == list(
        range(calls)
    )  # Heun calls the UNet twice per step but once per loop iteration
    assert run.adapter.scheduler_order == (2 if scheduler == "heun" else 1)


def test_user_callback_still_called(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, tuple(kw)))
        return {"latents": kw["latents"] * 1.0}

    with decodekit.attach(pipe, [Recorder()]):
        run_sd(pipe, ["a red circle"], steps=2, callback_on_step_end=cb)
    assert seen == [(0, ("latents",)), (1, ("latents",))]


def test_exception_inside_call_detaches_and_reraises(pipe):
    before = fingerprint(pipe)
    run = decodekit.attach(pipe, [Recorder()])
    with pytest.raises(ValueError):
        pipe("a red circle", num_inference_steps=2, height=30, width=30)  # not divisible by 8
    assert not run.attached
    assert_restored(before, fingerprint(pipe))


def test_strategy_on_wrong_loop_is_refused(pipe):
    class TextOnly(Strategy):
        name = "text-only"
        loops = ("token-autoregression",)

    before = fingerprint(pipe)
    with pytest.raises(
        decodekit.CompositionError, match="does not support the 'continuous-denoising'"
    ):
        decodekit.attach(pipe, [TextOnly()])
    assert_restored(before, fingerprint(pipe))


def test_two_denoiser_caches_refused(pipe):
    class Other(ServeCached):
        name = "other-cache"

    with pytest.raises(decodekit.CompositionError, match="both fill the 'denoiser-cache' slot"):
        decodekit.attach(pipe, [ServeCached(), Other()])


def test_failing_on_attach_leaves_pipeline_untouched(pipe):
    class Boom(Strategy):
        name = "boom"
        loops = ("continuous-denoising",)

        def on_attach(self, run):
            raise RuntimeError("boom")

    before = fingerprint(pipe)
    with pytest.raises(RuntimeError):
        decodekit.attach(pipe, [Boom()])
    assert_restored(before, fingerprint(pipe))
    with decodekit.attach(pipe, []):  # and it can be attached again
        pass


def test_initial_latents_recorded(pipe):
    latents = sd_latents(pipe, 1, seed=5)
    with decodekit.attach(pipe, [Recorder()]) as run:
        pipe("a red circle", num_inference_steps=2, latents=latents, output_type="latent")
        z_t = run.adapter.initial_latents
    assert torch.equal(z_t, latents * pipe.scheduler.init_noise_sigma)


class TestServeCachedContract(StrategyTesterMixin):
    """The shared contract, run on the adapter with a serving strategy."""

    atol = 1e-3  # float32 batched convolutions differ by ~1e-4 on latents of magnitude ~70

    @property
    def strategies(self):
        return [ServeCached()]

    def make_pipeline(self):
        return tiny_sd_pipeline()

    def sample_inputs(self):
        return ["a red circle", "a blue square on the left"]

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        return run_sd(pipe, inputs, seed=seed, row_offset=row_offset, steps=4)

    def broken_call(self, pipe):
        pipe("a red circle", num_inference_steps=2, height=30, width=30)


def test_controlnet_calls_routed_through_denoiser_hooks_and_restored():
    pipe = tiny_controlnet_pipeline()
    image = torch.zeros(1, 3, 32, 32)
    seen = []

    class Who(Strategy):
        name = "who"
        loops = ("continuous-denoising",)

        @hookimpl
        def decodekit_denoiser_forward(self, run, step, role, module):
            assert module is (pipe.unet if role == "denoiser" else pipe.controlnet)
            seen.append((step, "unet" if role == "denoiser" else role))

    kw = dict(
        image=image, num_inference_steps=2, output_type="latent", latents=sd_latents(pipe, 1, 0)
    )
    base = pipe("a red circle", **kw).images
    before = fingerprint(pipe)  # after a first call: calls set attributes of their own
    with decodekit.attach(pipe, [Who()]) as run:
        out = pipe("a red circle", **kw).images
        assert run.adapter.aux_nfe == 2 and run.last["nfe"] == 2
    assert seen == [(0, "controlnet"), (0, "unet"), (1, "controlnet"), (1, "unet")]
    assert torch.equal(base, out)
    assert_restored(before, fingerprint(pipe))


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "heun"])
def test_loop_timestep_matches_what_the_unet_receives(scheduler):
    pipe = tiny_sd_img2img_pipeline(scheduler=scheduler)

    class Check(Strategy):
        name = "check"
        loops = ("continuous-denoising",)

        def reset(self, run):
            self.pairs = []

        @hookimpl
        def decodekit_denoiser_forward(self, run, step, module, args, kwargs):
            self.pairs.append((float(args[1]), float(run.adapter.loop_timestep(step))))

    check = Check()
    with decodekit.attach(pipe, [check]) as run:
        pipe("a red circle", image=torch.zeros(1, 3, 32, 32), num_inference_steps=6, strength=0.5)
        assert run.adapter.loop_timestep(99) is None
    assert len(check.pairs) == (5 if scheduler == "heun" else 3)
    assert all(a == b for a, b in check.pairs)
