"""Attach to a diffusers pipeline and restore it exactly: module hooks plus a one-off subclass.

Every diffusers adapter attaches the same way. Its modules (a UNet, a
ControlNet, an LLM) get a named diffusers ``ModelHook`` through their
``HookRegistry``, and the pipeline object gets a one-off subclass whose methods
(``__call__``, ``prepare_latents`` ...) wrap the originals. `PipelineHooks`
does both and undoes both: diffusers' ``remove_hook`` leaves an empty registry
and a bound ``forward`` on the module, so a module that had neither before gets
neither back. `ModuleHooks` is the module half alone, for strategies that hook
a model's submodules (DeepCache's blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from decodekit import compat
from decodekit.errors import AttachError
from diffusers.hooks import HookRegistry, ModelHook

_ABSENT = object()


class ModuleHooks:
    """Named diffusers ``ModelHook``s on modules, removed so that each module ends exactly as before.

    Attributes:
        name: the name every hook is registered under in its module's ``HookRegistry``.
    """

    def __init__(self, name: str):
        self.name = name
        # (module, registry existed before, the module's own ``forward`` instance attribute)
        self._hooked: list[tuple[torch.nn.Module, bool, Any]] = []

    def attach(self, hooks: Sequence[tuple[torch.nn.Module, ModelHook]], owner: str) -> None:
        """Register each ``(module, hook)`` under ``name``.

        Refuses (`AttachError`, nothing changed) a module that already carries a hook
        under ``name``: another run is attached to it. ``owner`` names the attached
        thing in that message.
        """
        for module, _ in hooks:
            registry = compat.hook_registry(module)
            if registry is not None and registry.get_hook(self.name) is not None:
                raise AttachError(
                    f"the {type(module).__name__} already carries a {self.name!r} hook; "
                    f"detach the other run from {owner} first."
                )
        for module, hook in hooks:
            existed = compat.hook_registry(module) is not None
            self._hooked.append((module, existed, module.__dict__.get("forward", _ABSENT)))
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, self.name)

    def restore(self) -> None:
        """Remove the hooks; a module that had no registry or own ``forward`` gets neither back."""
        for module, existed, forward in self._hooked:
            registry = compat.hook_registry(module)
            if registry is None:
                continue
            registry.remove_hook(self.name, recurse=False)
            if not registry.hooks and not existed:
                compat.remove_hook_registry(module)
                if forward is _ABSENT:
                    module.__dict__.pop("forward", None)
                else:
                    module.__dict__["forward"] = forward
        self._hooked = []


class PipelineHooks:
    """Named ``ModelHook``s on a pipeline's modules and a one-off subclass of the pipeline.

    Attributes:
        pipe: the pipeline object.
        name: the name every hook is registered under in its module's ``HookRegistry``.
        original_class: the pipeline's class before `attach` (call its methods for the
            originals); None while not attached.
    """

    def __init__(self, pipe: Any, name: str):
        self.pipe = pipe
        self.name = name
        self.original_class: type | None = None
        self._modules = ModuleHooks(name)

    @property
    def attached(self) -> bool:
        return self.original_class is not None

    def attach(
        self,
        hooks: Sequence[tuple[torch.nn.Module, ModelHook]],
        methods: dict[str, Callable[..., Any]],
    ) -> None:
        """Register each ``(module, hook)`` and subclass the pipeline with ``methods``.

        Refuses (`AttachError`, nothing changed) a module that already carries a hook
        under ``name``: another run is attached to it.
        """
        if self.attached:
            raise AttachError(f"{type(self.pipe).__name__} is already attached; restore it first.")
        self._modules.attach(hooks, owner=f"the {type(self.pipe).__name__}")
        cls = type(self.pipe)
        self.original_class = cls
        self.pipe.__class__ = type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__})

    def restore(self) -> None:
        """Put the class back and remove the hooks; the modules end exactly as before `attach`."""
        if self.original_class is not None:
            self.pipe.__class__ = self.original_class
            self.original_class = None
        self._modules.restore()
