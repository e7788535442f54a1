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
    assert "already registered" in manager.registry.failed["impostor"]


def test_registering_a_non_strategy_is_reported(register_plugin, manager):
    class Plugin:
        @staticmethod
        @hookimpl
        def decodekit_register_strategies(register):
            register(object)

    register_plugin(Plugin, name="bad")
    assert "not a named Strategy subclass" in manager.registry.failed["bad"]
