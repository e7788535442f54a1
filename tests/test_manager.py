"""Plugin loading: built-ins and entry points, allow/deny lists, broken plugins reported and skipped."""

from __future__ import annotations

import textwrap

import decodekit
import decodekit.manager as manager_mod
import pytest
from decodekit import Strategy, hookimpl


def make_dist(root, dist: str, entry: str, module: str, source: str) -> None:
    """Write an installed-looking distribution (dist-info with entry points) and its module under root."""
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[decodekit]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


def load_with(tmp_path, monkeypatch, dist: str, entry: str, module: str, source: str):
    """A fresh PluginManager that sees the built-ins plus one installed-looking plugin."""
    make_dist(tmp_path, dist, entry, module, source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DECODEKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DECODEKIT_DISABLE_PLUGINS", raising=False)
    return manager_mod.PluginManager()


GOOD = """
    from decodekit import Strategy, hookimpl

    class Shout(Strategy):
        name = "shout"
        loops = ("token-autoregression",)

    @hookimpl
    def decodekit_register_strategies(register):
        register(Shout)
"""


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    make_dist(tmp_path, "dk-good", "good", "dk_good_plugin", GOOD)
    make_dist(
        tmp_path,
        "dk-broken",
        "broken",
        "dk_broken_plugin",
        "raise ImportError('missing dependency foo')\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("DECODEKIT_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("DECODEKIT_DISABLE_PLUGINS", raising=False)
    yield monkeypatch
    manager_mod.reset_manager()


def test_builtins_register_through_entry_points(manager):
    reg = manager.registry
    assert {"stable-diffusion", "causal-lm"} <= set(reg.pipelines)
    assert "prior-noise" in reg.strategies
    info = manager.origin("strategies", "prior-noise")
    assert info.package == "decodekit" and info.version == decodekit.__version__


def test_third_party_loaded_and_broken_one_reported(fake_site):
    m = manager_mod.PluginManager()
    assert "shout" in m.registry.strategies
    assert m.origin("strategies", "shout").package == "dk-good"
    assert "broken" in m.registry.failed and "missing dependency foo" in m.registry.failed["broken"]
    assert "prior-noise" in m.registry.strategies  # the host carried on


def test_allow_list_empty_means_builtins_only(fake_site):
    fake_site.setenv("DECODEKIT_LOAD_PLUGINS", "")
    m = manager_mod.PluginManager()
    assert "shout" not in m.registry.strategies and "broken" not in m.registry.failed
    assert "prior-noise" in m.registry.strategies


def test_allow_list_names_plugins(fake_site):
    fake_site.setenv("DECODEKIT_LOAD_PLUGINS", "good")
    m = manager_mod.PluginManager()
    assert "shout" in m.registry.strategies and "broken" not in m.registry.failed


def test_block_list(fake_site):
    fake_site.setenv("DECODEKIT_DISABLE_PLUGINS", "good,prior-noise")
    m = manager_mod.PluginManager()
    assert "shout" not in m.registry.strategies and "prior-noise" not in m.registry.strategies


def test_unknown_strategy_suggests_close_names(manager):
    with pytest.raises(decodekit.UnknownNameError) as e:
        manager.strategy("prior-nose", "strategies.0.name")
    assert e.value.path == "strategies.0.name" and "prior-noise" in str(e.value)


def test_register_fixture_adds_and_removes(register_plugin, manager):
    class Temp(Strategy):
        name = "temp-strategy"
        loops = ("token-autoregression",)

    class Plugin:
        @staticmethod
        @hookimpl
        def decodekit_register_strategies(register):
            register(Temp)

    name = register_plugin(Plugin, name="temp")
    assert manager.registry.strategies["temp-strategy"] is Temp
    manager.unregister(name)
    assert "temp-strategy" not in manager.registry.strategies


def test_duplicate_name_is_reported_not_overwritten(register_plugin, manager):
    from decodekit.plugins.prior_noise import PriorNoise

    class Impostor(Strategy):
        name = "prior-noise"
        loops = ("continuous-denoising",)

    class Plugin:
        @staticmethod
        @hookimpl
        def decodekit_register_strategies(register):
            register(Impostor)

    register_plugin(Plugin, name="impostor")
    assert manager.registry.strategies["prior-noise"] is PriorNoise
    assert manager.origin("strategies", "prior-noise").package == "decodekit"
    msg = manager.registry.failed["impostor"]
    assert "built-in name" in msg and "reserved" in msg
    assert "'decodekit'" in msg and "'(registered at run time)'" in msg  # both packages named


def test_registering_a_non_strategy_is_reported(register_plugin, manager):
    class Plugin:
        @staticmethod
        @hookimpl
        def decodekit_register_strategies(register):
            register(object)

    register_plugin(Plugin, name="bad")
    assert "not a named Strategy subclass" in manager.registry.failed["bad"]


# -- plugins cannot replace built-ins, end the host, or hide misread hooks (issue 22) ----------
IMPOSTOR = """
    from decodekit import Strategy, hookimpl
    from decodekit.loops import DenoisingAdapter

    class FakeFaster(Strategy):
        name = "faster-diffusion"
        loops = ("continuous-denoising",)

    class FakeSD(DenoisingAdapter):
        name = "stable-diffusion"

        @classmethod
        def matches(cls, obj):
            return True

    class Own(Strategy):
        name = "own-strategy"
        loops = ("continuous-denoising",)

    @hookimpl
    def decodekit_register_strategies(register):
        register(FakeFaster)
        register(Own)

    @hookimpl
    def decodekit_register_pipelines(register):
        register(FakeSD)

    @hookimpl
    def decodekit_register_quality_metrics(register):
        register("shapes-judge", lambda *a: None)
"""


def test_third_party_cannot_take_builtin_names_even_loading_first(tmp_path, monkeypatch):
    from decodekit.pipelines.stable_diffusion import StableDiffusionAdapter
    from decodekit.plugins.faster_diffusion import FasterDiffusion

    # Entry point "aaa" sorts before every built-in; built-ins still register first.
    m = load_with(tmp_path, monkeypatch, "dk-impostor", "aaa", "dk_impostor_plugin", IMPOSTOR)
    reg = m.registry
    assert reg.strategies["faster-diffusion"] is FasterDiffusion
    assert reg.pipelines["stable-diffusion"] is StableDiffusionAdapter
    assert m.origin("pipelines", "stable-diffusion").package == "decodekit"
    assert m.origin("strategies", "own-strategy").package == "dk-impostor"  # the rest stays
    msg = reg.failed["aaa"]
    for name in ("strategy 'faster-diffusion'", "pipeline 'stable-diffusion'"):
        assert name in msg
    assert "'decodekit'" in msg and "'dk-impostor'" in msg
    assert m.origin("metrics", "shapes-judge").package == "decodekit"
    assert "metric 'shapes-judge'" in msg
    assert any(line.startswith("'aaa' failed to load: ") for line in m.failed_report())


def test_entry_point_named_like_a_builtin_is_refused(tmp_path, monkeypatch):
    from decodekit.plugins.faster_diffusion import FasterDiffusion

    m = load_with(tmp_path, monkeypatch, "dk-evil", "faster-diffusion", "dk_evil_plugin", IMPOSTOR)
    assert m.registry.strategies["faster-diffusion"] is FasterDiffusion
    assert "own-strategy" not in m.registry.strategies  # the module was never imported
    assert "dk_evil_plugin" not in __import__("sys").modules
    (key,) = [k for k in m.registry.failed if k.startswith("faster-diffusion")]
    msg = m.registry.failed[key]
    assert "'dk-evil'" in key and "'dk-evil'" in msg and "'decodekit'" in msg
    assert "reserved" in msg


@pytest.mark.parametrize(
    "source",
    [
        "import sys\nsys.exit(3)\n",
        """
        from decodekit import hookimpl

        @hookimpl
        def decodekit_register_strategies(register):
            raise SystemExit("bye")
        """,
    ],
    ids=["at-import", "at-registration"],
)
def test_plugin_raising_system_exit_is_reported_not_fatal(tmp_path, monkeypatch, source):
    m = load_with(tmp_path, monkeypatch, "dk-exit", "exits", f"dk_exit_{len(source)}", source)
    assert m.registry.failed["exits"].startswith("SystemExit")
    assert "prior-noise" in m.registry.strategies  # the host carried on


class _Typo:
    @staticmethod
    @hookimpl
    def decodekit_register_stratgies(register):  # misspelt: would never run
        pass


class _RuntimeHookOnModule:
    @staticmethod
    @hookimpl
    def decodekit_step_end(run, step, latents, tensors):
        pass


class _WrongArgument:
    @staticmethod
    @hookimpl
    def decodekit_register_strategies(add):
        pass


class _Wrapper:
    @staticmethod
    @hookimpl(wrapper=True)
    def decodekit_register_strategies(register):
        yield


@pytest.mark.parametrize(
    "plugin, hook, says",
    [
        (_Typo, "decodekit_register_stratgies", "no hook of that name"),
        (_RuntimeHookOnModule, "decodekit_step_end", "runtime hook"),
        (_WrongArgument, "decodekit_register_strategies", "takes add"),
        (_Wrapper, "decodekit_register_strategies", "wrapper"),
    ],
    ids=["unknown-name", "runtime-hook", "unknown-argument", "wrapper"],
)
def test_misread_registration_hooks_are_refused(register_plugin, manager, plugin, hook, says):
    with pytest.raises(decodekit.DecodekitError, match=says) as e:
        register_plugin(plugin, name="misread")
    assert f"plugin 'misread', hook {hook}" in str(e.value)
    assert not manager.pm.has_plugin("misread")
    assert says in manager.registry.failed["misread"]


def test_misread_hook_in_installed_plugin_is_reported(tmp_path, monkeypatch):
    source = """
        from decodekit import hookimpl

        @hookimpl
        def decodekit_register_strategy(register):
            pass
    """
    m = load_with(tmp_path, monkeypatch, "dk-typo", "typo", "dk_typo_plugin", source)
    assert "plugin 'typo', hook decodekit_register_strategy" in m.registry.failed["typo"]


def test_validate_warns_about_failed_plugins(fake_site, tmp_path, capsys):
    from decodekit.cli import main

    manager_mod.reset_manager()
    main(["validate", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert "warning: plugin 'broken' failed to load: ImportError: missing dependency foo" in err
