"""Prior noise injection, from "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models" (arXiv:2312.09608).

In the second half of sampling (t below half the training timesteps) the
paper adds a small multiple of the initial noise z_T back to the latents,
which restores high-frequency detail lost when encoder features are reused.
It is its own strategy so that it composes with any denoiser cache, or none.
Measured results: docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any

from decodekit.hookspecs import hookimpl
from decodekit.strategy import Params, Strategy
from pydantic import Field


class PriorNoiseParams(Params):
    """Parameters of `prior-noise`."""

    prior_noise: float = Field(
        0.003, ge=0.0, description="Multiple of z_T added to the latents (paper: 0.003)."
    )
    below: float = Field(
        0.5,
        gt=0.0,
        le=1.0,
        description="Inject while t < below × num_train_timesteps (paper: 0.5).",
    )


class PriorNoise(Strategy):
    """Add ``prior_noise · z_T`` to the latents after each step whose timestep is below ``below``."""

    name = "prior-noise"
    loops = ("continuous-denoising",)
    Params = PriorNoiseParams
    paper = "Faster Diffusion: Rethinking the Role of UNet Encoder in Diffusion Models, arXiv:2312.09608"

    def on_attach(self, run) -> None:
        self.reset(run)  # stats() reads zeros before the first call

    def reset(self, run) -> None:
        self.injected = 0

    def stats(self) -> dict[str, Any]:
        return {"injected_steps": self.injected}

    @hookimpl
    def decodekit_step_end(self, run, step, timestep, callback_kwargs):
        adapter = run.adapter
        z_t = adapter.initial_latents  # (B, C, h, w)
        num_train = adapter.scheduler.config.num_train_timesteps
        if z_t is None or float(timestep) >= self.params.below * num_train:
            return
        latents = callback_kwargs["latents"]
        callback_kwargs["latents"] = latents + self.params.prior_noise * z_t.to(latents.dtype)
        self.injected += 1


@hookimpl
def decodekit_register_strategies(register):
    register(PriorNoise)
