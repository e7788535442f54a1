"""The adapter contract of each loop shape: everything a strategy may read from ``run.adapter``.

A pipeline adapter drives one loop shape and subclasses that loop's contract
class here. A strategy reads the adapter only through ``run.adapter``, which is
a read-only view (`AdapterView`) that lets through the names the loop's
contract lists in ``contract`` and refuses every other name with a
`ContractError`. So a strategy written against this page runs on every
adapter of its loop — built-in or third-party — and an adapter's internals can
change without breaking a strategy.

The runtime hooks (`decodekit.hookspecs`) hand strategies the tensors of
each step; the contract is for what outlives one hook call (the pipeline
object, the model to hook at attach time, the schedule of the current call).

| loop | contract |
|---|---|
| ``continuous-denoising`` | `DenoisingAdapter` |
| ``masked-diffusion`` | `MaskedDiffusionAdapter` |
| ``token-autoregression`` | `TokenAutoregressionAdapter` |
| ``scale-autoregression`` | `ScaleAutoregressionAdapter` |
| ``masked-autoregression`` | `MaskedAutoregressionAdapter` |
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .errors import DecodekitError
from .pipeline import PipelineAdapter, TextAdapter

DENOISER = "denoiser"
"""Role of the model call that predicts the noise (the UNet or the transformer)."""

CONTROLNET = "controlnet"
"""Role of a ControlNet call; it feeds the denoiser call of the same ``step``."""

ROLES = (DENOISER, CONTROLNET)
"""The ``role`` values of `decodekit_denoiser_forward` / `decodekit_denoiser_output`."""


class ContractError(DecodekitError, AttributeError):
    """A strategy read an adapter attribute that its loop's contract does not declare."""


class DenoisingAdapter(PipelineAdapter):
    """Contract of the ``continuous-denoising`` loop (diffusers UNet and DiT pipelines).

    diffusers owns the loop; the adapter routes each denoiser call through
    ``decodekit_denoiser_forward`` / ``decodekit_denoiser_output`` (with its
    ``role``) and each finished step through ``decodekit_step_end``. ``step``
    counts denoiser calls within one pipeline call, never timestep values.

    Attributes:
        pipe: the diffusers pipeline (``DiffusionPipeline``) the strategies run on.
        denoiser: the module whose calls have role ``"denoiser"`` — a
            ``UNet2DConditionModel`` or a diffusion transformer. Hook its
            submodules at attach time (encoder/decoder blocks); never replace it.
        scheduler: the pipeline's scheduler (``pipe.scheduler``).
        scheduler_order: denoiser calls per solver step (2 for Heun, else 1).
        num_calls: denoiser calls the current pipeline call will make, once the
            loop has set its timesteps; None outside a call or when unknown.
        initial_latents: z_T of the current call, once drawn, in the loop's latent layout:
            ``(B, C, h, w)``, or Flux's packed ``(B, h/2 · w/2, 4C)`` tokens.
        step: denoiser calls made so far in the current pipeline call.
        hook_step: the ``step`` the hooks get for the next denoiser call (read before the
            call, e.g. in a torch forward pre-hook): the loop iteration where one iteration
            calls the denoiser more than once (Flux's true CFG: cond, then uncond), else
            ``step``; what ``loop_timestep`` takes.
        aux_nfe: calls of auxiliary models (role ``"controlnet"``) that ran in
            the current call; ``run.nfe`` counts denoiser calls only.
        aux_served: auxiliary calls served by a strategy in the current call.
    """

    loop = "continuous-denoising"
    contract: ClassVar[tuple[str, ...]] = PipelineAdapter.contract + (
        "pipe",
        "denoiser",
        "scheduler",
        "scheduler_order",
        "num_calls",
        "initial_latents",
        "loop_timestep",
        "step",
        "hook_step",
        "aux_nfe",
        "aux_served",
    )

    pipe: Any
    denoiser: torch.nn.Module
    initial_latents: torch.Tensor | None
    step: int
    aux_nfe: int
    aux_served: int

    @property
    def scheduler(self) -> Any:
        """The pipeline's scheduler."""
        return self.pipe.scheduler

    @property
    def scheduler_order(self) -> int:
        """Denoiser calls per solver step of the pipeline's scheduler (2 for Heun)."""
        return int(getattr(self.pipe.scheduler, "order", 1))

    @property
    def num_calls(self) -> int | None:
        """Denoiser calls the current pipeline call's loop makes, once known."""
        raise NotImplementedError

    @property
    def hook_step(self) -> int:
        """The ``step`` the hooks get for the next denoiser call (see the class doc)."""
        return self.step

    def loop_timestep(self, step: int) -> torch.Tensor | None:
        """The timestep the loop passes at hook ``step`` of the current call, or None if unknown."""
        raise NotImplementedError


class MaskedDiffusionAdapter(TextAdapter):
    """Contract of the ``masked-diffusion`` loop (LLaDA/Dream-style text diffusion).

    Each model call goes through ``decodekit_mdm_forward`` (a strategy may serve
    it with its own partial forward of ``model``); where the adapter owns the
    commit choice it also calls ``decodekit_mdm_select`` and
    ``decodekit_mdm_committed``.

    Attributes:
        pipe: the pipeline object (decodekit's `MaskedDiffusionLMPipeline`, or
            diffusers' ``LLaDA2Pipeline``).
        model: the bidirectional transformers model the loop calls; a K/V cache
            hooks its attention modules at attach time.
    """

    loop = "masked-diffusion"
    contract: ClassVar[tuple[str, ...]] = PipelineAdapter.contract + ("pipe", "model")

    pipe: Any
    model: torch.nn.Module


class TokenAutoregressionAdapter(TextAdapter):
    """Contract of the ``token-autoregression`` loop (transformers ``generate``, image-token AR).

    On ``causal-lm`` transformers owns the loop: strategies add logits
    processors (``decodekit_logits_processors``), edit each forward's inputs
    (``decodekit_model_inputs``), or drive decoding themselves
    (``decodekit_generate``, run as ``generate(custom_generate=...)``), where
    they receive the model, processors and stopping criteria as arguments. On
    ``ar-image`` decodekit owns the loop and hands the image span to
    ``decodekit_image_tokens`` with an ``ImageTokenDecoder``.

    Attributes:
        model: the language model: the ``PreTrainedModel`` whose ``generate`` is
            wrapped (causal-lm) or the pipeline's LM (ar-image).
        step: model forwards made so far in the current call.
    """

    loop = "token-autoregression"
    contract: ClassVar[tuple[str, ...]] = PipelineAdapter.contract + ("model", "step")

    model: Any
    step: int


class ScaleAutoregressionAdapter(PipelineAdapter):
    """Contract of the ``scale-autoregression`` loop (VAR next-scale prediction).

    decodekit owns the loop (``decodekit.pipelines.var``): before the first scale
    of a call it asks ``decodekit_scale_models(run, plan)`` which model runs which
    scale, then samples the scales in order through a ``ScaleDecoder`` and calls
    ``decodekit_scale_end`` after each one.

    Attributes:
        pipe: the ``VARPipeline``.
        transformer: the pipeline's ``VARTransformer``, the model of every scale
            unless a strategy plans otherwise.
        vq: the pipeline's multi-scale VQ-VAE (``MultiScaleVQVAE``).
        patch_nums: side of each scale's token map, first to last.
        num_scales: K, the number of scales.
        decoder: the ``ScaleDecoder`` of the current (or last) call: token maps,
            ``f_hat``, the live model and its K/V cache; None before the first call.
        step: transformer forwards in the current (or last) call (a prefill is one).
    """

    loop = "scale-autoregression"
    contract: ClassVar[tuple[str, ...]] = PipelineAdapter.contract + (
        "pipe",
        "transformer",
        "vq",
        "patch_nums",
        "num_scales",
        "decoder",
        "step",
    )

    pipe: Any
    transformer: torch.nn.Module
    vq: torch.nn.Module
    patch_nums: tuple[int, ...]
    num_scales: int
    decoder: Any
    step: int


class MaskedAutoregressionAdapter(PipelineAdapter):
    """Contract of the ``masked-autoregression`` loop (MAR over continuous tokens).

    decodekit owns the loop (``decodekit.pipelines.mar_pipeline``): each call
    builds a ``MARDecoder`` (tokens, mask, per-row order and head noise), then,
    until every step is done, asks ``decodekit_mar_step(run, decoder)`` whether a
    strategy advances the decoder itself, and runs one plain step when none does.

    Attributes:
        pipe: the ``MARPipeline``.
        model: the pipeline's ``MARModel`` (encoder, decoder and diffusion head).
        vae: the pipeline's KL autoencoder (diffusers ``AutoencoderKL``).
        decoder: the ``MARDecoder`` of the current (or last) call; None before the first call.
        step: model forwards in the current (or last) call (a guided forward is one).
    """

    loop = "masked-autoregression"
    contract: ClassVar[tuple[str, ...]] = PipelineAdapter.contract + (
        "pipe",
        "model",
        "vae",
        "decoder",
        "step",
    )

    pipe: Any
    model: torch.nn.Module
    vae: Any
    decoder: Any
    step: int


LOOP_CONTRACTS: dict[str, type[PipelineAdapter]] = {
    DenoisingAdapter.loop: DenoisingAdapter,
    MaskedDiffusionAdapter.loop: MaskedDiffusionAdapter,
    TokenAutoregressionAdapter.loop: TokenAutoregressionAdapter,
    ScaleAutoregressionAdapter.loop: ScaleAutoregressionAdapter,
    MaskedAutoregressionAdapter.loop: MaskedAutoregressionAdapter,
}
"""The contract class of each loop shape that has built-in adapters."""


def contract_of(loop: str) -> tuple[str, ...]:
    """The attribute names a strategy may read from an adapter of ``loop``."""
    cls = LOOP_CONTRACTS.get(loop)
    return cls.contract if cls is not None else PipelineAdapter.contract


class AdapterView:
    """Read-only view of an adapter that lets through its loop's contract and nothing else.

    ``run.adapter`` is one of these. Reading a declared name returns the
    adapter's current value; reading any other name, or writing, raises
    `ContractError` with the declared names.
    """

    __slots__ = ("_adapter", "_names")

    def __init__(self, adapter: PipelineAdapter):
        object.__setattr__(self, "_adapter", adapter)
        object.__setattr__(self, "_names", frozenset(contract_of(adapter.loop)))

    def __getattr__(self, name: str) -> Any:
        adapter = object.__getattribute__(self, "_adapter")
        if name not in object.__getattribute__(self, "_names"):
            raise ContractError(
                f"run.adapter.{name}: the {adapter.loop!r} loop's adapter contract does not "
                f"declare {name!r} (declared: {', '.join(contract_of(adapter.loop))}). "
                "Read only declared names, or take what you need from the hook's arguments."
            )
        return getattr(adapter, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise ContractError(
            f"run.adapter is read-only for strategies; cannot set {name!r}. "
            "Keep per-run state on the strategy."
        )

    def __dir__(self) -> list[str]:
        return sorted(object.__getattribute__(self, "_names"))

    def __repr__(self) -> str:
        return f"AdapterView({object.__getattribute__(self, '_adapter')!r})"


__all__ = [
    "CONTROLNET",
    "DENOISER",
    "ROLES",
    "AdapterView",
    "ContractError",
    "DenoisingAdapter",
    "LOOP_CONTRACTS",
    "MaskedAutoregressionAdapter",
    "MaskedDiffusionAdapter",
    "ScaleAutoregressionAdapter",
    "TokenAutoregressionAdapter",
    "contract_of",
]
