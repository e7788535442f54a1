"""diffusers' own feature caches as decodekit strategies: First Block Cache, PAB, FasterCache, TaylorSeer, MagCache.

diffusers 0.42 ships five training-free feature caches for diffusion
transformers as hooks on the denoiser's blocks or attention layers, each with a
config dataclass and an ``apply_*`` function (``CacheMixin.enable_cache`` on the
models that have it). Each strategy here builds diffusers' config from its params
and calls diffusers' own code; nothing of the caches is re-implemented. What
decodekit adds is the wiring diffusers leaves to the caller:

- the current timestep (``current_timestep_callback`` of PAB and FasterCache) is
  the adapter's ``loop_timestep`` of the denoiser call under way, read in a torch
  forward pre-hook on the denoiser, which runs before every diffusers hook;
- a cache context for pipelines that set none (SD3, PixArt, Sana ...), so the
  stateful hooks of First Block Cache and TaylorSeer run there too;
- the hooks' state is reset at every pipeline call (diffusers' pipelines reset
  only models that have ``CacheMixin``);
- MagCache's ``num_inference_steps`` follows each call's step count unless given;
- attach is all or nothing, and detach removes every hook and registry diffusers
  added, so the denoiser ends exactly as it was.

Papers: First Block Cache (ParaAttention, after TeaCache: Timestep Embedding Tells,
arXiv:2411.19108); Real-Time Video Generation with Pyramid Attention Broadcast
(arXiv:2408.12588); FasterCache: Training-Free Video Diffusion Model Acceleration
with High Quality (arXiv:2410.19355); From Reusing to Forecasting: Accelerating
Diffusion Models with TaylorSeers (arXiv:2503.06923); MagCache: Fast Video
Generation with Magnitude-Aware Cache (arXiv:2506.09045).

Reproduced: each strategy's output equals diffusers' cache applied by hand at the
same config on the same pipeline and seed, and detach restores the baseline bit
for bit (tests/test_diffusers_caches.py); measured results on
docs/strategies/diffusers-caches.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any, ClassVar, Literal

import torch
from decodekit import compat
from decodekit.errors import AttachError, DecodekitError
from decodekit.hookspecs import hookimpl
from decodekit.loops import DENOISER
from decodekit.strategy import Params, Strategy
from diffusers import hooks as diffusers_hooks
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks.hooks import CacheContext, StateManager
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
from diffusers.models.cache_utils import CacheMixin
from pydantic import Field, create_model, model_validator

_ABSENT = object()

_DIT_FAMILIES = (
    "diffusion transformers whose blocks diffusers knows: Flux, Flux2, SD3, PixArt (BasicTransformerBlock), "
    "CogVideoX, CogView4, HunyuanVideo, LTX, Mochi, Wan, QwenImage"
)


# -- params from diffusers' config dataclasses -----------------------------------------------
_DOC_ENTRY = re.compile(r"^(\s*)([A-Za-z_]\w*) \((.*)\):\s*$")


def field_docs(config_cls: type) -> dict[str, str]:
    """Each field's description from a diffusers config docstring (``name (`type`, ...):`` then text)."""
    docs: dict[str, str] = {}
    lines = (inspect.getdoc(config_cls) or "").splitlines()
    i = 0
    while i < len(lines):
        m = _DOC_ENTRY.match(lines[i])
        i += 1
        if not m:
            continue
        indent, text = len(m.group(1)), []
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent
        ):
            text.append(lines[i].strip())
            i += 1
        docs[m.group(2)] = " ".join(t for t in text if t)
    return docs


def config_params(
    name: str,
    config_cls: type,
    base: type[Params],
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> type[Params]:
    """A params model with one field per field of diffusers' ``config_cls``.

    Types, defaults and descriptions come from the dataclass (its annotations and
    docstring); ``overrides[field]`` may replace ``type``, ``default``,
    ``description`` and add pydantic ``constraints`` (``ge`` ...). Private fields
    (``_...``) and callbacks (``..._callback``) are left out: decodekit wires those.
    """
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    overrides = overrides or {}
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.name.startswith("_") or f.name.endswith("_callback"):
            continue
        o = overrides.get(f.name, {})
        default = o.get("default", f.default)
        desc = o.get("description", docs.get(f.name, ""))
        fields[f.name] = (
            o.get("type", hints[f.name]),
            Field(default, description=desc, **o.get("constraints", {})),
        )
    return create_model(name, __base__=base, __module__=__name__, **fields)


def _at_least(low: float) -> dict[str, Any]:
    """An `config_params` override: the field must be at least ``low``."""
    return {"constraints": {"ge": low}}


class _CacheParams(Params):
    """Checks shared by every cache's params: regexes compile, timestep ranges are (low, high)."""

    @model_validator(mode="after")
    def _check_patterns_and_ranges(self):
        for key, value in self:
            if key.endswith("_identifiers") and value is not None:
                for pattern in value:
                    try:
                        re.compile(pattern)
                    except re.error as e:
                        raise ValueError(
                            f"{key}: {pattern!r} is not a regular expression ({e})"
                        ) from None
            if key.endswith("_range") and isinstance(value, tuple) and value[0] >= value[1]:
                raise ValueError(
                    f"{key}: ({value[0]}, {value[1]}) is empty; give (low, high) with low < high"
                )
        return self


# -- restoring the denoiser ------------------------------------------------------------------
def _snapshot(model: torch.nn.Module) -> dict[str, tuple[bool, frozenset[str], Any]]:
    """Per submodule: whether it has a diffusers registry, the hook names in it, its ``forward`` attribute."""
    snap = {}
    for name, m in model.named_modules():
        reg = compat.hook_registry(m)
        snap[name] = (
            reg is not None,
            frozenset(reg.hooks) if reg is not None else frozenset(),
            m.__dict__.get("forward", _ABSENT),
        )
    return snap


def _added_hooks(model: torch.nn.Module, before: dict) -> list[tuple[str, torch.nn.Module, Any]]:
    """The hooks registered under ``model`` since ``before`` was taken: ``(module name, module, hook)``."""
    out = []
    for name, m in model.named_modules():
        reg = compat.hook_registry(m)
        if reg is None:
            continue
        had = before.get(name, (False, frozenset(), _ABSENT))[1]
        out += [(name, m, hook) for hname, hook in reg.hooks.items() if hname not in had]
    return out


def _remove_added(model: torch.nn.Module, before: dict) -> None:
    """Remove every hook added since ``before``; a registry diffusers created goes, with the ``forward`` it set."""
    for name, m in model.named_modules():
        reg = compat.hook_registry(m)
        if reg is None:
            continue
        had_reg, had, forward = before.get(name, (False, frozenset(), _ABSENT))
        for hname in [h for h in reg.hooks if h not in had]:
            reg.remove_hook(hname, recurse=False)
        if not had_reg and not reg.hooks:
            compat.remove_hook_registry(m)
        if set(reg.hooks) == had:  # removing a hook leaves a bound ``forward`` behind
            if forward is _ABSENT:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = forward
    root = compat.hook_registry(model)
    if root is not None:  # its cached list of child registries may name the removed ones
        root.invalidate_child_registries_cache()


def _passed_timestep(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The timestep a denoiser call was given (a transformer's ``timestep`` keyword, a UNet's second argument)."""
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    return torch.as_tensor(t).reshape(-1)[0] if t is not None else None


def _has_context(manager: Any) -> bool:
    """Whether a diffusers ``StateManager`` has a cache context (its ``context`` raises without one)."""
    try:
        return manager.context is not None
    except ValueError:
        return False


# -- the strategies --------------------------------------------------------------------------
class DiffusersCache(Strategy):
    """Base of the strategies that apply one of diffusers' cache configs to the pipeline's denoiser.

    A subclass names diffusers' config class and ``apply_*`` function, its params
    (`config_params`), and may convert params to config fields (`config_kwargs`)
    and say which denoiser calls the cache served (`served_call`).
    """

    loops = ("continuous-denoising",)
    slot = "denoiser-cache"
    config_class: ClassVar[type]
    apply_name: ClassVar[str] = ""  # the diffusers.hooks function that applies it
    hooks_what: ClassVar[str] = "modules"  # what diffusers hooks, for messages and stats
    needs_timestep: ClassVar[bool] = False
    hint: ClassVar[str] = ""  # how to make diffusers find what it hooks, in refusals

    def __init__(self, params=None, *, path: str = "params", **kwargs):
        super().__init__(params, path=path, **kwargs)
        self.config: Any = None
        self.model: torch.nn.Module | None = None
        self._hooks: list[tuple[str, torch.nn.Module, Any]] = []
        self.hooked = 0  # blocks or layers diffusers hooked at attach
        self._timestep: Any = None
        self.reset(None)

    # -- building diffusers' config -----------------------------------------------------
    def config_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of diffusers' config, from the params (without callbacks)."""
        return dict(self.params)

    def make_config(self) -> Any:
        kwargs = self.config_kwargs()
        names = {f.name for f in dataclasses.fields(self.config_class)}
        if "current_timestep_callback" in names:
            kwargs["current_timestep_callback"] = self.current_timestep
        return self.config_class(**kwargs)

    def current_timestep(self) -> Any:
        """The timestep of the denoiser call under way (diffusers' ``current_timestep_callback``)."""
        return self._timestep

    def apply(self, model: torch.nn.Module, config: Any) -> None:
        """Apply the cache: ``enable_cache`` on a ``CacheMixin`` model, else diffusers' ``apply_*``."""
        if isinstance(model, CacheMixin):
            model.enable_cache(config)
        else:
            getattr(diffusers_hooks, self.apply_name)(model, config)

    # -- lifecycle ----------------------------------------------------------------------
    def on_attach(self, run) -> None:
        model = run.adapter.denoiser
        cls = type(model).__name__
        if isinstance(model, CacheMixin) and model.is_cache_enabled:
            raise AttachError(
                f"{self.name}: the {cls} already has a diffusers cache enabled "
                f"({type(getattr(model, '_cache_config', None)).__name__}); call its disable_cache() first, or "
                "attach without this strategy."
            )
        before = _snapshot(model)
        had_cache_attr = "_cache_config" in model.__dict__
        self.config = self.make_config()
        try:
            self.apply(model, self.config)
            self._hooks = _added_hooks(model, before)
            if all(name == "" for name, _, _ in self._hooks):  # none on its blocks or layers
                raise AttachError(
                    self.unsupported(
                        model,
                        f"diffusers found no {self.hooks_what.replace('_', ' ')} to hook in it",
                    )
                )
        except Exception as e:
            self._undo(model, before, had_cache_attr)
            if isinstance(e, DecodekitError):
                raise
            raise AttachError(self.unsupported(model, self.explain(e))) from None
        self.model = model
        self.hooked = sum(1 for name, _, _ in self._hooks if name)  # the root's hook is no layer
        self._before = before
        self._had_cache_attr = had_cache_attr
        self._managers = self._state_managers()
        self._pre_hook = model.register_forward_pre_hook(
            self._before_denoiser_call, with_kwargs=True
        )
        self.reset(run)

    def on_detach(self, run) -> None:
        if self.model is None:
            return
        self._pre_hook.remove()
        self._undo(self.model, self._before, self._had_cache_attr)
        self.model, self._hooks, self._managers = None, [], []

    def _undo(self, model: torch.nn.Module, before: dict, had_cache_attr: bool) -> None:
        if isinstance(model, CacheMixin) and model.is_cache_enabled:
            model.disable_cache()
        if not had_cache_attr:  # enable/disable_cache leave an instance attribute behind
            model.__dict__.pop("_cache_config", None)
        _remove_added(model, before)

    def explain(self, error: Exception) -> str:
        """Why diffusers' ``apply_*`` raised ``error``, in words (override for its known failures)."""
        return f"diffusers refused it ({type(error).__name__}: {error})"

    def unsupported(self, model: torch.nn.Module, why: str) -> str:
        return (
            f"{self.name} cannot attach to the {type(model).__name__}: {why}. diffusers' "
            f"{self.config_class.__name__} hooks the {self.hooks_what.replace('_', ' ')} of {_DIT_FAMILIES}. "
            f"{self.hint}For UNet pipelines use faster-diffusion (or deep-cache)."
        )

    def _state_managers(self) -> list[Any]:
        found: list[Any] = []
        for _, _, hook in self._hooks:
            for value in vars(hook).values():
                if isinstance(value, StateManager) and all(value is not f for f in found):
                    found.append(value)
        return found

    def reset(self, run) -> None:
        for _, module, hook in self._hooks:
            hook.reset_state(module)  # a no-op for diffusers' stateless hooks
        self.counts = {"denoiser_calls": 0, "cached_calls": 0}
        self._timestep = None

    def stats(self) -> dict[str, Any]:
        out = {
            "denoiser_calls": self.counts["denoiser_calls"],
            f"hooked_{self.hooks_what}": self.hooked,
        }
        if self.reports_cached:
            out["cached_calls"] = self.counts["cached_calls"]
        return out

    # -- per denoiser call --------------------------------------------------------------
    reports_cached: ClassVar[bool] = False

    def served_call(self) -> bool:
        """Whether diffusers' cache served the denoiser call that just ran (where its state says so)."""
        return False

    def _before_denoiser_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Runs before any diffusers hook of the denoiser: the call's timestep and cache context."""
        adapter = self.run.adapter
        step = adapter.step  # this call's index: the adapter counts it inside the forward
        # this call's loop step (Flux with true_cfg_scale calls twice a step: cond, uncond)
        self._timestep = adapter.loop_timestep(adapter.hook_step)
        if self._timestep is None:  # the loop's schedule is unknown: the timestep it passed
            self._timestep = _passed_timestep(args, kwargs)
        if self.needs_timestep and self._timestep is None:
            raise DecodekitError(
                f"{self.name} needs the timestep of each denoiser call, and neither the "
                f"{type(adapter.pipe).__name__} adapter nor call {step}'s arguments tell it."
            )
        if step == 0:
            self.first_call(adapter)
        for manager in self._managers:
            if not _has_context(manager):  # the pipeline sets none (SD3, PixArt ...): one state
                manager.set_context(CacheContext("decodekit"))

    def first_call(self, adapter) -> None:
        """At the first denoiser call of a pipeline call, once the step count is known (override)."""

    @hookimpl
    def decodekit_denoiser_output(self, run, step, role, module, args, kwargs, output):
        if role != DENOISER:
            return
        self.counts["denoiser_calls"] += 1
        if self.reports_cached and self.served_call():
            self.counts["cached_calls"] += 1

    def _shared_state(self) -> Any:
        return self._managers[0].get_state()


# First Block Cache ------------------------------------------------------------------------------
FirstBlockCacheParams = config_params(
    "FirstBlockCacheParams",
    FirstBlockCacheConfig,
    _CacheParams,
    overrides={"threshold": _at_least(0.0)},
)


class FirstBlockCache(DiffusersCache):
    """Run the first transformer block; when its residual changed little since the last full call, reuse the rest."""

    name = "first-block-cache"
    Params = FirstBlockCacheParams
    paper = (
        "First Block Cache (ParaAttention), after TeaCache: Timestep Embedding Tells: It's Time to "
        "Cache for Video Diffusion Model, arXiv:2411.19108"
    )
    config_class = FirstBlockCacheConfig
    apply_name = "apply_first_block_cache"
    hooks_what = "blocks"
    reports_cached = True

    def explain(self, error: Exception) -> str:
        if isinstance(error, IndexError):  # diffusers pops a first and a last block
            return "it has fewer than two transformer blocks (a first block to test and a last one)"
        return super().explain(error)

    def apply(self, model: torch.nn.Module, config: Any) -> None:
        super().apply(model, config)
        if any(getattr(m, "context_pre_only", None) is True for m in model.modules()):
            # diffusers' tail hook subtracts the first block's encoder states from the last
            # block's, which returns None there: a TypeError at the first call
            raise AttachError(
                self.unsupported(
                    model,
                    "its last block returns no encoder states (context_pre_only, as SD3's), "
                    "which diffusers' first-block cache needs",
                )
            )

    def served_call(self) -> bool:
        return not self._shared_state().should_compute


# Pyramid Attention Broadcast ---------------------------------------------------------------------
class _PABChecks(_CacheParams):
    @model_validator(mode="after")
    def _one_range(self):
        if all(
            getattr(self, f"{k}_attention_block_skip_range") is None
            for k in ("spatial", "temporal", "cross")
        ):
            raise ValueError(
                "set at least one of spatial_attention_block_skip_range, "
                "temporal_attention_block_skip_range, cross_attention_block_skip_range (e.g. 2)"
            )
        return self


PyramidAttentionBroadcastParams = config_params(
    "PyramidAttentionBroadcastParams",
    PyramidAttentionBroadcastConfig,
    _PABChecks,
    overrides={
        # diffusers falls back to 2 (with a warning) when all three are None; say it.
        "spatial_attention_block_skip_range": {"default": 2, "constraints": {"ge": 1}},
        "temporal_attention_block_skip_range": _at_least(1),
        "cross_attention_block_skip_range": _at_least(1),
    },
)


class PyramidAttentionBroadcast(DiffusersCache):
    """Reuse attention outputs across steps inside a timestep range, cross > temporal > spatial."""

    name = "pyramid-attention-broadcast"
    Params = PyramidAttentionBroadcastParams
    paper = "Real-Time Video Generation with Pyramid Attention Broadcast, arXiv:2408.12588"
    config_class = PyramidAttentionBroadcastConfig
    apply_name = "apply_pyramid_attention_broadcast"
    hooks_what = "attention_layers"
    needs_timestep = True


# FasterCache ------------------------------------------------------------------------------------
class _FasterCacheExtra(_CacheParams):
    attention_weight: float = Field(
        0.5,
        description=(
            "Weight w of the attention approximation at skipped steps, out = o_t + w (o_t - o_t-2) "
            "(diffusers' attention_weight_callback, constant here; diffusers' default 0.5)."
        ),
    )


FasterCacheParams = config_params(
    "FasterCacheParams",
    FasterCacheConfig,
    _FasterCacheExtra,
    overrides={
        "spatial_attention_block_skip_range": _at_least(1),
        "temporal_attention_block_skip_range": _at_least(1),
        "unconditional_batch_skip_range": _at_least(1),
        "tensor_format": {
            "type": Literal["BCHW", "BCFHW", "BFCHW"],
            "default": "BCHW",
            "description": (
                "Layout of the denoiser's output, used to split latent frames for the frequency "
                "split: BCHW for images (decodekit's default; diffusers' is the video layout BCFHW)."
            ),
        },
    },
)


class FasterCache(DiffusersCache):
    """Reuse attention outputs every other step and approximate the unconditional branch in frequency space."""

    name = "faster-cache"
    Params = FasterCacheParams
    paper = "FasterCache: Training-Free Video Diffusion Model Acceleration with High Quality, arXiv:2410.19355"
    config_class = FasterCacheConfig
    apply_name = "apply_faster_cache"
    hooks_what = "attention_layers"
    needs_timestep = True

    def config_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.params)
        weight = kwargs.pop("attention_weight")
        kwargs["attention_weight_callback"] = lambda _module: weight
        return kwargs

    def _before_denoiser_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        super()._before_denoiser_call(module, args, kwargs)
        if self.params.is_guidance_distilled:
            lo, hi = self.params.spatial_attention_timestep_skip_range
            t = self._timestep
            if self.run.adapter.step == 0 and lo < t < hi:
                # diffusers would skip attention before it has anything cached, and fail
                raise DecodekitError(
                    f"faster-cache: the first step's timestep {float(t):g} lies inside "
                    f"params.spatial_attention_timestep_skip_range ({lo}, {hi}); a guidance-distilled "
                    "model needs one full step before FasterCache can reuse attention. Lower the "
                    f"upper bound below {float(t):g} (diffusers' default is 681)."
                )
            return
        z_t = self.run.adapter.initial_latents  # (B, ...) rows of this call
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (2B, ...) under CFG
        if z_t is None or not torch.is_tensor(hidden):
            return
        if hidden.shape[0] == 2 * z_t.shape[0]:
            self._check_split(kwargs, hidden.shape[0])
            return
        raise DecodekitError(
            f"faster-cache: the {type(self.run.adapter.pipe).__name__} runs its denoiser on "
            f"{hidden.shape[0]} rows for {z_t.shape[0]} images, so there is no batched "
            "unconditional half for FasterCache to approximate. Set params.is_guidance_distilled: "
            "true (Flux and other guidance-distilled models), or run a pipeline that batches "
            "classifier-free guidance with guidance_scale > 1."
        )

    def _check_split(self, kwargs: dict, rows: int) -> None:
        """Refuse a denoiser call with a batched input diffusers' FasterCache would not halve."""
        split = set(self.config._unconditional_conditional_input_kwargs_identifiers)
        unsplit = sorted(
            k
            for k, v in kwargs.items()
            if torch.is_tensor(v) and v.ndim and v.shape[0] == rows and k not in split
        )
        if unsplit:
            raise DecodekitError(
                f"faster-cache: the {type(self.model).__name__} takes {', '.join(unsplit)} batched "
                "with the unconditional half, and diffusers' FasterCache halves only "
                f"{', '.join(sorted(split))}, so it does not support this model under "
                "classifier-free guidance. Use another denoiser cache here "
                "(pyramid-attention-broadcast, taylorseer-cache ...)."
            )


# TaylorSeer --------------------------------------------------------------------------------------
_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
}

TaylorSeerCacheParams = config_params(
    "TaylorSeerCacheParams",
    TaylorSeerCacheConfig,
    _CacheParams,
    overrides={
        "cache_interval": _at_least(1),
        "disable_cache_before_step": _at_least(0),
        "disable_cache_after_step": _at_least(0),
        "max_order": _at_least(0),
        "taylor_factors_dtype": {
            "type": Literal[tuple(_DTYPES)],
            "default": "bfloat16",
            "description": (
                "dtype the Taylor factors are stored and computed in: bfloat16 (diffusers' default; "
                "less memory), float16, float32 or float64."
            ),
        },
    },
)


class TaylorSeerCache(DiffusersCache):
    """Forecast hooked layers' outputs at skipped steps from a Taylor expansion of their past outputs."""

    name = "taylorseer-cache"
    Params = TaylorSeerCacheParams
    paper = "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers, arXiv:2503.06923"
    config_class = TaylorSeerCacheConfig
    apply_name = "apply_taylorseer_cache"
    hooks_what = "modules"
    hint = (
        "Its default patterns match attention layers named attn (Flux, SD3); elsewhere name "
        "the modules in params.cache_identifiers (regexes matched in full, e.g. "
        "'transformer_blocks\\.\\d+\\.attn1'). "
    )
    reports_cached = True

    def config_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.params)
        kwargs["taylor_factors_dtype"] = _DTYPES[kwargs["taylor_factors_dtype"]]
        for key in ("skip_predict_identifiers", "cache_identifiers"):
            if kwargs[key] is not None:
                kwargs[key] = list(kwargs[key])
        return kwargs

    def served_call(self) -> bool:
        state = self._shared_state()
        return state.last_update_step != state.current_step


# MagCache ---------------------------------------------------------------------------------------
class _MagChecks(_CacheParams):
    @model_validator(mode="after")
    def _ratios(self):
        if self.mag_ratios is None and not self.calibrate:
            raise ValueError(
                "mag_ratios is required (they depend on the checkpoint): give a list of ratios, "
                "'flux' for diffusers' FLUX_MAG_RATIOS, or set calibrate: true for one run that "
                "prints them"
            )
        if isinstance(self.mag_ratios, list) and not self.mag_ratios:
            raise ValueError("mag_ratios: give at least one ratio")
        return self


MagCacheParams = config_params(
    "MagCacheParams",
    MagCacheConfig,
    _MagChecks,
    overrides={
        "threshold": _at_least(0.0),
        "max_skip_steps": _at_least(0),
        "retention_ratio": {"constraints": {"ge": 0.0, "le": 1.0}},
        "num_inference_steps": {
            "type": int | None,
            "default": None,
            "constraints": {"ge": 1},
            "description": (
                "Steps the mag_ratios are interpolated to. None (decodekit's default): the step "
                "count of each pipeline call, so it always matches."
            ),
        },
        "mag_ratios": {
            "type": list[float] | Literal["flux"] | None,
            "description": (
                "The checkpoint's magnitude ratios per step (interpolated to the step count), "
                "'flux' for diffusers' FLUX_MAG_RATIOS, or None with calibrate: true."
            ),
        },
    },
)


class MagCache(DiffusersCache):
    """Skip all blocks while the accumulated magnitude-ratio error stays under a threshold; reuse the residual."""

    name = "mag-cache"
    Params = MagCacheParams
    paper = "MagCache: Fast Video Generation with Magnitude-Aware Cache, arXiv:2506.09045"
    config_class = MagCacheConfig
    apply_name = "apply_mag_cache"
    hooks_what = "blocks"
    reports_cached = True

    def config_kwargs(self, num_steps: int | None = None) -> dict[str, Any]:
        kwargs = dict(self.params)
        if kwargs["mag_ratios"] == "flux":
            kwargs["mag_ratios"] = FLUX_MAG_RATIOS.clone()
        steps = num_steps or kwargs["num_inference_steps"]
        if steps is None:  # replaced at each call's first denoiser call
            steps = len(kwargs["mag_ratios"]) if kwargs["mag_ratios"] is not None else 28
        kwargs["num_inference_steps"] = steps
        return kwargs

    def first_call(self, adapter) -> None:
        n = adapter.num_calls  # denoiser calls per cache context: one per loop timestep
        if n is None:  # the adapter cannot tell: the schedule the scheduler was just given
            timesteps = getattr(adapter.scheduler, "timesteps", None)
            n = len(timesteps) if timesteps is not None else None
        if self.params.num_inference_steps is not None or n is None:
            return
        if n != self.config.num_inference_steps:
            fresh = self.config_class(**self.config_kwargs(num_steps=n))
            for f in dataclasses.fields(fresh):  # the hooks share this config object
                setattr(self.config, f.name, getattr(fresh, f.name))

    def served_call(self) -> bool:
        return not self._shared_state().should_compute


STRATEGIES = (FirstBlockCache, PyramidAttentionBroadcast, FasterCache, TaylorSeerCache, MagCache)
"""The five diffusers caches, in the order diffusers added them."""


@hookimpl
def decodekit_register_strategies(register):
    for cls in STRATEGIES:
        register(cls)
