"""Adapter `stable-diffusion`: diffusers pipelines whose denoiser is a `UNet2DConditionModel`.

Covers StableDiffusion 1.x/2.x, SDXL, ControlNet and img2img pipelines. The
pipeline keeps its own loop: decodekit registers a diffusers `ModelHook` on the
UNet (``decodekit_denoiser_forward`` / ``decodekit_denoiser_output``) and chains
a ``callback_on_step_end`` for ``decodekit_step_end``. To see where a pipeline
call starts and ends, the pipeline object is given a one-off subclass whose
``__call__`` wraps the original; detach puts the original class back.

Steps are counted by denoiser calls within one pipeline call (``step`` = the
loop iteration), never by looking up timestep values, so schedulers that repeat
a timestep or run twice per step (``scheduler.order == 2``) are counted right.

A ControlNet pipeline's ControlNet (``pipe.controlnet``, single or multi) is
hooked the same way: its calls go through ``decodekit_denoiser_forward`` /
``decodekit_denoiser_output`` with ``role="controlnet"`` and ``step`` the step
of the UNet call it feeds, so a denoiser cache can skip it; UNet calls have
``role="denoiser"``. ControlNet calls are counted in ``adapter.aux_nfe`` /
``adapter.aux_served``, not in ``run.nfe`` (which counts UNet calls).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from decodekit import compat
from decodekit.diffusers_hooks import PipelineHooks
from decodekit.errors import AttachError, ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.loops import CONTROLNET, DENOISER, DenoisingAdapter
from decodekit.outputs import atomic_save_image
from decodekit.pipeline import Inputs
from decodekit.seeds import row_generators
from diffusers.hooks import ModelHook

HOOK_NAME = "decodekit"

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}


class StableDiffusionInputs(Inputs):
    """YAML ``inputs`` of a stable-diffusion pipeline (the keyword arguments of its ``__call__``)."""

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    extra: dict[str, Any] = {}
    """Any other keyword argument of the pipeline's ``__call__`` (``eta``, ``strength`` ...)."""


class _DenoiserHook(ModelHook):
    """Routes every UNet call through the run's denoiser hooks."""

    def __init__(self, adapter: StableDiffusionAdapter):
        super().__init__()
        self.adapter = adapter

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.adapter.denoise(module, self.fn_ref.original_forward, args, kwargs)


class _ControlNetHook(_DenoiserHook):
    """Routes every ControlNet call through the run's denoiser hooks (``module`` = the ControlNet)."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.adapter.control(module, self.fn_ref.original_forward, args, kwargs)


class StableDiffusionAdapter(DenoisingAdapter):
    """Attach to a diffusers UNet pipeline through `HookRegistry` and ``callback_on_step_end``."""

    name = "stable-diffusion"
    loop = "continuous-denoising"
    Inputs = StableDiffusionInputs
    description = (
        "diffusers pipelines with a UNet2DConditionModel (SD 1.x/2.x, SDXL, ControlNet, img2img)"
    )

    def __init__(self, target: Any, run):
        super().__init__(target, run)
        self.pipe = target
        self.unet = target.unet
        self.denoiser = self.unet
        controlnet = getattr(target, "controlnet", None)
        self.controlnet = controlnet if isinstance(controlnet, torch.nn.Module) else None
        self.step = 0  # denoiser calls in the current pipeline call
        self.aux_nfe = 0  # ControlNet calls run in the current pipeline call
        self.aux_served = 0  # ControlNet calls served by a strategy
        self.initial_latents: torch.Tensor | None = None  # z_T of the current call
        self.call_kwargs: dict[str, Any] = {}
        self._hooks = PipelineHooks(target, HOOK_NAME)

    @classmethod
    def matches(cls, obj: Any) -> bool:
        from diffusers import DiffusionPipeline, UNet2DConditionModel

        return isinstance(obj, DiffusionPipeline) and isinstance(
            getattr(obj, "unet", None), UNet2DConditionModel
        )

    def touched(self) -> list[Any]:
        return [self.pipe, self.unet] + ([self.controlnet] if self.controlnet is not None else [])

    @property
    def num_calls(self) -> int | None:
        """Denoiser calls the current pipeline call's loop will make (its ``len(timesteps)``), once known."""
        n = getattr(self.pipe, "num_timesteps", None)  # set by the call, AttributeError before
        return int(n) if isinstance(n, int) and self.run.in_call else None

    def loop_timestep(self, step: int) -> torch.Tensor | None:
        """The timestep the loop passes at denoiser call ``step`` of the current call, or None if unknown.

        The loop iterates over a contiguous run of ``scheduler.timesteps``: from
        ``scheduler.begin_index`` when the scheduler has one, else the tail of
        length ``num_calls`` (img2img with strength < 1 skips the head).
        """
        n = self.num_calls
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if n is None or timesteps is None or not 0 <= step < n:
            return None
        begin = getattr(self.pipe.scheduler, "begin_index", None)
        offset = begin if isinstance(begin, int) else len(timesteps) - n
        if not 0 <= offset + step < len(timesteps):
            return None
        return timesteps[offset + step]

    # -- attach / detach ----------------------------------------------------------------
    def _step_tensors(self) -> list[str]:
        names: list[str] = ["latents"]
        for s in self.run.strategies:
            for n in s.step_tensors:
                if n not in names:
                    names.append(n)
        return names

    def attach(self) -> None:
        pipe = self.pipe
        cls = type(pipe)
        if self.run.has("decodekit_step_end"):
            if "callback_on_step_end" not in inspect.signature(cls.__call__).parameters:
                raise AttachError(
                    f"{cls.__name__}.__call__ has no callback_on_step_end, which "
                    f"{', '.join(s.name for s in self.run.strategies)} need; use a diffusers pipeline that has it."
                )
            allowed = compat.callback_tensor_inputs(pipe)
            missing = [n for n in self._step_tensors() if n not in allowed]
            if missing:
                raise AttachError(
                    f"{cls.__name__} does not expose {missing} to step callbacks (it exposes {allowed}); "
                    "the strategies that need them cannot run on this pipeline."
                )
        hooked: list[tuple[torch.nn.Module, ModelHook]] = [(self.unet, _DenoiserHook(self))]
        if self.controlnet is not None:
            hooked.append((self.controlnet, _ControlNetHook(self)))
        adapter = self

        def __call__(pipe_self, *args: Any, **kwargs: Any) -> Any:
            return adapter.call_pipeline(pipe_self, args, kwargs)

        def prepare_latents(pipe_self, *args: Any, **kwargs: Any) -> Any:
            out = cls.prepare_latents(pipe_self, *args, **kwargs)
            adapter.initial_latents = out[0] if isinstance(out, tuple) else out  # z_T, (B, C, h, w)
            return out

        methods: dict[str, Any] = {"__call__": __call__}
        if hasattr(cls, "prepare_latents"):
            methods["prepare_latents"] = prepare_latents
        self._hooks.attach(hooked, methods)

    def detach(self) -> None:
        self._hooks.restore()

    # -- the loop ---------------------------------------------------------------------------
    def call_pipeline(self, pipe: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The wrapped pipeline ``__call__``: per-call reset, step callback, guarded run."""
        run = self.run
        original_call = self._hooks.original_class.__call__
        if run.has("decodekit_step_end"):
            self._chain_callback(kwargs)
        self.step = 0
        self.aux_nfe = self.aux_served = 0
        self.initial_latents = None
        self.call_kwargs = kwargs
        return run.guarded_call(kwargs, lambda: original_call(pipe, *args, **kwargs))

    def _chain_callback(self, kwargs: dict[str, Any]) -> None:
        user_cb = kwargs.get("callback_on_step_end")
        user_inputs = list(
            getattr(user_cb, "tensor_inputs", None)
            or kwargs.get("callback_on_step_end_tensor_inputs")
            or ["latents"]
        )
        wanted = list(dict.fromkeys(user_inputs + self._step_tensors()))
        run = self.run

        def on_step_end(
            pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            run.call(
                "decodekit_step_end", run=run, step=i, timestep=t, callback_kwargs=callback_kwargs
            )
            if user_cb is not None:
                user_view = {k: callback_kwargs[k] for k in user_inputs if k in callback_kwargs}
                callback_kwargs.update(user_cb(pipe, i, t, user_view) or {})
            return callback_kwargs

        kwargs["callback_on_step_end"] = on_step_end
        kwargs["callback_on_step_end_tensor_inputs"] = wanted

    def denoise(
        self, module: torch.nn.Module, forward: Any, args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        """One denoiser call: served by a strategy, or run for real and shown to the strategies."""
        step = self.step
        self.step += 1
        out, served = self._serve_or_run(step, DENOISER, module, forward, args, kwargs)
        if served:
            self.run.served += 1
        else:
            self.run.nfe += 1
        return out

    def control(
        self, module: torch.nn.Module, forward: Any, args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        """One ControlNet call, for the UNet call at ``self.step`` that follows it."""
        out, served = self._serve_or_run(self.step, CONTROLNET, module, forward, args, kwargs)
        if served:
            self.aux_served += 1
        else:
            self.aux_nfe += 1
        return out

    def _serve_or_run(
        self,
        step: int,
        role: str,
        module: torch.nn.Module,
        forward: Any,
        args: tuple,
        kwargs: dict[str, Any],
    ) -> tuple[Any, bool]:
        """Ask the strategies to serve a model call; else run it and show them the output."""
        run = self.run
        hook_args = {
            "run": run,
            "step": step,
            "role": role,
            "module": module,
            "args": args,
            "kwargs": kwargs,
        }
        out = run.call("decodekit_denoiser_forward", **hook_args)
        if out is not None:
            return out, True
        out = forward(*args, **kwargs)
        run.call("decodekit_denoiser_output", **hook_args, output=out)
        return out, False

    # -- YAML runs and bench -----------------------------------------------------------------
    @classmethod
    def load(cls, source: str, *, device: str, dtype: str, options: dict[str, Any]) -> Any:
        from diffusers import DiffusionPipeline

        options = dict(options)
        scheduler = options.pop("scheduler", None)
        kwargs: dict[str, Any] = {"torch_dtype": getattr(torch, dtype), "local_files_only": True}
        kwargs.update(options)
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        if not cls.matches(pipe):
            raise ConfigError(
                "pipeline.type",
                f"{source} loads a {type(pipe).__name__}, which has no UNet2DConditionModel; pick another pipeline type.",
            )
        if scheduler is not None:
            import diffusers

            if scheduler not in SCHEDULERS:
                raise ConfigError(
                    "pipeline.options.scheduler",
                    f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}",
                )
            sched_cls = getattr(diffusers, SCHEDULERS[scheduler])
            pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
        return pipe.to(device)

    @classmethod
    def generate(cls, target: Any, inputs: StableDiffusionInputs, progress: bool = False) -> list:
        target.set_progress_bar_config(disable=not progress)
        prompts = [inputs.prompt] if isinstance(inputs.prompt, str) else list(inputs.prompt)
        # one generator per image, seeded from its prompt (decodekit.seeds), not from its index
        generator = row_generators(inputs.seed, prompts, inputs.num_images_per_prompt)
        kwargs: dict[str, Any] = {
            "prompt": inputs.prompt,
            "negative_prompt": inputs.negative_prompt,
            "num_inference_steps": inputs.num_inference_steps,
            "guidance_scale": inputs.guidance_scale,
            "num_images_per_prompt": inputs.num_images_per_prompt,
            "generator": generator,
            "output_type": "pil",
        }
        if inputs.height:
            kwargs["height"] = inputs.height
        if inputs.width:
            kwargs["width"] = inputs.width
        kwargs.update(inputs.extra)
        return list(target(**kwargs).images)

    @classmethod
    def save(cls, outputs: list, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        return [
            atomic_save_image(image, out_dir / f"{i:03d}.png") for i, image in enumerate(outputs)
        ]

    @classmethod
    def quality(cls, baseline: list, outputs: list) -> dict[str, float]:
        return {
            "psnr": psnr(baseline, outputs),
            "identical": float(
                all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(baseline, outputs))
            ),
        }

    @classmethod
    def picture(cls, baseline: list, outputs: list, path: Path) -> bool:
        image_grid([baseline, outputs], ["baseline", "strategy"]).save(path)
        return True


def psnr(a: list, b: list) -> float:
    """Mean PSNR (dB, 8-bit peak) over pairs of images; inf where identical."""
    vals = []
    for x, y in zip(a, b):
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        mse = float(np.mean((x - y) ** 2))
        vals.append(float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return float(np.mean(vals)) if vals else float("nan")


def image_grid(rows: list[list], labels: list[str]):
    """One PNG-able image: each row of PIL images side by side, a label column on the left."""
    from PIL import Image, ImageDraw

    w, h = rows[0][0].size
    scale = max(1, 96 // max(w, h))
    w, h = w * scale, h * scale
    label_w = 72
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (label_w + ncol * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels)):
        draw.text((4, r * h + h // 2 - 5), label, fill="black")
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (label_w + c * w, r * h))
    return grid


@hookimpl
def decodekit_register_pipelines(register):
    register(StableDiffusionAdapter)
