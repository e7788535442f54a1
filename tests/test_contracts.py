"""The adapter–strategy contract and the one dispatch rule, checked over every built-in plugin.

- Strategies read ``run.adapter`` only through the names their loop's contract
  declares: statically over every built-in strategy's source, and at run time
  through the read-only `AdapterView`.
- Every built-in adapter is a subclass of its loop's contract and provides each
  declared name.
- Hook implementations that decodekit would misread (pluggy wrappers,
  tryfirst/trylast, unknown hooks, arguments a hook does not pass) are refused
  at registration and at attach, naming the plugin and the hook.
- Each runtime hookspec's "Called by:" line names exactly the built-in adapters
  whose code calls it.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import types
from pathlib import Path

import decodekit
import pytest
from decodekit import hookspecs
from decodekit.errors import CompositionError
from decodekit.hookspecs import hookimpl
from decodekit.loops import LOOP_CONTRACTS, AdapterView, ContractError, contract_of
from decodekit.strategy import Strategy
from decodekit.testing import tiny_llama, tiny_sd_pipeline

from tests.tiny import tiny_ar_image_pipeline

BUILTIN = "decodekit"


def builtin_strategies(manager) -> list[type[Strategy]]:
    reg = manager.registry
    out = [c for n, c in reg.strategies.items() if reg.origin[("strategies", n)].package == BUILTIN]
    assert len(out) >= 6, out  # the walk must see the built-ins, or it proves nothing
    return out


def builtin_adapters(manager) -> list[type]:
    reg = manager.registry
    return [c for n, c in reg.pipelines.items() if reg.origin[("pipelines", n)].package == BUILTIN]


# -- what a strategy reads from run.adapter, from its source ---------------------------------


def adapter_reads(source: str) -> set[str]:
    """Names read from ``<x>.adapter`` in ``source``: ``run.adapter.NAME``,
    ``getattr(run.adapter, "NAME")``, and through a local alias ``a = run.adapter``."""
    tree = ast.parse(source)

    def is_adapter(node: ast.AST, aliases: set[str]) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "adapter") or (
            isinstance(node, ast.Name) and node.id in aliases
        )

    reads: set[str] = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        aliases = {
            t.id
            for node in ast.walk(fn)
            if isinstance(node, ast.Assign) and is_adapter(node.value, set())
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(fn):
            if isinstance(node, ast.Attribute) and is_adapter(node.value, aliases):
                reads.add(node.attr)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and node.args
                and is_adapter(node.args[0], aliases)
            ):
                name = node.args[1] if len(node.args) > 1 else None
                if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                    reads.add("<dynamic name>")
                else:
                    reads.add(name.value)
    return reads


def test_reads_are_found_by_the_walk():
    src = (
        "def f(run):\n"
        "    a = run.adapter\n"
        "    x = run.adapter.pipe\n"
        "    y = a.unet\n"
        "    z = getattr(run.adapter, 'controlnet', None)\n"
        "    w = getattr(a, name)\n"
    )
    assert adapter_reads(src) == {"pipe", "unet", "controlnet", "<dynamic name>"}


def test_every_builtin_strategy_reads_only_its_loops_contract(manager):
    undeclared = {}
    for cls in builtin_strategies(manager) + [manager.strategy("cfg-cutoff")]:
        source = inspect.getsource(sys.modules[cls.__module__])
        allowed = set().union(*(contract_of(loop) for loop in cls.loops))
        extra = adapter_reads(source) - allowed
        if extra:
            undeclared[cls.name] = sorted(extra)
    assert not undeclared, (
        f"strategies read adapter attributes their loop's contract does not declare: {undeclared}; "
        "declare them in decodekit/loops.py or take them from the hook's arguments"
    )


# -- adapters provide their contract ------------------------------------------------------------


def test_every_builtin_adapter_subclasses_its_loops_contract(manager):
    adapters = builtin_adapters(manager)
    assert {a.loop for a in adapters} == set(LOOP_CONTRACTS)
    for cls in adapters:
        assert issubclass(cls, LOOP_CONTRACTS[cls.loop]), cls


def _targets():
    from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline

    return {
        "stable-diffusion": tiny_sd_pipeline,
        "causal-lm": tiny_llama,
        "masked-diffusion-lm": lambda: MaskedDiffusionLMPipeline(tiny_llama(), mask_token_id=3),
        "ar-image": tiny_ar_image_pipeline,
    }


@pytest.mark.parametrize(
    "adapter", ["stable-diffusion", "causal-lm", "masked-diffusion-lm", "ar-image"]
)
def test_adapter_instances_provide_every_declared_name(adapter):
    target = _targets()[adapter]()
    with decodekit.attach(target, [], pipeline=adapter) as run:
        view = run.adapter
        assert isinstance(view, AdapterView)
        for name in contract_of(run.loop):
            getattr(view, name)  # an AttributeError here is an adapter that breaks its contract
        assert view.target is target
        if run.loop == "continuous-denoising":
            assert view.denoiser is target.unet and view.scheduler is target.scheduler
        else:
            model = {"masked-diffusion-lm": "model", "ar-image": "lm"}.get(adapter)
            assert view.model is (getattr(target, model) if model else target)


class ReadsInternals(Strategy):
    name = "reads-internals"
    loops = ("continuous-denoising",)

    def on_attach(self, run):
        run.adapter._saved  # noqa: B018 - an adapter internal, not in the contract


class WritesAdapter(Strategy):
    name = "writes-adapter"
    loops = ("continuous-denoising",)

    def on_attach(self, run):
        run.adapter.step = 3


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_sd_pipeline()


@pytest.mark.parametrize(
    "strategy, message",
    [
        (ReadsInternals, r"run\.adapter\._saved.*does not declare '_saved'.*declared: name, loop"),
        (WritesAdapter, r"read-only for strategies; cannot set 'step'"),
    ],
)
def test_undeclared_reads_and_writes_are_refused_at_run_time(sd_pipe, strategy, message):
    cls, unet_dict = type(sd_pipe), dict(sd_pipe.unet.__dict__)
    with pytest.raises(ContractError, match=message):
        decodekit.attach(sd_pipe, [strategy()])
    # the failed attach left nothing behind: same class, no hook registry, same forward
    assert type(sd_pipe) is cls and sd_pipe.unet.__dict__.keys() == unet_dict.keys()
    assert decodekit.session.attached_run(sd_pipe) is None


# -- one dispatch rule: hookimpls decodekit would misread are refused --------------------------


def _plugin_with(method_name: str, impl) -> types.ModuleType:
    """A third-party plugin module whose one strategy implements ``impl`` as ``method_name``."""
    cls = type("Odd", (Strategy,), {"name": "odd", "loops": ("continuous-denoising",)})
    setattr(cls, method_name, impl)
    mod = types.ModuleType("odd_plugin")

    @hookimpl
    def decodekit_register_strategies(register):
        register(cls)

    mod.decodekit_register_strategies = decodekit_register_strategies
    mod.Odd = cls
    return mod


def _step_end():
    def decodekit_step_end(self, run, step):
        return None

    return decodekit_step_end  # a fresh function per case: hookimpl marks the function object


def _wrapper():
    def decodekit_step_end(self, run, step):
        return (yield)

    return decodekit_step_end


BAD_IMPLS = {
    "wrapper": (
        "decodekit_step_end",
        hookimpl(wrapper=True)(_wrapper()),
        r"hook decodekit_step_end: marked with wrapper=",
    ),
    "hookwrapper": (
        "decodekit_step_end",
        hookimpl(hookwrapper=True)(_wrapper()),
        r"hook decodekit_step_end: marked with hookwrapper=",
    ),
    "tryfirst": (
        "decodekit_step_end",
        hookimpl(tryfirst=True)(_step_end()),
        r"hook decodekit_step_end: marked with tryfirst=.*before`/`after",
    ),
    "trylast": (
        "decodekit_step_end",
        hookimpl(trylast=True)(_step_end()),
        r"hook decodekit_step_end: marked with trylast=",
    ),
    "unknown hook": (
        "decodekit_step_ends",
        hookimpl(_step_end()),
        r"hook decodekit_step_ends: there is no runtime hook of that name",
    ),
    "unknown argument": (
        "decodekit_step_end",
        hookimpl(lambda self, run, latents: None),
        r"hook decodekit_step_end: takes latents, which the hook does not pass",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_IMPLS))
def test_misread_hookimpls_are_refused_at_registration(manager, register_plugin, case):
    hook, impl, message = BAD_IMPLS[case]
    name = register_plugin(_plugin_with(hook, impl), name="odd-plugin")
    assert "odd" not in manager.registry.strategies
    failure = manager.registry.failed[name]
    assert "plugin 'odd-plugin'" in failure and "strategy 'odd'" in failure
    assert re.search(message, failure), failure


@pytest.mark.parametrize("case", sorted(BAD_IMPLS))
def test_misread_hookimpls_are_refused_at_attach(sd_pipe, case):
    hook, impl, message = BAD_IMPLS[case]
    strategy = _plugin_with(hook, impl).Odd()
    with pytest.raises(CompositionError, match=message):
        decodekit.attach(sd_pipe, [strategy])
    assert decodekit.session.attached_run(sd_pipe) is None


def test_a_plain_hookimpl_registers(manager, register_plugin):
    register_plugin(_plugin_with("decodekit_step_end", hookimpl(_step_end())), name="fine-plugin")
    assert "odd" in manager.registry.strategies and "fine-plugin" not in manager.registry.failed


# -- hookspecs: every one is called, and its docstring names who calls it -----------------------


def _runtime_specs() -> dict[str, str]:
    return {
        n: inspect.getdoc(getattr(hookspecs.RuntimeSpecs, n))
        for n in dir(hookspecs.RuntimeSpecs)
        if n.startswith("decodekit_")
    }


def _calls_hook(adapter: type, hook: str) -> bool:
    """Whether the adapter's module, or a decodekit.pipelines module it imports from, calls ``hook``."""
    module = sys.modules[adapter.__module__]
    sources = [inspect.getsource(module)]
    for node in ast.walk(ast.parse(sources[0])):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "decodekit.pipelines"
        ):
            sources.append(Path(inspect.getsourcefile(sys.modules[node.module])).read_text())
    if hook in ("decodekit_call_start", "decodekit_call_end"):  # Run.begin_call / end_call
        needle = "begin_call(" if hook.endswith("start") else "end_call("
        return any(needle in s or "guarded_call(" in s for s in sources)
    call = re.compile(r"\.call\(\s*\"" + hook + '"')
    return any(call.search(s) for s in sources)


def test_hookspec_docstrings_name_the_adapters_that_call_them(manager):
    adapters = {a.name: a for a in builtin_adapters(manager)}
    for hook, doc in _runtime_specs().items():
        m = re.search(r"Called by: ([^.]*)\.", doc.replace("\n", " "))
        assert m, f"{hook}'s docstring has no 'Called by:' line"
        named = {re.sub(r"\s*\(.*", "", n).strip() for n in m.group(1).split(",")}
        named = {n.split()[0] for n in named}
        calling = {n for n, a in adapters.items() if _calls_hook(a, hook)}
        assert calling, f"no built-in adapter calls {hook}: remove the hookspec or call it"
        assert named == calling, f"{hook}: docstring says {sorted(named)}, code {sorted(calling)}"
