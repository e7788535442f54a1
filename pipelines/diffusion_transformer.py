"""Adapter `diffusion-transformer`: diffusers pipelines whose denoiser is a diffusion transformer.

Covers the SD3 (``SD3Transformer2DModel``), Flux (``FluxTransformer2DModel``),
PixArt-alpha/sigma (``PixArtTransformer2DModel``) and Sana (``SanaTransformer2DModel``)
families: their text-to-image pipelines and the variants built on the same
transformer (img2img, inpainting ...). It is the `stable-diffusion` adapter with
``pipe.transformer`` as the denoiser: the same ``ModelHook`` on the denoiser, the
same ``callback_on_step_end`` chain, the same per-call counting (``step`` = denoiser
calls in the current pipeline call), the same restore on detach, the same YAML.

What differs by family is the call: `generate` leaves ``num_inference_steps`` and
``guidance_scale`` to the pipeline's defaults unless the config sets them (Flux's
``guidance_scale`` feeds its distilled-guidance embedding; classifier-free guidance
on Flux is ``extra.true_cfg_scale`` with a ``negative_prompt``), and it caps
``max_sequence_length`` at the long-text tokenizer's ``model_max_length`` when that
is shorter than the pipeline's default (tiny tokenizers).

A hook's ``step`` is the loop iteration (PixArt's pipelines, which have no
``callback_on_step_end``, count calls, one per iteration, and cannot run strategies
that need ``decodekit_step_end``): Flux with ``true_cfg_scale > 1`` calls the
transformer twice per iteration (conditional, then unconditional, inside diffusers'
``cache_context("cond")`` / ``("uncond")``) and both calls get the same ``step``;
``run.nfe`` counts both. Everywhere else one iteration is one call, as on the UNet
adapter (Heun's two calls per solver step are two iterations of the loop).

The loop's latents are in the pipeline's own layout: ``(B, C, h, w)`` for SD3,
PixArt and Sana; Flux's packed ``(B, h/2 · w/2, 4C)`` tokens. ``initial_latents``
and the ``latents`` of step callbacks share that layout. With a flow-matching
scheduler, ``scheduler.timesteps`` are ``sigma × num_train_timesteps`` and
``loop_timestep`` returns them as the loop passes them (Flux hands the transformer
``timestep / 1000``).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from decodekit.hookspecs import hookimpl
from decodekit.pipelines.stable_diffusion import (
    StableDiffusionAdapter,
    StableDiffusionInputs,
    StableDiffusionOptions,
    pipeline_call,
)
from pydantic import Field

FAMILIES: dict[str, str] = {
    "SD3Transformer2DModel": "tokenizer_3",
    "FluxTransformer2DModel": "tokenizer_2",
    "PixArtTransformer2DModel": "tokenizer",
    "SanaTransformer2DModel": "tokenizer",
}
"""Supported transformer classes and the pipeline attribute of the tokenizer whose
length ``max_sequence_length`` sets (T5 for SD3, Flux and PixArt; Gemma for Sana)."""

FLOW_SCHEDULERS = {
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
    "flow-heun": "FlowMatchHeunDiscreteScheduler",
}


def transformer_family(transformer: Any) -> str | None:
    """The `FAMILIES` key of ``transformer``'s class (or a base class), None if unsupported."""
    for klass in type(transformer).__mro__:
        if klass.__name__ in FAMILIES:
            return klass.__name__
    return None


class DiffusionTransformerInputs(StableDiffusionInputs):
    """YAML ``inputs`` of a diffusion-transformer pipeline (its ``__call__``'s keyword arguments).

    As `StableDiffusionInputs`, but ``num_inference_steps`` and ``guidance_scale``
    default to the pipeline's own values (28 steps for SD3 and Flux, 20 for PixArt and
    Sana).
    """

    num_inference_steps: int | None = Field(
        None, ge=1, le=1000, description="denoising steps, 1..1000; default: the pipeline's"
    )
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="the pipeline's guidance_scale, 0..100 (classifier-free guidance on SD3, "
        "PixArt and Sana; the guidance embedding on Flux); default: the pipeline's",
    )


class DiffusionTransformerOptions(StableDiffusionOptions):
    """``pipeline.options`` of diffusion-transformer: what `load` accepts, nothing else."""

    scheduler: Literal[tuple(FLOW_SCHEDULERS)] | None = Field(  # type: ignore[valid-type]
        None,
        description="replace the pipeline's scheduler: flow-euler, flow-heun (not on Flux, "
        "whose pipeline passes custom sigmas)",
    )


class DiffusionTransformerAdapter(StableDiffusionAdapter):
    """Attach to a diffusers DiT pipeline: hooks on ``pipe.transformer`` and ``callback_on_step_end``."""

    name = "diffusion-transformer"
    Inputs = DiffusionTransformerInputs
    Options = DiffusionTransformerOptions
    SCHEDULERS = FLOW_SCHEDULERS
    steps_by_iteration = True
    description = (
        "diffusers pipelines with a diffusion transformer (SD3, Flux, PixArt-alpha/sigma, Sana)"
    )

    def __init__(self, target: Any, run):
        super().__init__(target, run)
        # PixArt's pipelines predate callback_on_step_end: count their (one a step) calls
        call = inspect.signature(pipeline_call(target)).parameters
        self.steps_by_iteration = "callback_on_step_end" in call

    @classmethod
    def denoiser_of(cls, pipe: Any) -> torch.nn.Module:
        """The module whose calls have role ``"denoiser"``: the pipeline's transformer."""
        return pipe.transformer

    @property
    def num_calls(self) -> int | None:
        """Loop iterations of the current call, once known.

        ``pipe.num_timesteps`` where the pipeline sets it; else (PixArt) the length of
        ``scheduler.timesteps`` once the call's first denoiser call has started (the
        pipeline has set them by then).
        """
        n = super().num_calls
        if n is None and self.run.in_call and self.step > 0:
            if not hasattr(type(self.pipe), "num_timesteps"):
                timesteps = getattr(self.pipe.scheduler, "timesteps", None)
                return len(timesteps) if timesteps is not None else None
        return n

    @classmethod
    def matches(cls, obj: Any) -> bool:
        from diffusers import DiffusionPipeline

        return (
            isinstance(obj, DiffusionPipeline)
            and getattr(obj, "unet", None) is None
            and transformer_family(getattr(obj, "transformer", None)) is not None
        )

    @classmethod
    def call_kwargs(cls, target: Any, inputs: StableDiffusionInputs) -> dict[str, Any]:
        """As the UNet adapter's, without unset values, with ``max_sequence_length`` capped."""
        kwargs = {
            k: v
            for k, v in super().call_kwargs(target, inputs).items()
            if v is not None or k == "negative_prompt"
        }
        if "max_sequence_length" not in kwargs:
            cap = cls.max_sequence_length(target)
            if cap is not None:
                kwargs["max_sequence_length"] = cap
        return kwargs

    @classmethod
    def max_sequence_length(cls, target: Any) -> int | None:
        """The long-text tokenizer's ``model_max_length`` when below the pipeline's default, else None."""
        param = inspect.signature(pipeline_call(target)).parameters.get("max_sequence_length")
        family = transformer_family(getattr(target, "transformer", None))
        tokenizer = getattr(target, FAMILIES[family], None) if family else None
        limit = getattr(tokenizer, "model_max_length", None)
        if param is None or not isinstance(param.default, int) or not isinstance(limit, int):
            return None
        return limit if limit < param.default else None


@hookimpl
def decodekit_register_pipelines(register):
    register(DiffusionTransformerAdapter)
