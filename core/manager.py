"""The plugin manager: loads built-in and third-party plugins and holds the registries.

Every plugin module, ours included, is found through the ``decodekit``
entry-point group and contributes through the registration hooks. Environment:

* ``DECODEKIT_LOAD_PLUGINS=a,b`` — load only these third-party plugins (empty:
  built-ins only). Unset: load every installed plugin.
* ``DECODEKIT_DISABLE_PLUGINS=x,y`` — never load these (built-ins included).

A plugin that fails to import or register is reported by name (``decodekit
plugins`` lists it under *failed*, ``validate`` and ``run`` warn) and skipped;
the host carries on, also when the plugin raises ``SystemExit``.

Built-ins (the ``decodekit`` distribution) register first and their names are
reserved: a third-party strategy, pipeline or metric under a built-in's name,
or an entry point named like a built-in one, is refused and reported with both
packages; the built-in stays. A plugin module's ``decodekit_*`` function that
is not a registration hook, or takes arguments its hook does not pass, is
refused at registration (`check_registration_hooks`).
"""

from __future__ import annotations

import inspect
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


_UNKNOWN = PluginInfo("?", "?", "?")
_KIND_NOUN = {"strategies": "strategy", "pipelines": "pipeline", "metrics": "metric"}


def _dist_name(ep: metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else "?"


def check_registration_hooks(plugin: ModuleType | Any, name: str) -> None:
    """Refuse a plugin whose ``decodekit_*`` functions are not registration hooks as specified.

    A plugin module implements only the registration hooks; a function with
    another ``decodekit_*`` name, or taking an argument its hook does not pass,
    would never be called as its author meant. Runtime hooks belong on
    `Strategy` classes (checked by `decodekit.strategy.check_hooks`). Raises a
    `DecodekitError` naming the plugin and the hook.
    """
    specs = {
        n: getattr(hookspecs.RegistrationSpecs, n)
        for n in dir(hookspecs.RegistrationSpecs)
        if n.startswith("decodekit_")
    }
    for attr in dir(plugin):
        if not attr.startswith("decodekit_"):
            continue
        fn = getattr(plugin, attr, None)
        if not inspect.isroutine(fn):
            continue
        where = f"plugin {name!r}, hook {attr}"
        if attr not in specs:
            runtime = attr in dir(hookspecs.RuntimeSpecs)
            raise DecodekitError(
                f"{where}: a plugin module implements only the registration hooks "
                f"({', '.join(sorted(specs))})"
                + (
                    f"; {attr} is a runtime hook: implement it as a method of a Strategy "
                    "subclass and register that class."
                    if runtime
                    else "; there is no hook of that name: rename or remove the function."
                )
            )
        bad = hookspecs.unsupported_options(fn)
        if bad:
            raise DecodekitError(
                f"{where}: marked with {', '.join(bad)}=..., which decodekit does not honour "
                "(each plugin's registration hook is called once, in load order); remove it."
            )
        mismatch = hookspecs.argument_mismatch(fn, specs[attr])
        if mismatch:
            raise DecodekitError(f"{where}: {mismatch}")


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
        eps = list(metadata.entry_points(group=GROUP))
        # Built-ins register first, so their names are taken before any third party's.
        eps.sort(key=lambda e: (_dist_name(e) != BUILTIN_DIST, e.name))
        reserved = {ep.name: ep for ep in eps if _dist_name(ep) == BUILTIN_DIST}
        for ep in eps:
            dist = _dist_name(ep)
            builtin = dist == BUILTIN_DIST
            if ep.name in deny or (not builtin and allow is not None and ep.name not in allow):
                continue
            version = ep.dist.version if ep.dist is not None else "?"
            if not builtin and (ep.name in reserved or self.pm.has_plugin(ep.name)):
                first = reserved.get(ep.name)
                owner = (
                    f"the built-in plugin of package {BUILTIN_DIST!r}"
                    if first is not None
                    else f"package {self._info[ep.name].package!r}"
                )
                self.registry.failed[f"{ep.name} (package {dist!r})"] = (
                    f"entry point {ep.name!r} of package {dist!r} {version} is refused: the name "
                    f"is taken by {owner}"
                    + (", and built-in names are reserved" if first is not None else "")
                    + "; rename the entry point in that package's pyproject.toml."
                )
                continue
            if self.pm.has_plugin(ep.name):  # the same built-in seen twice (editable installs)
                continue
            try:
                module = ep.load()
                self._register_module(module, ep.name, PluginInfo(ep.name, dist, version))
            except KeyboardInterrupt:
                raise
            except (
                BaseException
            ) as e:  # a broken plugin (SystemExit included) must not end the host
                self.registry.failed[ep.name] = f"{type(e).__name__}: {e}"
                self._debug(e)

    def _debug(self, e: BaseException) -> None:
        if os.environ.get("DECODEKIT_DEBUG"):
            traceback.print_exception(e)

    def _register_module(self, module: ModuleType | Any, name: str, info: PluginInfo) -> None:
        check_registration_hooks(module, name)
        self.pm.register(module, name=name)
        self._info[name] = info

    def register(self, plugin: ModuleType | Any, name: str | None = None) -> str:
        """Register a plugin object (module or instance) directly; returns its name. Used by tests and notebooks.

        A plugin whose hooks are refused (`check_registration_hooks`) raises `DecodekitError`;
        a name clash is reported under ``registry.failed`` like an installed plugin's.
        """
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        try:
            self._register_module(plugin, name, PluginInfo(name, "(registered at run time)", ""))
        except DecodekitError as e:
            self.registry.failed[name] = str(e)
            raise
        self._collect()
        return name

    def failed_report(self) -> list[str]:
        """One ``"'plugin' failed to load: reason"`` line per plugin failed or refused, sorted by name."""
        return [
            f"{name!r} failed to load: {reason}"
            for name, reason in sorted(self.registry.failed.items())
        ]

    def unregister(self, name: str) -> None:
        """Remove a plugin registered with `register` and everything it contributed."""
        self.pm.unregister(name=name)
        self._info.pop(name, None)
        self._collect()

    # -- registries ---------------------------------------------------------------
    def _collect(self) -> None:
        reg = Registry(failed=self.registry.failed)
        plugins = self.pm.list_name_plugin()
        # Built-ins contribute first: their names are reserved whatever the load order.
        plugins.sort(key=lambda np: self._info.get(np[0], _UNKNOWN).package != BUILTIN_DIST)
        for name, plugin in plugins:
            info = self._info.get(name, PluginInfo(name, "?", "?"))

            def add(kind: str, key: str, value: Any, _info: PluginInfo = info) -> None:
                table = getattr(reg, kind)
                if key in table and table[key] is not value:
                    first = reg.origin[(kind, key)]
                    what = _KIND_NOUN[kind]
                    if first.package == BUILTIN_DIST:
                        why = (
                            f"{what} {key!r} is a built-in name (plugin {first.plugin!r} of "
                            f"package {first.package!r} {first.version}), and built-in names are "
                            f"reserved; the one from package {_info.package!r} is refused, the "
                            "built-in stays. Rename it."
                        )
                    else:
                        why = (
                            f"{what} {key!r} is already registered by plugin {first.plugin!r} "
                            f"(package {first.package!r}); rename one of them or disable a plugin "
                            "with DECODEKIT_DISABLE_PLUGINS."
                        )
                    old = reg.failed.get(_info.plugin)
                    reg.failed[_info.plugin] = f"{old}; {why}" if old else why
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
                except KeyboardInterrupt:
                    raise
                except BaseException as e:  # SystemExit included: the host carries on
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
