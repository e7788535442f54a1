"""What the UNet feature-reuse strategies share (`faster-diffusion`, `deep-cache`).

Both serve some of a pipeline's UNet calls themselves: they bind the call's
arguments, count solver steps from the adapter's call counter, hand back what the
UNet would have returned, remember the last ControlNet call to reuse it, and
state a FLOP-ideal speed-up from counted FLOPs. `UNetReuseStrategy` is their
common base: the denoiser hooks as a template.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from .errors import DecodekitError
from .hookspecs import hookimpl
from .loops import CONTROLNET, DENOISER
from .strategy import Strategy


def solver_steps(run, strategy: str) -> int:
    """Solver steps of the current pipeline call: its denoiser calls over ``scheduler.order``."""
    n = run.adapter.num_calls
    if n is None:
        raise DecodekitError(
            f"{strategy} cannot tell how many steps {type(run.adapter.pipe).__name__} runs "
            "(it sets no _num_timesteps); use a diffusers SD/SDXL/ControlNet pipeline."
        )
    order = run.adapter.scheduler_order
    return (n + order - 1) // order


def refuse_steps_past_end(where: str, steps: list[int], num_steps: int) -> None:
    """Raise for listed steps that this call never reaches (they would be dropped silently)."""
    past = sorted(s for s in steps if s >= num_steps)
    if past:
        raise DecodekitError(
            f"{where}: {past} past the last step of this call; valid steps are "
            f"0..{num_steps - 1} ({num_steps} solver steps). Drop them, or raise "
            "num_inference_steps."
        )


def bind_call(signature: inspect.Signature, unet: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A UNet call's arguments by name, defaults filled in (``self`` left out)."""
    bound = signature.bind(unet, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self", None)
    return out


def unet_output(sample: torch.Tensor, call: dict[str, Any]) -> Any:
    """What the UNet returns for ``call``: a ``UNet2DConditionOutput``, or ``(sample,)`` without return_dict."""
    if call.get("return_dict", True):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample)
    return (sample,)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` under ``torch.no_grad``, counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class ControlNetCalls:
    """The last ControlNet call of a run (role ``"controlnet"``): served again at steps the UNet skips.

    Attributes:
        module: the ControlNet, once seen.
        output: its last output; None before the first call of a pipeline call.
    """

    def __init__(self) -> None:
        self.module: torch.nn.Module | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the last call (a new pipeline call starts)."""
        self.output: Any = None
        self._args: tuple[tuple, dict[str, Any]] | None = None

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.module, self.output, self._args = module, output, (args, kwargs)

    def flops(self) -> int:
        """FLOPs of the last call run again (0 when there was none)."""
        if self.module is None or self._args is None:
            return 0
        cn, (args, kwargs) = self.module, self._args
        return count_flops(lambda: type(cn).forward(cn, *args, **kwargs))


def flop_ideal(
    full: int, served: int, f_full: int, f_served: int, cn_run: int, cn_skipped: int, f_cn: int
) -> float | None:
    """Baseline FLOPs over a strategy's: ``full`` UNet calls run and ``served`` served at
    ``f_served`` each, ``cn_run`` ControlNet calls run and ``cn_skipped`` skipped."""
    base = (full + served) * f_full + (cn_run + cn_skipped) * f_cn
    ours = full * f_full + served * f_served + cn_run * f_cn
    return base / ours if ours else None


class UNetReuseStrategy(Strategy):
    """Base of the strategies that serve some UNet calls from what the last full call left.

    The denoiser hooks are here, as a template: a UNet call at a full step (or one
    that cannot be served) runs for real between `_start_full` and `_end_full`; any
    other is answered from ``_served`` (call index -> output), which `_serve` fills
    for that call and possibly the next ones. A ControlNet call is answered with its
    last output where `_skips_controlnet` says so. A subclass calls `_attach_unet`
    in ``on_attach`` and `_reset_serving` in ``reset``, and defines the methods
    that raise `NotImplementedError` here.

    Attributes:
        served_count: the ``counts`` key of served UNet calls (``decoder_calls`` …).
        batch_count: the ``counts`` key of the computations that served them.
    """

    served_count: ClassVar[str] = "served_calls"
    batch_count: ClassVar[str] = "served_batches"

    def __init__(self, params=None, *, path: str = "params", **kwargs):
        super().__init__(params, path=path, **kwargs)
        self.counts: dict[str, int] = {}  # per call, from reset()

    def _attach_unet(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.control = ControlNetCalls()  # the last role="controlnet" call
        self._signature = inspect.signature(type(unet).forward)
        self._flop_cache: dict[Any, tuple[int, int, int]] = {}

    def _reset_serving(self) -> None:
        self._served: dict[int, torch.Tensor] = {}  # call index -> (B, C, H, W) precomputed output
        self.control.reset()
        self._last_full: tuple[tuple, dict[str, Any]] | None = None
        self.counts: dict[str, int] = {
            "full_calls": 0,
            self.served_count: 0,
            self.batch_count: 0,
            "controlnet_run": 0,
            "controlnet_skipped": 0,
            "sequential_fallbacks": 0,
        }

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        return bind_call(self._signature, self.unet, args, kwargs)

    def _group(self, run, step: int, t: torch.Tensor, max_group: int) -> list[int]:
        """Call ``step`` and the served calls right after it, at most ``max_group``.

        Only ``step`` when the call's timestep ``t`` is not a scalar, or is not the
        loop's timestep at ``step`` (then the later calls' timesteps cannot be trusted
        either: counted in ``sequential_fallbacks``).
        """
        if t.ndim != 0:
            return [step]
        known = run.adapter.loop_timestep(step)
        if known is None or not torch.equal(known.to(t), t):
            self.counts["sequential_fallbacks"] += 1
            return [step]
        steps, n = [step], run.adapter.num_calls
        while (
            steps[-1] + 1 < n and len(steps) < max_group and not self._is_full(run, steps[-1] + 1)
        ):
            steps.append(steps[-1] + 1)
        return steps

    def _group_timesteps(self, run, steps: list[int], t: torch.Tensor, rows: int) -> torch.Tensor:
        """(G·B,) the timestep of every row of a group of G calls, step-major; ``t`` is call
        ``steps[0]``'s (a scalar, or (B,) for a group of one)."""
        if len(steps) == 1:
            return t.expand(rows) if t.ndim == 0 else t  # (B,)
        per_step = torch.stack([t] + [run.adapter.loop_timestep(s).to(t) for s in steps[1:]])
        return per_step.repeat_interleave(rows)  # (G·B,)

    # -- what a subclass defines --------------------------------------------------------------
    def _is_full(self, run, step: int) -> bool:
        """Whether denoiser call ``step`` runs the whole UNet."""
        raise NotImplementedError

    def _can_serve(self, call: dict[str, Any], step: int) -> bool:
        """Whether what is kept can answer this call (features present, same batch …)."""
        raise NotImplementedError

    def _start_full(self) -> None:
        """Just before a full UNet call runs: start capturing."""
        raise NotImplementedError

    def _end_full(self, step: int, args: tuple, kwargs: dict[str, Any]) -> None:
        """Just after full call ``step`` ran: keep what it left."""
        raise NotImplementedError

    def _serve(self, run, step: int, call: dict[str, Any]) -> None:
        """Put the output of call ``step`` (and of any later calls computed with it) in ``_served``."""
        raise NotImplementedError

    def _served_group(self, steps: list[int], out: torch.Tensor, rows: int) -> None:
        """Keep (G·B, …) ``out`` of one computation for the G calls ``steps``, B rows each."""
        self.counts[self.batch_count] += 1
        for s, chunk in zip(steps, out.split(rows)):
            self._served[s] = chunk

    def _skips_controlnet(self, run, step: int) -> bool:
        """Whether the ControlNet call feeding UNet call ``step`` is answered with its last output."""
        raise NotImplementedError

    def _has_features(self) -> bool:
        raise NotImplementedError

    def _measure_flops(self) -> tuple[int, int, int]:
        """FLOPs of one full UNet call, one served call and one ControlNet call."""
        raise NotImplementedError

    # -- the denoiser hooks -------------------------------------------------------------------
    @hookimpl
    def decodekit_denoiser_forward(self, run, step, role, args, kwargs):
        if role == CONTROLNET:
            if self.control.output is None or not self._skips_controlnet(run, step):
                return None
            self.counts["controlnet_skipped"] += 1
            return self.control.output  # it feeds a served UNet call (or only shallow skips)
        if role != DENOISER:
            return None
        call = self._bind(args, kwargs)
        if self._is_full(run, step) or not self._can_serve(call, step):
            self._start_full()
            return None
        if step not in self._served:
            self._serve(run, step, call)
        out = self._served.pop(step)  # (B, C, H, W)
        self.counts[self.served_count] += 1
        return unet_output(out, call)

    @hookimpl
    def decodekit_denoiser_output(self, run, step, role, module, args, kwargs, output):
        if role == CONTROLNET:
            self.control.record(module, args, kwargs, output)
            self.counts["controlnet_run"] += 1
            return
        if role != DENOISER:
            return
        self.counts["full_calls"] += 1
        self._last_full = (args, kwargs)
        self._served = {}
        self._end_full(step, args, kwargs)

    # -- the FLOP-ideal speed-up --------------------------------------------------------------
    def ideal_speedup(self, run) -> float | None:
        """Baseline FLOPs over ours for the last call, from counted FLOPs of one call of each kind."""
        c = self.counts
        if not c or self._last_full is None or not self._has_features():
            return None
        f_full, f_served, f_cn = self._measure_flops()
        return flop_ideal(
            c["full_calls"],
            c[self.served_count],
            f_full,
            f_served,
            c["controlnet_run"],
            c["controlnet_skipped"],
            f_cn,
        )
