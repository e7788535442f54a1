"""The plugin manager: loads built-in and third-party plugins and holds the registries.

Every plugin module, ours included, is found through the ``decodekit``
entry-point group and contributes through the registration hooks. Environment:

* ``DECODEKIT_LOAD_PLUGINS=a,b`` — load only these third-party plugins (empty:
  built-ins only). Unset: load every installed plugin.
* ``DECODEKIT_DISABLE_PLUGINS=x,y`` — never load these (built-ins included).

A plugin that fails to import or register is reported by name (``decodekit
plugins`` lists it under *failed*) and skipped; the host carries on.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import DecodekitError, UnknownNameError
from .strategy import Strategy, check_hooks

GROUP = "decodekit"
BUILTIN_DIST = "decodekit"


@dataclass
class PluginInfo:
    """Where a registered thing came from."""

    plugin: str  # entry-point (or module) name
    package: str  # distribution name
    version: str


@dataclass
class Registry:
    """What the loaded plugins registered: strategies, pipeline adapters, quality metrics."""

    strategies: dict[str, type[Strategy]] = field(default_factory=dict)
    pipelines: dict[str, type] = field(default_factory=dict)
    metrics: dict[str, Callable] = field(default_factory=dict)
    origin: dict[tuple[str, str], PluginInfo] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class PluginManager:
    """Owns the pluggy manager of plugin modules and the registries built from them."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs.RegistrationSpecs)
        self.registry = Registry()
        self._info: dict[str, PluginInfo] = {}
        if load_entry_points:
            self._load_entry_points()
        self._collect()

    # -- loading ----------------------------------------------------------------
    def _load_entry_points(self) -> None:
        allow_env = os.environ.get("DECODEKIT_LOAD_PLUGINS")
        allow = (
            None if allow_env is None else {n.strip() for n in allow_env.split(",") if n.strip()}
        )
        deny = {
            n.strip()
            for n in os.environ.get("DECODEKIT_DISABLE_PLUGINS", "").split(",")
            if n.strip()
        }
        for ep in sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            builtin = dist == BUILTIN_DIST
            if ep.name in deny or (not builtin and allow is not None and ep.name not in allow):
                continue
            if self.pm.has_plugin(ep.name):
                continue
            version = ep.dist.version if ep.dist is not None else "?"
            try:
                module = ep.load()
                self._register_module(module, ep.name, PluginInfo(ep.name, dist, version))
            except Exception as e:  # a broken plugin must not take the host down
                self.registry.failed[ep.name] = f"{type(e).__name__}: {e}"
                self._debug(e)

    def _debug(self, e: Exception) -> None:
        if os.environ.get("DECODEKIT_DEBUG"):
            traceback.print_exception(e)

    def _register_module(self, module: ModuleType | Any, name: str, info: PluginInfo) -> None:
        self.pm.register(module, name=name)
        self._info[name] = info

    def register(self, plugin: ModuleType | Any, name: str | None = None) -> str:
        """Register a plugin object (module or instance) directly; returns its name. Used by tests and notebooks."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        self._register_module(plugin, name, PluginInfo(name, "(registered at run time)", ""))
        self._collect()
        return name

    def unregister(self, name: str) -> None:
        """Remove a plugin registered with `register` and everything it contributed."""
        self.pm.unregister(name=name)
        self._info.pop(name, None)
        self._collect()

    # -- registries ---------------------------------------------------------------
    def _collect(self) -> None:
        reg = Registry(failed=self.registry.failed)
        for name, plugin in self.pm.list_name_plugin():
            info = self._info.get(name, PluginInfo(name, "?", "?"))

            def add(kind: str, key: str, value: Any, _info: PluginInfo = info) -> None:
                table = getattr(reg, kind)
                if key in table and table[key] is not value:
                    first = reg.origin[(kind, key)]
                    reg.failed[_info.plugin] = (
                        f"{kind[:-1]} {key!r} is already registered by plugin {first.plugin!r}; "
                        "rename one of them or disable a plugin with DECODEKIT_DISABLE_PLUGINS."
                    )
                    return
                table[key] = value
                reg.origin[(kind, key)] = _info

            def reg_strategy(cls: type[Strategy], name: str = name) -> None:
                if not (isinstance(cls, type) and issubclass(cls, Strategy) and cls.name):
                    raise DecodekitError(
                        f"plugin {name!r} registered {cls!r}, which is not a named Strategy subclass"
                    )
                check_hooks(cls, name)
                add("strategies", cls.name, cls)

            def reg_pipeline(cls: type) -> None:
                add("pipelines", cls.name, cls)

            def reg_metric(key: str, fn: Callable) -> None:
                add("metrics", key, fn)

            for hook, cb in (
                ("decodekit_register_strategies", reg_strategy),
                ("decodekit_register_pipelines", reg_pipeline),
                ("decodekit_register_quality_metrics", reg_metric),
            ):
                impl = getattr(plugin, hook, None)
                if impl is None:
                    continue
                try:
                    impl(register=cb)
                except Exception as e:
                    reg.failed[name] = f"{type(e).__name__}: {e}"
                    self._debug(e)
        self.registry = reg

    def strategy(self, name: str, path: str = "name") -> type[Strategy]:
        """The strategy class registered as ``name``; `UnknownNameError` with suggestions otherwise."""
        try:
            return self.registry.strategies[name]
        except KeyError:
            raise UnknownNameError(path, "strategy", name, list(self.registry.strategies)) from None

    def pipeline(self, name: str, path: str = "pipeline.type") -> type:
        """The pipeline adapter class registered as ``name``."""
        try:
            return self.registry.pipelines[name]
        except KeyError:
            raise UnknownNameError(path, "pipeline", name, list(self.registry.pipelines)) from None

    def origin(self, kind: str, name: str) -> PluginInfo:
        return self.registry.origin[(kind, name)]


_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_manager() -> None:
    """Forget the loaded plugins; the next `get_manager` loads them again (reads the env anew)."""
    global _manager
    _manager = None
