"""The private transformers and diffusers internals decodekit relies on, reached from here only.

Some loops need what upstream keeps private: the custom decoding loops run
inside transformers' ``generate(custom_generate=...)`` and do what its own
``_sample`` / ``_beam_search`` do (prefill, then update the model kwargs per
token); the diffusers adapters restore a module exactly after removing their
hook, which needs the registry diffusers keeps on the module. Every other module
calls the functions below, so an upstream release that renames or changes one
of these breaks here, in one place.

`INTERNALS` lists each private symbol with the parameters decodekit passes;
``tests/test_compat.py`` checks them against the installed libraries (and runs
each function once on a tiny model), failing with the symbol's name and the
installed version. A call that finds a symbol missing raises
`UpstreamChangedError` with the same information.

Tested with the versions in `TESTED_WITH`; pyproject.toml declares the ranges.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from decodekit.errors import DecodekitError

TESTED_WITH = {"torch": "2.14.1", "diffusers": "0.42.1", "transformers": "5.24.0"}
"""The versions the test suite last passed with (pyproject.toml admits their minor releases)."""


class UpstreamChangedError(DecodekitError, RuntimeError):
    """A private transformers/diffusers symbol decodekit needs is gone or changed."""


@dataclass(frozen=True)
class Internal:
    """One private upstream symbol decodekit uses.

    Attributes:
        library: the distribution that defines it (``transformers``, ``diffusers``).
        owner: dotted path of the class or module that defines it.
        name: the attribute's name on ``owner``.
        parameters: the parameters decodekit passes (for a callable), checked by name;
            None for a plain attribute or property.
        used_by: the decodekit function that reaches it.
    """

    library: str
    owner: str
    name: str
    parameters: tuple[str, ...] | None
    used_by: str

    @property
    def symbol(self) -> str:
        return f"{self.owner}.{self.name}"

    def problem(self) -> str | None:
        """Why the installed library does not provide this symbol as expected, or None."""
        module_name, _, cls_name = self.owner.rpartition(".")
        try:
            owner = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError):
            return f"{self.owner} cannot be imported"
        if not hasattr(owner, self.name):
            return f"{self.symbol} does not exist"
        if self.parameters is None:
            return None
        params = inspect.signature(getattr(owner, self.name)).parameters
        missing = [p for p in self.parameters if p not in params]
        if missing:
            return f"{self.symbol}{inspect.signature(getattr(owner, self.name))} lacks {missing}"
        return None


INTERNALS: tuple[Internal, ...] = (
    Internal(
        "transformers",
        "transformers.generation.utils.GenerationMixin",
        "_prefill",
        ("input_ids", "generation_config", "model_kwargs"),
        "prefill",
    ),
    Internal(
        "transformers",
        "transformers.generation.utils.GenerationMixin",
        "_update_model_kwargs_for_generation",
        ("outputs", "model_kwargs", "is_encoder_decoder"),
        "update_model_kwargs",
    ),
    # Sets generation_config._eos_token_tensor / _pad_token_tensor, which the loops read.
    Internal(
        "transformers",
        "transformers.generation.utils.GenerationMixin",
        "_prepare_special_tokens",
        ("generation_config",),
        "eos_token_tensor, pad_token_tensor",
    ),
    Internal(
        "transformers",
        "transformers.configuration_utils.PreTrainedConfig",
        "_attn_implementation",
        None,
        "attn_implementation",
    ),
    # Creates the registry on ``module._diffusers_hook``, which hook_registry reads.
    Internal(
        "diffusers",
        "diffusers.hooks.hooks.HookRegistry",
        "check_if_exists_or_initialize",
        ("module",),
        "hook_registry, remove_hook_registry",
    ),
    Internal(
        "diffusers",
        "diffusers.pipelines.stable_diffusion.StableDiffusionPipeline",
        "_callback_tensor_inputs",
        None,
        "callback_tensor_inputs",
    ),
)
"""Every private upstream symbol decodekit uses (``tests/test_compat.py`` checks them)."""


def installed_version(library: str) -> str:
    """The installed version of ``library``, or ``"not installed"``."""
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "not installed"


def _get(obj: Any, name: str, library: str, used_by: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise UpstreamChangedError(
            f"{type(obj).__name__}.{name} is missing in {library} {installed_version(library)}; "
            f"decodekit.compat.{used_by} needs updating for this release (tested with "
            f"{library} {TESTED_WITH.get(library, '?')})."
        ) from None


# -- transformers: generation --------------------------------------------------------------
def prefill(model: Any, input_ids: torch.Tensor, generation_config: Any, model_kwargs: dict) -> Any:
    """Run the prompt through ``model`` as ``generate`` does before its first token; the outputs."""
    fn = _get(model, "_prefill", "transformers", "prefill")
    return fn(input_ids, generation_config, model_kwargs)


def update_model_kwargs(
    model: Any, outputs: Any, model_kwargs: dict, *, is_encoder_decoder: bool = False
) -> dict:
    """``model_kwargs`` advanced by one token after ``outputs`` (cache, attention mask, positions)."""
    fn = _get(model, "_update_model_kwargs_for_generation", "transformers", "update_model_kwargs")
    return fn(outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder)


def eos_token_tensor(generation_config: Any) -> torch.Tensor | None:
    """The end-of-sequence ids ``generate`` prepared for this call, ``(n,)``, or None."""
    return _get(generation_config, "_eos_token_tensor", "transformers", "eos_token_tensor")


def pad_token_tensor(generation_config: Any) -> torch.Tensor | None:
    """The padding id ``generate`` prepared for this call (a 0-d tensor), or None."""
    return _get(generation_config, "_pad_token_tensor", "transformers", "pad_token_tensor")


def legacy_reorder_cache(model: Any) -> Any:
    """The model's own ``_reorder_cache(cache, rows)`` (XLNet, RAG's legacy caches), or None.

    Models with a transformers ``Cache`` have none; their cache reorders itself.
    """
    return getattr(model, "_reorder_cache", None)


# -- transformers: attention -----------------------------------------------------------------
def attn_implementation(model: Any) -> str | None:
    """The attention implementation ``model`` dispatches to (``"sdpa"``, ``"eager"`` ...).

    transformers has a public setter (``model.set_attn_implementation``) but reads
    it back only through the config's private property.
    """
    return _get(model.config, "_attn_implementation", "transformers", "attn_implementation")


# -- diffusers: hooks and pipelines ----------------------------------------------------------
def hook_registry(module: torch.nn.Module) -> Any:
    """The diffusers ``HookRegistry`` on ``module``, or None (never creates one)."""
    return getattr(module, "_diffusers_hook", None)


def remove_hook_registry(module: torch.nn.Module) -> None:
    """Delete ``module``'s (empty) diffusers ``HookRegistry``; diffusers itself never does."""
    if hasattr(module, "_diffusers_hook"):
        del module._diffusers_hook


def callback_tensor_inputs(pipe: Any) -> list[str]:
    """The tensors a diffusers pipeline lets ``callback_on_step_end`` read and replace."""
    return list(getattr(pipe, "_callback_tensor_inputs", ["latents"]))
