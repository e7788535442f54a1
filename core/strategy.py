"""The strategy contract: what a decoding strategy declares, and how a set of them is resolved.

A strategy is a class. Its declarations are class attributes the resolver reads
before anything is attached; its behaviour is runtime hooks (methods named
``decodekit_*`` and marked with `decodekit.hookimpl`) called by the
pipeline loop it is attached to.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import CompositionError, ConfigError

LOOPS = (
    "continuous-denoising",
    "masked-diffusion",
    "token-autoregression",
    "scale-autoregression",
    "masked-autoregression",
)
"""The loop shapes a pipeline can drive (docs/concepts.md, "The loop shapes")."""


class Params(BaseModel):
    """Base of every strategy's params model: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Strategy:
    """Base class of every decoding strategy.

    Subclasses set the class attributes below and implement runtime hooks from
    `decodekit.hookspecs` as methods decorated with ``@hookimpl``.

    Attributes:
        name: the registry name, as written in YAML (``faster-diffusion``).
        loops: the loop shapes this strategy supports (subset of `LOOPS`).
        Params: the pydantic params model; fields carry types, defaults and docs.
        slot: at most one strategy per slot (``denoiser-cache``, ``kv-cache``,
            ``proposer``, ``selector``, ``context``); None for no slot.
        requires: strategy names or slot names that must also be attached.
        conflicts: strategy names or slot names that must not be attached.
        before: strategies this one's hooks run before, when both are attached.
        after: strategies this one's hooks run after, when both are attached.
        paper: title and arXiv link, shown by ``decodekit plugins``.
        counters: keys of `stats` that count a call's events and add up over calls;
            the run sums them into ``run.stats["totals"]`` (see `total_stats`).
        step_tensors: names of the pipeline's step tensors (besides ``latents``)
            a continuous-denoising strategy reads or edits in ``decodekit_step_end``;
            the adapter asks the pipeline to pass them to the step callback, and
            refuses to attach when the pipeline cannot.
    """

    name: ClassVar[str] = ""
    loops: ClassVar[tuple[str, ...]] = ()
    Params: ClassVar[type[Params]] = Params
    slot: ClassVar[str | None] = None
    requires: ClassVar[tuple[str, ...]] = ()
    conflicts: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""
    counters: ClassVar[tuple[str, ...]] = ()
    step_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        params: Params | dict[str, Any] | None = None,
        *,
        path: str = "params",
        **kwargs: Any,
    ):
        """Take the params as a `Params` object, a mapping, or keyword arguments.

        ``FasterDiffusion(key_steps="paper")`` equals
        ``FasterDiffusion({"key_steps": "paper"})``; keywords are merged into a
        mapping, and given beside a `Params` object they are a `ConfigError`.
        """
        if isinstance(params, self.Params):
            if kwargs:
                raise ConfigError(
                    path,
                    f"give the params either as a {type(params).__name__} object or as keyword "
                    f"arguments, not both (got {', '.join(sorted(kwargs))} beside the object)",
                )
            self.params = params
        else:
            if kwargs and params is not None and not isinstance(params, dict):
                raise ConfigError(
                    path,
                    f"expected a mapping of parameters, got {type(params).__name__}",
                )
            data = {**(params or {}), **kwargs} if kwargs else (params or {})
            self.params = parse_params(self.Params, data, path)
        self.run = None

    # Lifecycle. The run calls these; strategies override what they need.
    def on_attach(self, run) -> None:
        """Called once, after the adapter attached; set up per-run state here."""

    def on_detach(self, run) -> None:
        """Called once, before the adapter restores the user's objects; drop state here."""

    def reset(self, run) -> None:
        """Called at the start of every pipeline call: per-call state starts fresh."""

    def stats(self) -> dict[str, Any]:
        """Figures this strategy counted in the current run (cache hits, accepted tokens …)."""
        return {}

    def total_stats(self, totals: dict[str, Any]) -> dict[str, Any]:
        """Figures derived from the run's summed `counters` (a rate, say); none by default."""
        return {}

    def ideal_speedup(self, run) -> float | None:
        """The FLOP-ideal speed-up of the last call over the baseline, when the strategy can state it."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


def parse_params(model: type[BaseModel], data: Any, path: str) -> BaseModel:
    """Validate ``data`` against ``model``; errors become a `ConfigError` naming the key path."""
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping of parameters, got {type(data).__name__}")
    try:
        return model(**data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = f"{path}.{loc}" if loc else path
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields) or "none"
            msg = f"unknown parameter; this strategy takes: {known}"
        raise ConfigError(where, msg) from None


def strategy_hooks(cls: type[Strategy]) -> list[str]:
    """Names of the runtime hooks a strategy class implements."""
    from .hookspecs import PROJECT

    return sorted(
        n
        for n in dir(cls)
        if n.startswith("decodekit_") and hasattr(getattr(cls, n), PROJECT + "_impl")
    )


def check_hooks(cls: type[Strategy], plugin: str) -> None:
    """Refuse a strategy class whose runtime hooks decodekit would misread.

    decodekit calls runtime hooks itself, strategy by strategy in the resolved
    order, so pluggy's ``wrapper``/``hookwrapper``/``tryfirst``/``trylast``/
    ``specname`` options would be silently ignored; a ``decodekit_*`` method that
    is not a runtime hook, or that takes an argument its hook does not pass,
    would never run. Each is a `CompositionError` naming the plugin and the hook.
    """
    from .hookspecs import RuntimeSpecs, argument_mismatch, unsupported_options

    specs = {n: getattr(RuntimeSpecs, n) for n in dir(RuntimeSpecs) if n.startswith("decodekit_")}
    for hook in strategy_hooks(cls):
        where = f"plugin {plugin!r}, strategy {cls.name or cls.__name__!r}, hook {hook}"
        bad = unsupported_options(getattr(cls, hook))
        if bad:
            raise CompositionError(
                f"{where}: marked with {', '.join(bad)}=..., which decodekit does not honour "
                "(strategies' hooks run one after another in the order their before/after "
                "declarations resolve to). Remove the option; order strategies with "
                "`before`/`after`, and set up or tear down around a call in "
                "decodekit_call_start/decodekit_call_end."
            )
        if hook not in specs:
            raise CompositionError(
                f"{where}: there is no runtime hook of that name; the runtime hooks are "
                f"{', '.join(sorted(specs))}."
            )
        mismatch = argument_mismatch(getattr(cls, hook), specs[hook])
        if mismatch:
            raise CompositionError(f"{where}: {mismatch}")


def _labels(s: Strategy) -> set[str]:
    return {s.name} | ({s.slot} if s.slot else set())


def resolve(strategies: list[Strategy], loop: str) -> list[Strategy]:
    """Check that ``strategies`` compose on ``loop`` and return them in hook-call order.

    Raises `CompositionError` for two strategies in one slot, a declared
    conflict, a missing requirement, an unsupported loop, a duplicate, or an
    ordering cycle. Without ``before``/``after`` constraints the user's order is kept.
    """
    seen: dict[str, Strategy] = {}
    for s in strategies:
        if s.name in seen:
            raise CompositionError(
                f"strategy {s.name!r} is listed twice; keep one entry and merge its params."
            )
        seen[s.name] = s
        if loop not in s.loops:
            raise CompositionError(
                f"strategy {s.name!r} does not support the {loop!r} loop of this pipeline "
                f"(it supports: {', '.join(s.loops) or 'none'}); remove it or use a pipeline it supports."
            )
    for i, a in enumerate(strategies):
        for b in strategies[i + 1 :]:
            if a.slot and a.slot == b.slot:
                raise CompositionError(
                    f"strategies {a.name!r} and {b.name!r} both fill the {a.slot!r} slot; "
                    f"only one {a.slot} strategy can run at a time: keep one of them."
                )
        for b in strategies:
            if b is not a and _labels(b) & set(a.conflicts):
                raise CompositionError(
                    f"strategy {a.name!r} conflicts with {b.name!r}; remove one of them."
                )
    present = set().union(*(_labels(s) for s in strategies)) if strategies else set()
    for s in strategies:
        for req in s.requires:
            if req not in present:
                raise CompositionError(
                    f"strategy {s.name!r} requires {req!r}, which is not attached; add {req!r} to the strategies."
                )
    return _order(strategies)


def _order(strategies: list[Strategy]) -> list[Strategy]:
    """Stable topological order from before/after, ties kept in the user's order."""
    names = [s.name for s in strategies]
    edges: dict[str, set[str]] = {n: set() for n in names}  # a -> b: a runs before b
    for s in strategies:
        for other in s.before:
            if other in edges:
                edges[s.name].add(other)
        for other in s.after:
            if other in edges:
                edges[other].add(s.name)
    indeg = {n: 0 for n in names}
    for a in names:
        for b in edges[a]:
            indeg[b] += 1
    out: list[str] = []
    ready = [n for n in names if indeg[n] == 0]
    while ready:
        n = ready.pop(0)
        out.append(n)
        for b in sorted(edges[n], key=names.index):
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
        ready.sort(key=names.index)
    if len(out) != len(names):
        stuck = [n for n in names if n not in out]
        raise CompositionError(
            f"strategies {', '.join(map(repr, stuck))} declare before/after constraints that form a cycle; "
            "they cannot be ordered. Report this to their authors."
        )
    by_name = {s.name: s for s in strategies}
    return [by_name[n] for n in out]
