"""attach() and the Run handle: per-run state, stats, and exact restore on detach."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import pluggy

from . import hookspecs
from .errors import AttachError, ConfigError, DetachError
from .loops import AdapterView
from .manager import PluginManager, get_manager
from .strategy import Strategy, check_hooks, resolve

# Objects currently attached, mapped to their run. Kept outside the objects so
# attaching does not write marker attributes into the user's pipeline.
_ATTACHED: weakref.WeakKeyDictionary[Any, Run] = weakref.WeakKeyDictionary()


def attached_run(obj: Any) -> Run | None:
    """The live run attached to ``obj``, or None."""
    return _ATTACHED.get(obj)


StrategySpec = str | dict | Strategy


def build_strategies(
    specs: Iterable[StrategySpec], manager: PluginManager, path: str = "strategies"
) -> list[Strategy]:
    """Turn names, ``{"name", "params"}`` dicts or instances into strategy instances."""
    if isinstance(specs, (str, dict, Strategy)):
        specs = [specs]
    out = []
    for i, spec in enumerate(specs):
        where = f"{path}.{i}"
        if isinstance(spec, Strategy):
            out.append(spec)
            continue
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict):
            raise ConfigError(
                where,
                f"expected a strategy name or a mapping with 'name' and 'params', got {type(spec).__name__}",
            )
        unknown = set(spec) - {"name", "params"}
        if unknown:
            raise ConfigError(
                f"{where}.{sorted(unknown)[0]}",
                "unknown key; a strategy entry has 'name' and 'params'",
            )
        if "name" not in spec:
            raise ConfigError(f"{where}.name", "missing; say which strategy to use")
        cls = manager.strategy(spec["name"], f"{where}.name")
        out.append(cls(spec.get("params") or {}, path=f"{where}.params"))
    return out


def find_adapter(obj: Any, manager: PluginManager, pipeline: str | None = None) -> type:
    """The adapter class for ``obj``: the one named, or the first registered that matches."""
    if pipeline is not None:
        cls = manager.pipeline(pipeline, "pipeline")
        if not cls.matches(obj):
            raise AttachError(
                f"pipeline adapter {pipeline!r} cannot attach to a {type(obj).__name__}."
            )
        return cls
    for cls in manager.registry.pipelines.values():
        if cls.matches(obj):
            return cls
    known = ", ".join(
        f"{n} ({c.description or c.loop})" for n, c in manager.registry.pipelines.items()
    )
    raise AttachError(
        f"decodekit has no pipeline adapter for a {type(obj).__module__}.{type(obj).__name__}. "
        f"Installed adapters: {known or 'none'}."
    )


class Run:
    """One attachment of strategies to a pipeline or model.

    Use as a context manager or call `detach`. Strategies get the run in every
    hook (``run=``) and in ``on_attach``; what they may read is below.

    Attributes:
        target: the pipeline or model the strategies are attached to.
        strategies: the attached `Strategy` instances, in resolved hook order.
        loop: the adapter's loop kind (``"denoise"``, ``"causal"``, ``"masked"``,
            ...); the contract of `adapter` is the matching class of `decodekit.loops`.
        adapter: the adapter as its loop's contract lets strategies see it
            (attributes listed on each pipeline's docs page and on `decodekit.loops`).
        attached: whether the hooks are in place (False after `detach`).
        in_call: whether a pipeline call is running now.
        calls: pipeline calls made since `attach` (whole run).
        nfe: model calls actually computed since `attach` (whole run).
        served: model calls a strategy answered instead of the model (whole run).
        time_s: wall time inside pipeline calls since `attach` (whole run).
        last: the last call's figures (``nfe``, ``served``, ``time_s``), the
            same dict as ``stats["last_call"]`` without ``strategies``.
        stats: every figure of the run, in one scope: the top level is the whole
            run (``calls``, ``nfe``, ``served``, ``time_s``, and ``hook_time_s``
            per strategy name); ``stats["last_call"]`` is the last call
            (``nfe``, ``served``, ``time_s``, and ``strategies``: per strategy
            its ``hook_time_s`` in that call plus its own ``stats()``, which
            strategies reset at every call start). ``stats["strategies"]`` is
            the same dict as ``stats["last_call"]["strategies"]``, kept as a
            short name. ``stats["totals"]`` is the whole run per strategy: the
            figures it names in `Strategy.counters`, summed over the calls, and
            what `Strategy.total_stats` derives from them (rates).
            ``stats["pipeline"]`` is the adapter's own figures since
            attach (`PipelineAdapter.stats`; empty for most adapters).
    """

    def __init__(self, target: Any, adapter_cls: type, strategies: list[Strategy]):
        self.target = target
        for s in strategies:
            check_hooks(type(s), type(s).__module__)
        self.strategies = resolve(strategies, adapter_cls.loop)
        self.loop = adapter_cls.loop
        self.attached = False
        self.in_call = False
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs.RuntimeSpecs)
        # pluggy calls the last registered implementation first; register in
        # reverse so hooks run in the resolved order.
        for s in reversed(self.strategies):
            self._pm.register(s, name=s.name)
        self._impls: dict[str, list] = {}
        self._firstresult: dict[str, bool] = {}
        for hook_name in dir(hookspecs.RuntimeSpecs):
            if hook_name.startswith("decodekit_"):
                caller = getattr(self._pm.hook, hook_name)
                self._impls[hook_name] = [
                    (i.plugin_name, i.function, i.argnames)
                    for i in reversed(caller.get_hookimpls())
                ]
                self._firstresult[hook_name] = bool(caller.spec.opts.get("firstresult"))
        self._hook_time = {s.name: 0.0 for s in self.strategies}
        self._call_hook0: dict[str, float] = {}  # hook times when the last call began
        self.calls = 0
        self.nfe = 0
        self.served = 0
        self.time_s = 0.0
        self.last: dict[str, Any] = {}
        self._totals: dict[str, dict[str, Any]] = {s.name: {} for s in self.strategies}
        self._adapter = adapter_cls(target, self)
        self.adapter = AdapterView(self._adapter)
        """The adapter, as its loop's contract (`decodekit.loops`) lets strategies see it."""

    # -- hooks --------------------------------------------------------------------
    def has(self, hook: str) -> bool:
        """Whether any attached strategy implements ``hook`` (lets adapters skip work)."""
        return bool(self._impls[hook])

    def call(self, hook: str, **kwargs: Any) -> Any:
        """Call runtime hook ``hook`` on the attached strategies, in resolved order.

        Returns the first non-None result for first-result hooks, else the list
        of non-None results. Time spent is charged to each strategy.
        """
        impls = self._impls[hook]
        if not impls:
            return None if self._firstresult[hook] else []
        first = self._firstresult[hook]
        results = []
        clock = time.perf_counter
        for name, fn, argnames in impls:
            t0 = clock()
            res = fn(*[kwargs[a] for a in argnames])
            self._hook_time[name] += clock() - t0
            if res is not None:
                if first:
                    return res
                results.append(res)
        return None if first else results

    # -- per call -------------------------------------------------------------------
    def begin_call(self, call_kwargs: dict[str, Any]) -> None:
        """Adapters call this when a pipeline call starts: per-call state starts fresh."""
        self.in_call = True
        self.calls += 1
        self._call_nfe0, self._call_served0 = self.nfe, self.served
        self._call_hook0 = dict(self._hook_time)
        self._t0 = time.perf_counter()
        for s in self.strategies:
            s.reset(self)
        self.call("decodekit_call_start", run=self, call_kwargs=call_kwargs)

    def end_call(self, output: Any) -> None:
        """Adapters call this when a pipeline call returned."""
        self.call("decodekit_call_end", run=self, output=output)
        dt = time.perf_counter() - self._t0
        self.time_s += dt
        self.last = {
            "nfe": self.nfe - self._call_nfe0,
            "served": self.served - self._call_served0,
            "time_s": dt,
        }
        for strategy in self.strategies:  # the counters of the call, added to the run's
            if strategy.counters:
                figures, totals = strategy.stats(), self._totals[strategy.name]
                for key in strategy.counters:
                    if key in figures:
                        totals[key] = totals.get(key, 0) + figures[key]
        self.in_call = False

    def guarded_call(self, call_kwargs: dict[str, Any], fn: Callable[[], Any]) -> Any:
        """One pipeline call, all of it inside the guard: `begin_call`, ``fn()``, `end_call`.

        ``fn`` takes no arguments and runs after ``decodekit_call_start`` has seen
        (and possibly edited) ``call_kwargs``, so it should read them when called.
        An exception anywhere (a hook, the pipeline, Ctrl-C) detaches every
        strategy, leaving the pipeline plain, and is re-raised.
        """
        try:
            self.begin_call(call_kwargs)
            out = fn()
            self.end_call(out)
        except BaseException as e:
            self._abort(e)
            raise
        return out

    def guarded(self, fn, *args, **kwargs):
        """Run ``fn``; on an exception detach everything, then re-raise it (prefer `guarded_call`)."""
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            self._abort(e)
            raise

    def _abort(self, error: BaseException) -> None:
        """Detach after ``error`` ended a call; failures of the detach are noted on ``error``."""
        self.in_call = False
        try:
            self.detach()
        except BaseException as d:
            error.add_note(f"decodekit: detaching after this error also failed: {d}")

    # -- lifecycle --------------------------------------------------------------------
    def _attach(self) -> None:
        """Attach all or nothing: on any failure, undo what was done and re-raise."""
        for s in self.strategies:
            owner = s.run
            if owner is not None and owner is not self and owner.attached:
                raise AttachError(
                    f"this {s.name!r} strategy instance is already attached to a "
                    f"{type(owner.target).__name__}; a strategy instance belongs to one run. "
                    f"Create a new instance ({type(s).__name__}(...)) or pass the name "
                    f"{s.name!r}, or detach the other run first."
                )
        touched = self._adapter.touched()
        for obj in touched:
            other = _ATTACHED.get(obj)
            if other is not None:
                raise AttachError(
                    f"this {type(obj).__name__} already has decodekit strategies attached "
                    f"({', '.join(s.name for s in other.strategies) or 'none'}); "
                    "detach that run first (leave its `with` block or call run.detach())."
                )
        done: list[Strategy] = []
        try:
            self._adapter.attach()
            for s in self.strategies:
                s.run = self
                s.on_attach(self)
                done.append(s)
        except BaseException as e:
            # A strategy whose on_attach raised cleans up after itself; the ones
            # before it are detached in reverse, then the adapter restores.
            failures = self._undo(done)
            for who, f in failures:
                e.add_note(f"decodekit: undoing the attach, {who} also failed: {f!r}")
            raise
        for obj in touched:
            _ATTACHED[obj] = self
        self.attached = True

    def _undo(self, strategies: list[Strategy]) -> list[tuple[str, BaseException]]:
        """Call ``on_detach`` of ``strategies`` in reverse, then the adapter's detach; every step runs.

        Returns the ``(who, exception)`` of each step that raised.
        """
        failures: list[tuple[str, BaseException]] = []
        for s in reversed(strategies):
            try:
                s.on_detach(self)
            except BaseException as f:
                failures.append((f"strategy {s.name!r} on_detach", f))
            finally:
                s.run = None
        for s in self.strategies:
            if s.run is self:
                s.run = None
        try:
            self._adapter.detach()
        except BaseException as f:
            failures.append((f"pipeline adapter {self._adapter.name!r} detach", f))
        return failures

    def detach(self) -> None:
        """Remove every hook; the pipeline is exactly as it was before `attach`. Idempotent.

        Every strategy's ``on_detach`` and the adapter's restore run even when one
        raises; then a `DetachError` lists every failure (a ``KeyboardInterrupt``
        among them is re-raised as is).
        """
        if not self.attached:
            return
        self.attached = False
        try:
            failures = self._undo(self.strategies)
        finally:
            for obj in self._adapter.touched():
                if _ATTACHED.get(obj) is self:
                    del _ATTACHED[obj]
        if not failures:
            return
        for _, f in failures:
            if not isinstance(f, Exception):  # KeyboardInterrupt, SystemExit
                raise f
        raise DetachError(failures) from failures[0][1]

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def stats(self) -> dict[str, Any]:
        """Counters of the whole run; ``["last_call"]`` holds the last call's (see the class docstring)."""
        hook0 = self._call_hook0
        per = {}
        for s in self.strategies:
            in_call = self._hook_time[s.name] - hook0.get(s.name, 0.0)
            per[s.name] = {"hook_time_s": in_call, **s.stats()}
        return {
            "calls": self.calls,
            "nfe": self.nfe,
            "served": self.served,
            "time_s": self.time_s,
            "hook_time_s": dict(self._hook_time),
            "last_call": {**self.last, "strategies": per},
            "strategies": per,
            "totals": {
                s.name: {**self._totals[s.name], **s.total_stats(dict(self._totals[s.name]))}
                for s in self.strategies
                if s.counters
            },
            "pipeline": self._adapter.stats(),
        }

    def ideal_speedup(self) -> float | None:
        """Product of the strategies' stated FLOP-ideal speed-ups for the last call, if any stated one."""
        vals = [v for v in (s.ideal_speedup(self) for s in self.strategies) if v is not None]
        if not vals:
            return None
        out = 1.0
        for v in vals:
            out *= v
        return out

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self.strategies)
        return f"Run({type(self.target).__name__}, [{names}], attached={self.attached})"


def attach(
    target: Any,
    strategies: Iterable[StrategySpec] | StrategySpec = (),
    *,
    pipeline: str | None = None,
    manager: PluginManager | None = None,
) -> Run:
    """Attach decoding strategies to a diffusers/transformers pipeline or model.

    Args:
        target: the pipeline or model to speed up.
        strategies: names, ``{"name": ..., "params": {...}}`` dicts, or
            `Strategy` instances, in the order their hooks should run.
        pipeline: an adapter name, when more than one could attach to ``target``.
        manager: the plugin manager to resolve names (default: the global one).

    Returns:
        A `Run`; use it as a context manager, or call ``run.detach()``.

    Raises:
        ConfigError: an unknown strategy or bad params (the message names the key).
        CompositionError: the strategies cannot run together.
        AttachError: nothing can attach to ``target``, or it is attached already.
    """
    manager = manager or get_manager()
    built = build_strategies(strategies, manager)
    adapter_cls = find_adapter(target, manager, pipeline)
    run = Run(target, adapter_cls, built)
    run._attach()
    return run


__all__ = ["attach", "Run", "attached_run", "build_strategies", "find_adapter"]
