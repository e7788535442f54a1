"""``pipeline.compile``: the pipeline's model call wrapped in ``torch.compile`` for run and bench.

The module that runs every step is compiled in place (``nn.Module.compile``): the
object stays the same, so strategies that hook it (dkv-cache and block-cache switch
its attention; UNet caches hook its blocks) attach to it as usual, and dynamo
recompiles when what they change is part of its guards. `CompiledModules.restore`
puts the modules' call back as it was.

Adapters whose model call is one module: ``masked-diffusion-lm`` (``pipe.model``)
and ``stable-diffusion`` (``pipe.unet``). Others are refused by name.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import ConfigError

__all__ = ["BACKENDS", "COMPILED_MODULES", "CompiledModules", "check_compile", "compile_pipeline"]

COMPILED_MODULES: dict[str, str] = {"masked-diffusion-lm": "model", "stable-diffusion": "unet"}
"""Adapter name -> the attribute of its pipeline holding the module compiled."""

BACKENDS = ("inductor", "eager", "aot_eager")
"""``pipeline.compile`` values besides true/false (true is inductor)."""


def check_compile(adapter_name: str, setting: Any, path: str = "pipeline.compile") -> None:
    """Refuse ``pipeline.compile`` for an adapter without a single model module."""
    if setting and adapter_name not in COMPILED_MODULES:
        raise ConfigError(
            path,
            f"the {adapter_name!r} pipeline has no single model call to compile; compile works "
            f"with {', '.join(sorted(COMPILED_MODULES))}. Remove pipeline.compile.",
        )


class CompiledModules:
    """The modules `compile_pipeline` compiled, and what their call was before."""

    def __init__(self) -> None:
        self._saved: list[tuple[torch.nn.Module, Any]] = []

    def add(self, module: torch.nn.Module, backend: str) -> None:
        self._saved.append((module, getattr(module, "_compiled_call_impl", None)))
        module.compile(backend=backend)

    def restore(self) -> None:
        """Put each module's call back as it was before compiling (idempotent)."""
        while self._saved:
            module, previous = self._saved.pop()
            module._compiled_call_impl = previous  # what nn.Module.compile sets


def compile_pipeline(target: Any, adapter_name: str, setting: bool | str) -> CompiledModules:
    """Compile ``target``'s model module in place; ``setting`` is true (inductor) or a backend."""
    check_compile(adapter_name, setting)
    compiled = CompiledModules()
    if not setting:
        return compiled
    attr = COMPILED_MODULES[adapter_name]
    module = getattr(target, attr, None)
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(
            "pipeline.compile",
            f"the {adapter_name!r} pipeline has no {attr} module to compile "
            f"(got {type(module).__name__}).",
        )
    compiled.add(module, "inductor" if setting is True else setting)
    return compiled
