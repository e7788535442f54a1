"""Classifier-free guidance cut-off, after "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models" (arXiv:2312.12487).

Castillo et al. observe that late in sampling the guided update and the plain
conditional update nearly agree, so the unconditional half of the denoiser batch
is wasted work there. Their Adaptive Guidance decides *when* to stop from a
cosine-similarity test; this strategy is the simpler fixed schedule: guidance
runs for the first ``fraction`` of the loop's steps, then the pipeline denoises
the conditional branch alone (batch ``2B`` → ``B``). The adaptive criterion of
the paper is not reproduced here.

How it attaches: a ``decodekit_step_end`` hook. At the cut-off step it sets
``pipe._guidance_scale = 0.0`` (diffusers' SD pipelines read
``do_classifier_free_guidance`` as ``_guidance_scale > 1``) and replaces
``callback_kwargs["prompt_embeds"]`` (``(2B, T, D)``, unconditional rows first)
by its conditional half. The guidance scale is put back when the call ends.

This module is the template of a third-party decodekit plugin: one strategy
class, its params model, and one registration hook, found through the entry
point ``cfg-cutoff = "decodekit_cfg_cutoff"`` in pyproject.toml.
"""

from __future__ import annotations

import math
from typing import Any

from decodekit import DecodekitError, Params, Strategy, hookimpl
from pydantic import Field

__all__ = ["CfgCutoff", "CfgCutoffParams", "SUPPORTED_PIPELINES"]

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
"""diffusers classes whose loop keeps nothing else doubled for guidance but ``prompt_embeds``.

SDXL also doubles ``add_text_embeds``/``add_time_ids``, ControlNet doubles the
control image: they need more than this strategy edits, so it refuses them.
"""

_UNSET = object()


class CfgCutoffParams(Params):
    """Parameters of `cfg-cutoff`."""

    fraction: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Fraction of the denoising steps that run with guidance; 1.0 never cuts off.",
    )


class CfgCutoff(Strategy):
    """Run classifier-free guidance for the first ``fraction`` of the steps, the conditional branch alone after."""

    name = "cfg-cutoff"
    loops = ("continuous-denoising",)
    Params = CfgCutoffParams
    slot = None
    paper = (
        "Adaptive Guidance: Training-free Acceleration of Conditional Diffusion Models, "
        "arXiv:2312.12487 (fixed-fraction variant)"
    )
    # The stable-diffusion adapter asks the pipeline for these tensors in the step callback.
    step_tensors = ("prompt_embeds",)

    def on_attach(self, run) -> None:
        pipe = run.adapter.pipe
        bases = {c.__name__ for c in type(pipe).__mro__}
        if pipe is None or not bases & set(SUPPORTED_PIPELINES):
            raise DecodekitError(
                f"cfg-cutoff supports {', '.join(SUPPORTED_PIPELINES)}; a {type(run.target).__name__} "
                "doubles more than prompt_embeds for guidance (SDXL: add_text_embeds/add_time_ids, "
                "ControlNet: the control image). Remove cfg-cutoff for this pipeline."
            )
        self.pipe = pipe
        self._saved_scale: Any = _UNSET
        self.reset(run)

    def on_detach(self, run) -> None:
        self._restore_scale()

    def reset(self, run) -> None:
        self.with_cfg = 0  # denoiser calls that ran the 2B batch
        self.without_cfg = 0  # denoiser calls that ran the B batch
        self.cutoff_step: int | None = None
        self.skipped = False

    def stats(self) -> dict[str, Any]:
        return {
            "steps_with_cfg": self.with_cfg,
            "steps_without_cfg": self.without_cfg,
            "cutoff_step": self.cutoff_step,
        }

    def ideal_speedup(self, run) -> float | None:
        """UNet-FLOP ratio of the last call: ``2N / (2k + (N - k))`` for k guided steps out of N.

        Counts only the denoiser, assumes its cost is linear in the batch, and
        leaves out the text encoder, the VAE and the scheduler. None when the
        call ran no guidance at all (nothing to compare).
        """
        n = self.with_cfg + self.without_cfg
        if n == 0 or self.with_cfg == 0:
            return None
        return (2 * n) / (2 * self.with_cfg + self.without_cfg)

    def guided_steps(self, num_steps: int) -> int:
        """How many of ``num_steps`` loop steps keep guidance (at least one)."""
        return max(1, math.ceil(self.params.fraction * num_steps - 1e-9))

    @hookimpl
    def decodekit_call_start(self, run, call_kwargs):
        # IP-Adapter image embeddings are doubled too; leave such calls alone rather than break them.
        self.skipped = any(
            call_kwargs.get(k) is not None for k in ("ip_adapter_image", "ip_adapter_image_embeds")
        )

    @hookimpl
    def decodekit_step_end(self, run, step, timestep, callback_kwargs):
        pipe = self.pipe
        if not pipe.do_classifier_free_guidance:
            self.without_cfg += 1
            return
        self.with_cfg += 1
        num_steps = int(pipe.num_timesteps)  # loop length of this call (img2img: after strength)
        last_guided = self.guided_steps(num_steps) - 1
        if self.skipped or step != last_guided or step == num_steps - 1:
            return
        embeds = callback_kwargs["prompt_embeds"]  # (2B, T, D): [unconditional; conditional]
        callback_kwargs["prompt_embeds"] = embeds.chunk(2)[-1]  # (B, T, D)
        self._saved_scale = pipe.__dict__.get("_guidance_scale", _UNSET)
        pipe._guidance_scale = 0.0  # do_classifier_free_guidance is False from the next step on
        self.cutoff_step = step

    @hookimpl
    def decodekit_call_end(self, run, output):
        self._restore_scale()

    def _restore_scale(self) -> None:
        saved = getattr(self, "_saved_scale", _UNSET)
        if saved is _UNSET:
            return
        self.pipe._guidance_scale = saved
        self._saved_scale = _UNSET


@hookimpl
def decodekit_register_strategies(register):
    register(CfgCutoff)
