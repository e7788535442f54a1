"""DeepCache: Accelerating Diffusion Models for Free (Ma, Fang, Wang, CVPR 2024, arXiv:2312.00858).

A UNet's deep features change slowly from one denoising step to the next. On a
*full* step the whole UNet runs and the outputs of its deep modules are kept:
every down block past the chosen skip branch, the mid block, and the up-block
path that feeds that branch. On the other (*shallow*) steps the UNet still runs
its own forward, but those modules return their kept outputs instead of running,
so only the shallow branch computes: ``conv_in``, the down blocks up to the
branch, and the up blocks from the branch on, with that step's latents, time and
text embeddings.

This matches ``DeepCacheSDHelper`` of the DeepCache package (0.1.1): the same
modules are skipped for the same ``cache_branch_id`` (block ``branch // 3``,
layer ``branch % 3``), full steps every ``interval`` steps, or the package's
non-uniform schedule (``uniform=False``, its ``pow``/``center`` quadratic
spacing). Steps are counted by denoiser calls and ``scheduler.order`` (the
adapter's step), never by timestep value: the package finds the step with
``scheduler.timesteps.index(t)``, which is wrong when a timestep repeats.

Everything attaches through diffusers ``ModelHook``s on the UNet's submodules
(`decodekit.diffusers_hooks.ModuleHooks`); the UNet's forward is its own.

Reproduced: outputs equal the package's at the same settings, and interval 1
equals the baseline bit for bit (tests/test_deep_cache.py); speed-up and
fidelity on zoo:shapes-sd in docs/benchmarks.md and docs/strategies/deep-cache.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from decodekit.diffusers_hooks import ModuleHooks
from decodekit.errors import AttachError, DecodekitError
from decodekit.feature_memo import StepFeatureMemo
from decodekit.hookspecs import hookimpl
from decodekit.strategy import Params
from decodekit.unet_reuse import UNetReuseStrategy, refuse_steps_past_end, solver_steps
from diffusers.hooks import ModelHook
from pydantic import Field, field_validator, model_validator

HOOK_NAME = "decodekit-deep-cache"

BRANCHES_PER_BLOCK = 3
"""The package's ``cache_branch_id`` numbering: block ``id // 3``, layer ``id % 3`` (SD's 2 layers + downsampler)."""


# -- the full-step schedules -------------------------------------------------------------------
def uniform_full_steps(num_steps: int, interval: int) -> list[int]:
    """Every ``interval``-th solver step from 0: ``[0, interval, 2·interval, …]``."""
    return list(range(0, num_steps, interval))


def quadratic_full_steps(num_steps: int, count: int, center: int, power: float) -> list[int]:
    """DeepCache's non-uniform schedule: ``count`` full steps, dense around ``center``.

    The package (``sample_from_quad_center``) spaces ``count + 1`` points evenly
    between ``(-center)^(1/p)`` and ``(num_steps - center)^(1/p)`` (complex roots
    where the base is negative), raises them to the power ``p``, keeps the real
    parts truncated to integers, drops the two ends, shifts by ``center`` and
    puts step 0 first. When that does not give ``count`` steps, ``p`` is lowered
    by 0.02 and tried again while ``p > 1``. Same arithmetic here, so the same steps.

    Raises:
        DecodekitError: no power in (1, ``power``] gives ``count`` steps.
    """
    p = power
    while p > 1:
        ends = ((-center) ** (1 / p), (num_steps - center) ** (1 / p))  # complex when negative
        points = np.linspace(ends[0], ends[1], count + 1) ** p  # (count + 1,)
        whole = np.unique(np.real(points).astype(np.int32))  # truncated toward zero, sorted
        steps = [0] + [int(x) + center for x in whole[1:-1]]
        if len(steps) == count:
            return steps
        p -= 0.02
    raise DecodekitError(
        f"deep-cache params: no pow in (1, {power}] spaces {count} full steps over {num_steps} "
        f"steps around center {center}; lower center (or interval), or raise pow."
    )


class DeepCacheParams(Params):
    """Parameters of `deep-cache`."""

    interval: int = Field(
        3,
        ge=1,
        description=(
            "Full UNet every `interval` solver steps (the package's cache_interval); 1 runs every "
            "step in full (identical to the baseline). With schedule non-uniform: "
            "ceil(steps / interval) full steps."
        ),
    )
    schedule: Literal["uniform", "non-uniform"] = Field(
        "uniform",
        description=(
            "'uniform': steps 0, interval, 2·interval …; 'non-uniform': the package's "
            "quadratic spacing around `center` (its uniform=False)."
        ),
    )
    pow: float = Field(
        1.4,
        gt=1.0,
        description="Non-uniform schedule: starting power of the spacing (the package's script: 1.4).",
    )
    center: int = Field(
        15,
        ge=0,
        description="Non-uniform schedule: the step around which full steps are densest (package's script: 15).",
    )
    full_steps: list[int] | None = Field(
        None,
        description="An explicit list of full solver steps (must include 0); replaces interval/schedule.",
    )
    branch: int = Field(
        0,
        ge=0,
        description=(
            "The skip branch whose deep features are cached (the package's cache_branch_id): "
            "down block branch // 3, layer branch % 3; 0 is the shallowest (fastest)."
        ),
    )
    block: int | None = Field(
        None,
        ge=0,
        description="Instead of branch: the down block of the skip branch (0 = shallowest).",
    )
    layer: int | None = Field(
        None,
        ge=0,
        description=(
            "With block: the layer inside it (0 .. its number of resnets; that last one is the "
            "downsampler's branch)."
        ),
    )
    controlnet: Literal["full-steps", "every-step"] = Field(
        "full-steps",
        description=(
            "'full-steps': a ControlNet runs only on full steps, shallow steps reuse its last "
            "residuals; 'every-step': it runs every step (as with the package)."
        ),
    )
    parallel: bool = Field(
        False,
        description=(
            "Faster-Diffusion's parallel decoder on the shallow steps: the shallow steps after a "
            "full step run in one batched UNet call on the first one's latents (an approximation "
            "beyond DeepCache's: later steps reuse the first one's shallow encoder features)."
        ),
    )
    max_group: int = Field(8, ge=1, description="With parallel: most shallow steps in one batch.")

    @field_validator("full_steps")
    @classmethod
    def _check_full_steps(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v or any(s < 0 for s in v):
            raise ValueError("full_steps needs non-negative step indices, e.g. [0, 3, 6]")
        if 0 not in v:
            raise ValueError("full_steps must include step 0: nothing is cached before it")
        return sorted(set(v))

    @model_validator(mode="after")
    def _one_way_to_say_each_thing(self) -> DeepCacheParams:
        given = self.model_fields_set
        if self.full_steps is not None and given & {"interval", "schedule", "pow", "center"}:
            raise ValueError(
                "full_steps replaces interval/schedule/pow/center; give either full_steps or those"
            )
        if self.schedule == "uniform" and given & {"pow", "center"}:
            raise ValueError(
                "pow and center shape the non-uniform schedule; add schedule: non-uniform"
            )
        if given & {"block", "layer"}:
            if "branch" in given:
                raise ValueError("give the skip branch as branch or as block (+ layer), not both")
            if self.block is None:
                raise ValueError("layer needs block: the down block the layer belongs to")
        if self.parallel is False and "max_group" in given:
            raise ValueError("max_group applies to parallel: true")
        return self


# -- which modules a shallow step skips ------------------------------------------------------------
def skipped_modules(
    unet: torch.nn.Module, block: int, layer: int
) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's modules that a shallow step replaces by their full-step output, by name.

    As the package: every down block deeper than ``block``; in down block ``block``
    its layers (resnet and attention) from ``layer`` on and its downsampler (the
    whole block when ``layer`` is 0); the mid block; every up block deeper than
    the mirror of ``block``, and in that mirror the layers that come before layer
    ``layer`` counted from its end (the branch's skip feeds the next one).
    """
    out: list[tuple[str, torch.nn.Module]] = []
    for i, down in enumerate(unet.down_blocks):
        if i > block or (i == block and layer == 0):
            out.append((f"down_blocks.{i}", down))
        elif i == block:
            for j in range(layer, len(down.resnets)):
                out.append((f"down_blocks.{i}.resnets.{j}", down.resnets[j]))
                if getattr(down, "attentions", None) is not None:
                    out.append((f"down_blocks.{i}.attentions.{j}", down.attentions[j]))
            for j, ds in enumerate(down.downsamplers or []):
                out.append((f"down_blocks.{i}.downsamplers.{j}", ds))
    if unet.mid_block is not None:
        out.append(("mid_block", unet.mid_block))
    n = len(unet.up_blocks)
    for i, up in enumerate(unet.up_blocks):
        depth = n - 1 - i  # the down block this up block mirrors
        if depth > block:
            out.append((f"up_blocks.{i}", up))
        elif depth == block:
            k = len(up.resnets)
            for j in range(k - 1 - layer):  # mirrored layer k - 1 - j > layer
                out.append((f"up_blocks.{i}.resnets.{j}", up.resnets[j]))
                if getattr(up, "attentions", None) is not None:
                    out.append((f"up_blocks.{i}.attentions.{j}", up.attentions[j]))
    return out


def branch_of(unet: torch.nn.Module, params: DeepCacheParams) -> tuple[int, int]:
    """The (block, layer) of the skip branch, checked against this UNet; `AttachError` if absent."""
    if params.block is not None:
        block, layer, said = (
            params.block,
            params.layer or 0,
            f"block {params.block}, layer {params.layer or 0}",
        )
    else:
        block, layer = divmod(params.branch, BRANCHES_PER_BLOCK)
        said = f"branch {params.branch} (block {block}, layer {layer})"
    downs = unet.down_blocks
    layers = [len(d.resnets) for d in downs]  # a block's branches: layers 0 .. len(resnets)
    valid = [
        3 * b + j for b, k in enumerate(layers) for j in range(min(k, BRANCHES_PER_BLOCK - 1) + 1)
    ]
    if len(unet.up_blocks) != len(downs):
        raise AttachError(
            f"deep-cache needs a UNet with as many up blocks as down blocks; this one has "
            f"{len(downs)} down and {len(unet.up_blocks)} up blocks."
        )
    if block >= len(downs) or layer > layers[block]:
        raise AttachError(
            f"deep-cache params: {said} does not exist in this UNet ({len(downs)} down blocks with "
            f"{layers} layers each, each block's branches are layers 0 .. that count). "
            f"Valid branch values: {valid}; or give block (0..{len(downs) - 1}) and layer."
        )
    return block, layer


# -- batch repetition for the parallel shallow steps ---------------------------------------------
def _repeat_rows(x: Any, n: int) -> Any:
    """Repeat every tensor in ``x`` (tensors, tuples, lists) ``n`` times along the batch: (B, …) -> (n·B, …)."""
    if n == 1 or x is None:
        return x
    if torch.is_tensor(x):
        return x.repeat(n, *([1] * (x.ndim - 1)))
    if isinstance(x, (tuple, list)):
        return type(x)(_repeat_rows(v, n) for v in x)
    if isinstance(x, dict):
        return {k: _repeat_rows(v, n) for k, v in x.items()}
    raise TypeError(type(x).__name__)


# UNet call arguments with one row per sample row: repeated per step in a parallel group.
_PER_ROW = (
    "sample",
    "encoder_hidden_states",
    "class_labels",
    "timestep_cond",
    "attention_mask",
    "added_cond_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "encoder_attention_mask",
)


class _SkipHook(ModelHook):
    """On a shallow step, return this module's output of the last full step instead of running it."""

    def __init__(self, strategy: DeepCache, name: str):
        super().__init__()
        self.strategy = strategy
        self.name = name

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.strategy._module_call(self.name, self.fn_ref.original_forward, args, kwargs)


class DeepCache(UNetReuseStrategy):
    """Run the whole UNet on full steps; on the others only its shallow branch, on cached deep features."""

    name = "deep-cache"
    loops = ("continuous-denoising",)
    Params = DeepCacheParams
    slot = "denoiser-cache"
    paper = "DeepCache: Accelerating Diffusion Models for Free, arXiv:2312.00858"
    served_count = "shallow_calls"
    batch_count = "shallow_batches"
    branch: tuple[int, int] | None = None  # (block, layer), set at attach
    _full: list[int] | None = None  # full solver steps of the current call

    # -- lifecycle ----------------------------------------------------------------------
    def on_attach(self, run) -> None:
        from diffusers import UNet2DConditionModel

        unet = run.adapter.denoiser
        if not isinstance(unet, UNet2DConditionModel):
            raise AttachError(
                f"deep-cache needs a pipeline whose denoiser is a UNet2DConditionModel, got "
                f"{type(unet).__name__}; use it on a stable-diffusion pipeline."
            )
        self.branch = branch_of(unet, self.params)
        self.skipped = skipped_modules(unet, *self.branch)
        self._attach_unet(unet)
        self._mode: str | None = None  # "full" (record), "shallow" (serve) or None (pass through)
        self._hooks = ModuleHooks(HOOK_NAME)
        self._hooks.attach(
            [(m, _SkipHook(self, name)) for name, m in self.skipped], owner="the UNet's blocks"
        )
        self.reset(run)

    def on_detach(self, run) -> None:
        self._hooks.restore()
        self._mode = None
        self._served = {}

    def reset(self, run) -> None:
        self._full = None  # full solver steps of this call
        # The skipped modules' outputs of the last full UNet call, under its call index.
        self.features = StepFeatureMemo(max_steps=1)
        self._recording: dict[str, Any] = {}
        self._serving: dict[str, Any] = {}
        self._batch: int | None = None  # rows of the last full call
        self._reset_serving()

    def stats(self) -> dict[str, Any]:
        block, layer = self.branch or (None, None)
        return {**self.counts, "full_steps": list(self._full or []), "block": block, "layer": layer}

    # -- the schedule -------------------------------------------------------------------
    def full_steps(self, run) -> list[int]:
        """The full solver steps of the current call (computed once per call)."""
        if self._full is None:
            self._full = full_steps_for(self.params, solver_steps(run, "deep-cache"))
        return self._full

    def is_full(self, run, step: int) -> bool:
        """Whether denoiser call ``step`` belongs to a full solver step."""
        return step // run.adapter.scheduler_order in self.full_steps(run)

    # -- the submodule hooks --------------------------------------------------------------
    def _module_call(
        self, name: str, forward: Callable[..., Any], args: tuple, kwargs: dict
    ) -> Any:
        if self._mode == "shallow":
            return self._serving[name]
        out = forward(*args, **kwargs)
        if self._mode == "full":
            self._recording[name] = out
        return out

    # -- what UNetReuseStrategy's denoiser hooks ask ----------------------------------------
    def _is_full(self, run, step: int) -> bool:
        return self.is_full(run, step)

    def _start_full(self) -> None:
        self._mode = "full"
        self._recording = {}

    def _end_full(self, step: int, args: tuple, kwargs: dict[str, Any]) -> None:
        self._mode = None
        recorded, self._recording = self._recording, {}
        if len(recorded) == len(self.skipped):
            self.features.put(step, "deep_features", recorded)
            self._batch = self._bind(args, kwargs)["sample"].shape[0]
        else:
            self.features.clear()  # a module did not run: nothing to serve the next calls from

    def _skips_controlnet(self, run, step: int) -> bool:
        """At a shallow step with ``controlnet: full-steps`` (its residuals then reach only the
        shallow skip connections), or when the UNet call it feeds is already computed."""
        if self.is_full(run, step) or self._deep(step) is None:
            return False
        return self.params.controlnet == "full-steps" or step in self._served

    def _has_features(self) -> bool:
        return self._deep() is not None

    def _serve(self, run, step: int, call: dict[str, Any]) -> None:
        self._run_shallow(run, step, call)

    # -- shallow steps ------------------------------------------------------------------
    def _deep(self, step: int | None = None) -> dict[str, Any] | None:
        return self.features.latest("deep_features", at_or_before=step, default=None)

    def _can_serve(self, call: dict[str, Any], step: int) -> bool:
        return self._deep(step) is not None and call["sample"].shape[0] == self._batch

    def _run_shallow(self, run, step: int, call: dict[str, Any]) -> None:
        """The UNet's own forward with the deep modules served: for call ``step``, and with
        ``parallel`` for the shallow calls after it too, in one batch (step-major rows)."""
        t = torch.as_tensor(call["timestep"], device=call["sample"].device)
        cak = call.get("cross_attention_kwargs") or {}
        if self.params.parallel and "gligen" not in cak:  # GLIGEN's boxes would need repeating
            steps = self._group(run, step, t, self.params.max_group)
        else:
            steps = [step]
        g, b = len(steps), call["sample"].shape[0]
        batched = dict(call)
        if g > 1:
            batched["timestep"] = self._group_timesteps(run, steps, t, b)  # (G·B,)
            for key in _PER_ROW:
                batched[key] = _repeat_rows(call.get(key), g)  # (G·B, …)
        batched["return_dict"] = False
        self._serving = _repeat_rows(self._deep(step), g)
        self._mode = "shallow"
        try:
            out = type(self.unet).forward(self.unet, **batched)[0]  # (G·B, C, H, W)
        finally:
            self._mode, self._serving = None, {}
        self._served_group(steps, out, b)

    # -- the FLOP-ideal speed-up ----------------------------------------------------------
    def _measure_flops(self) -> tuple[int, int, int]:
        """FLOPs of one full UNet call, one shallow call (the full one less the skipped
        modules' own counts) and one ControlNet call, at the last full call's shapes."""
        from torch.utils.flop_counter import FlopCounterMode

        args, kwargs = self._last_full
        call = self._bind(args, kwargs)
        key = (tuple(call["sample"].shape), tuple(call["encoder_hidden_states"].shape))
        if key in self._flop_cache:
            return self._flop_cache[key]
        unet = self.unet
        saved, self._mode = self._mode, None  # the hooks (while attached) pass through
        skipped = [0]  # FLOPs inside the skipped modules, each counted by its own nested counter
        inner: list[FlopCounterMode] = []

        def enter(module, inputs):
            inner.append(FlopCounterMode(display=False))
            inner[-1].__enter__()

        def leave(module, inputs, output):
            mode = inner.pop()
            mode.__exit__(None, None, None)
            skipped[0] += int(mode.get_total_flops())

        handles = [
            h
            for _, m in self.skipped
            for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
        ]
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                type(unet).forward(unet, *args, **kwargs)
            f_cn = self.control.flops()
        finally:
            for h in handles:
                h.remove()
            self._mode = saved
        f_full = int(counter.get_total_flops())
        self._flop_cache[key] = (f_full, f_full - skipped[0], f_cn)
        return self._flop_cache[key]


def full_steps_for(params: DeepCacheParams, num_steps: int) -> list[int]:
    """The sorted full solver steps in ``range(num_steps)`` that ``params`` give.

    Raises:
        DecodekitError: a ``full_steps`` entry past the last step (it would be dropped
            silently), or no non-uniform spacing found.
    """
    if params.full_steps is not None:
        refuse_steps_past_end("deep-cache params.full_steps", params.full_steps, num_steps)
        return list(params.full_steps)
    if params.interval == 1:
        return list(range(num_steps))
    if params.schedule == "uniform":
        return uniform_full_steps(num_steps, params.interval)
    count = -(-num_steps // params.interval)  # ceil: the package's num_slow_step
    steps = quadratic_full_steps(num_steps, count, params.center, params.pow)
    return sorted({s for s in steps if 0 <= s < num_steps})


@hookimpl
def decodekit_register_strategies(register):
    register(DeepCache)
