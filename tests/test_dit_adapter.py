"""The diffusion-transformer adapter: SD3 and Flux hooked like the UNet pipelines, exact restore, YAML."""

from __future__ import annotations

import json

import decodekit
import pytest
import torch
import yaml
from decodekit import Strategy, hookimpl
from decodekit.errors import AttachError, ConfigError
from decodekit.testing import (
    StrategyTesterMixin,
    run_dit,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sana_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)

BUILDERS = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}
ATTENTION_KWARGS: dict = {}


class Timeline(Strategy):
    """Records (event, role, step, timestep as the model got it, loop_timestep) per hook call."""

    name = "timeline"
    loops = ("continuous-denoising",)

    def reset(self, run):
        self.events = []
        self.calls = []

    @hookimpl
    def decodekit_denoiser_forward(self, run, step, role, module, kwargs):
        assert module is run.adapter.denoiser
        t = float(kwargs["timestep"].flatten()[0])
        self.events.append(("forward", role, step))
        self.calls.append((t, float(run.adapter.loop_timestep(step)), run.adapter.num_calls))

    @hookimpl
    def decodekit_denoiser_output(self, run, step, role):
        self.events.append(("output", role, step))


class StepTimeline(Timeline):
    """Timeline that also records the loop's step ends."""

    @hookimpl
    def decodekit_step_end(self, run, step, callback_kwargs):
        self.events.append(("step_end", None, step))


class ReuseOdd(Strategy):
    """Serves every odd denoiser call with the output of the call before it."""

    name = "reuse-odd"
    loops = ("continuous-denoising",)
    slot = "denoiser-cache"

    def reset(self, run):
        self.outputs = {}

    @hookimpl
    def decodekit_denoiser_forward(self, run, step):
        return self.outputs.get(step - 1) if step % 2 else None

    @hookimpl
    def decodekit_denoiser_output(self, run, step, output):
        self.outputs[step] = output


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pipe(request):
    return BUILDERS[request.param]()


def test_adapter_is_chosen_and_denoiser_is_the_transformer(pipe):
    with decodekit.attach(pipe, []) as run:
        assert run.adapter.name == "diffusion-transformer"
        assert run.adapter.denoiser is pipe.transformer
        assert run.adapter.scheduler is pipe.scheduler


def test_hooks_fire_in_loop_order_with_role_and_step(pipe):
    rec = StepTimeline()
    with decodekit.attach(pipe, [rec]) as run:
        run_dit(pipe, ["a red circle"], steps=3)
    assert rec.events == [
        e
        for s in range(3)
        for e in (("forward", "denoiser", s), ("output", "denoiser", s), ("step_end", None, s))
    ]
    assert run.stats["nfe"] == 3 and run.stats["served"] == 0


def test_no_strategy_is_exact_and_served_calls_change_the_output(pipe):
    base = run_dit(pipe, ["a red circle", "a blue square"])
    with decodekit.attach(pipe, []) as run:
        assert torch.equal(run_dit(pipe, ["a red circle", "a blue square"]), base)
    assert run.stats["nfe"] == 4
    with decodekit.attach(pipe, [ReuseOdd()]) as run:
        out = run_dit(pipe, ["a red circle", "a blue square"])
    assert (run.last["nfe"], run.last["served"]) == (2, 2)
    assert not torch.equal(out, base)


@pytest.mark.parametrize(
    "family,scheduler,calls",
    [("flux", None, 5), ("sd3", "euler", 5), ("sd3", "heun", 9)],
)
def test_loop_timestep_and_num_calls_on_flow_matching(family, scheduler, calls):
    """The transformer gets the loop's timestep (Flux: divided by 1000); Heun calls twice a step."""
    pipe = tiny_sd3_pipeline(scheduler=scheduler) if scheduler else tiny_flux_pipeline()
    rec = Timeline()
    with decodekit.attach(pipe, [rec]) as run:
        run_dit(pipe, ["a red circle"], steps=5)
        assert run.adapter.loop_timestep(calls) is None
        assert run.adapter.scheduler_order == (2 if scheduler == "heun" else 1)
    scale = 1000.0 if family == "flux" else 1.0
    assert len(rec.calls) == calls
    assert [n for _, _, n in rec.calls] == [calls] * calls
    for got, loop_t, _ in rec.calls:
        assert got * scale == pytest.approx(loop_t, rel=1e-6)
    # flow matching: timesteps are sigma * 1000, from pure noise downwards
    assert rec.calls[0][1] == pytest.approx(1000.0)
    assert all(a[1] >= b[1] for a, b in zip(rec.calls, rec.calls[1:]))


OTHER_FAMILIES = {  # builder, the call's extra keywords
    "pixart-alpha": (tiny_pixart_pipeline, {"clean_caption": False}),
    "pixart-sigma": (lambda: tiny_pixart_pipeline(sigma=True), {"clean_caption": False}),
    "sana": (tiny_sana_pipeline, {"complex_human_instruction": None}),
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_pixart_and_sana_hooks_and_schedule(family):
    build, kw = OTHER_FAMILIES[family]
    pipe = build()
    rec = Timeline()
    kw = dict(kw, use_resolution_binning=False, max_sequence_length=16)
    base = run_dit(pipe, ["a red circle"], steps=3, **kw)
    with decodekit.attach(pipe, [rec]) as run:
        assert run.adapter.name == "diffusion-transformer"
        out = run_dit(pipe, ["a red circle"], steps=3, **kw)
    assert torch.equal(out, base)
    assert rec.events == [
        (event, "denoiser", s) for s in range(3) for event in ("forward", "output")
    ]
    assert [n for _, _, n in rec.calls] == [3, 3, 3]
    assert all(got == pytest.approx(loop_t) for got, loop_t, _ in rec.calls)
    if family.startswith("pixart"):  # no callback_on_step_end: step-end strategies refused
        with pytest.raises(AttachError, match="callback_on_step_end"):
            decodekit.attach(pipe, ["prior-noise"])


def test_initial_latents_are_in_the_loop_layout():
    pipe = tiny_flux_pipeline()
    with decodekit.attach(pipe, []) as run:
        final = run_dit(pipe, ["a red circle"], steps=2)
        z_t = run.adapter.initial_latents
    assert z_t.shape == final.shape == (1, 16, 16)  # 8x8x4 latents packed into 2x2 patches
    first = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z_t, pipe._pack_latents(first, 1, 4, 8, 8))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_prior_noise_adds_its_multiple_of_z_t_below_half_the_schedule(family):
    """prior-noise's update (latents += c z_T when t < 500) holds on flow-matching pipelines."""
    pipe = BUILDERS[family]()
    seen: dict[str, dict[int, torch.Tensor]] = {"base": {}, "prior": {}}

    def capture(name):  # the user's callback runs after decodekit's step end
        return lambda p, i, t, kw: seen[name].update({i: kw["latents"].clone()}) or {}

    steps = 6  # shift 3: the last step is the only one below t = 500
    run_dit(pipe, ["a red circle"], steps=steps, callback_on_step_end=capture("base"))
    timesteps = pipe.scheduler.timesteps.tolist()
    first_low = next(i for i, t in enumerate(timesteps) if t < 500)
    assert 0 < first_low < steps
    prior = {"name": "prior-noise", "params": {"prior_noise": 0.5}}
    with decodekit.attach(pipe, [prior]) as run:
        run_dit(pipe, ["a red circle"], steps=steps, callback_on_step_end=capture("prior"))
        z_t = run.adapter.initial_latents
    stats = run.stats["strategies"]["prior-noise"]
    assert stats["injected_steps"] == steps - first_low
    for i in range(first_low):  # t >= 500: untouched
        assert torch.equal(seen["prior"][i], seen["base"][i])
    diff = seen["prior"][first_low] - seen["base"][first_low]
    torch.testing.assert_close(diff, 0.5 * z_t, rtol=0, atol=1e-5)


def test_faster_diffusion_refuses_a_transformer_at_attach():
    pipe = tiny_flux_pipeline()
    with pytest.raises(AttachError, match="encoder.*decoder|UNet") as caught:
        decodekit.attach(pipe, ["faster-diffusion"])
    assert "FluxTransformer2DModel" in str(caught.value)
    assert not hasattr(pipe.transformer, "_diffusers_hook")  # nothing left behind


def test_unsupported_pipelines_are_refused_clearly():
    from diffusers import DiffusionPipeline

    class VideoPipeline(DiffusionPipeline):  # a transformer of a family decodekit does not know
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

    with pytest.raises(AttachError, match="no pipeline adapter for a .*VideoPipeline"):
        decodekit.attach(VideoPipeline(torch.nn.Linear(2, 2)), [])
    with pytest.raises(AttachError, match="'diffusion-transformer' cannot attach"):
        decodekit.attach(tiny_sd_pipeline(), [], pipeline="diffusion-transformer")


def test_call_kwargs_leave_defaults_to_the_pipeline_and_cap_the_text_length():
    from decodekit.pipelines.diffusion_transformer import DiffusionTransformerAdapter as A

    pipe = tiny_flux_pipeline()
    inputs = A.Inputs(prompt="a red circle", height=32, width=32)
    kwargs = A.call_kwargs(pipe, inputs)
    assert "guidance_scale" not in kwargs and "num_inference_steps" not in kwargs
    assert kwargs["max_sequence_length"] == pipe.tokenizer_2.model_max_length == 16
    inputs = A.Inputs(prompt="a red circle", guidance_scale=2.0, extra={"max_sequence_length": 8})
    kwargs = A.call_kwargs(pipe, inputs)
    assert (kwargs["guidance_scale"], kwargs["max_sequence_length"]) == (2.0, 8)


def flux_yaml(tmp_path, model: str, prompt, steps: int, cfg_scale: float) -> dict:
    """A diffusion-transformer config with prior noise and true CFG at 32x32, written to c.yaml."""
    inputs = {"prompt": prompt, "negative_prompt": "", "num_inference_steps": steps}
    inputs |= {"height": 32, "width": 32, "extra": {"true_cfg_scale": cfg_scale}}
    cfg = {
        "pipeline": {"type": "diffusion-transformer", "model": model},
        "strategies": ["prior-noise"],
        "inputs": inputs,
        "output": {"dir": str(tmp_path / "out")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def run_yaml(tmp_path) -> dict:
    """``decodekit run c.yaml``; returns its run.json."""
    from decodekit.cli import main

    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    return json.loads((tmp_path / "out" / "run.json").read_text())


def test_yaml_run_on_a_saved_tiny_flux(tmp_path):
    tiny_flux_pipeline(guidance_embeds=False).save_pretrained(tmp_path / "flux")
    prompts = ["a red circle", "a blue square"]
    cfg = flux_yaml(tmp_path, str(tmp_path / "flux"), prompts, steps=3, cfg_scale=2.0)
    record = run_yaml(tmp_path)
    assert record["stats"]["nfe"] == 2 * 3  # true CFG: a conditional and an unconditional call
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        "000-a-red-circle.png",
        "001-a-blue-square.png",
    ]
    cfg["pipeline"]["type"] = "stable-diffusion"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="FluxPipeline, which the stable-diffusion adapter"):
        from decodekit.config import load_config

        load_config(str(tmp_path / "c.yaml")).load_pipeline()


class TestFluxContract(StrategyTesterMixin):
    """The shared contract on tiny Flux with a serving strategy."""

    atol = 1e-4

    @property
    def strategies(self):
        return [ReuseOdd()]

    def make_pipeline(self):
        return tiny_flux_pipeline()

    def sample_inputs(self):
        return ["a red circle", "a blue square on the left"]

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        # Flux sets pipe._joint_attention_kwargs to a new {} on each call given None, which
        # the fingerprint (object ids) would report as a change; one dict for all calls.
        kw = {"joint_attention_kwargs": ATTENTION_KWARGS} if "Flux" in type(pipe).__name__ else {}
        return run_dit(pipe, inputs, seed=seed, row_offset=row_offset, steps=3, **kw)

    def broken_call(self, pipe):
        pipe("a red circle", num_inference_steps=2, height=32, width=32, max_sequence_length=999)


@pytest.mark.slow  # TestFluxContract covers the adapter's contract, test_prior_noise prior noise's
class TestSD3Contract(TestFluxContract):
    """The shared contract on tiny SD3 with prior noise."""

    strategies = ["prior-noise"]

    def make_pipeline(self):
        return tiny_sd3_pipeline()


def test_yaml_run_on_zoo_shapes_dit(tmp_path):
    """`model: zoo:shapes-dit` runs from YAML with true CFG and prior noise."""
    flux_yaml(tmp_path, "zoo:shapes-dit", "a large red circle in the centre", 4, cfg_scale=3.0)
    record = run_yaml(tmp_path)
    assert record["stats"]["nfe"] == 8
    # timesteps 1000, 750, 500, 250: only t = 250 is below 500
    assert record["stats"]["strategies"]["prior-noise"]["injected_steps"] == 1
    assert (tmp_path / "out" / "000-a-large-red-circle-in-the-centre.png").is_file()


def test_load_takes_a_flow_scheduler_option_and_refuses_a_unet_folder(tmp_path):
    from decodekit.pipelines.diffusion_transformer import DiffusionTransformerAdapter as A

    tiny_sd3_pipeline().save_pretrained(tmp_path / "sd3")
    pipe = A.load(str(tmp_path / "sd3"), device="cpu", dtype="float32", options={})
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    heun = A.load(
        str(tmp_path / "sd3"), device="cpu", dtype="float32", options={"scheduler": "flow-heun"}
    )
    assert type(heun.scheduler).__name__ == "FlowMatchHeunDiscreteScheduler"
    assert heun.scheduler.config.shift == pipe.scheduler.config.shift == 3.0
    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    with pytest.raises(
        ConfigError, match="StableDiffusionPipeline, which the diffusion-transformer"
    ):
        A.load(str(tmp_path / "sd"), device="cpu", dtype="float32", options={})


def test_overhead_measurement_says_it_needs_a_unet():
    from decodekit.errors import DecodekitError
    from decodekit.overhead import measure_overhead
    from decodekit.testing import tiny_flux_pipeline

    with pytest.raises(DecodekitError, match="no UNet"):
        measure_overhead(tiny_flux_pipeline(), repeat=1)
