"""The strategy contract: params validation with key paths, and the composition resolver."""

from __future__ import annotations

import pytest
from decodekit import CompositionError, ConfigError, Params, Strategy
from decodekit.strategy import resolve
from pydantic import Field

LOOP = "token-autoregression"


def make(name, **attrs):
    attrs.setdefault("loops", (LOOP,))
    return type(name.title().replace("-", ""), (Strategy,), {"name": name, **attrs})()


class WindowParams(Params):
    window: int = Field(4, ge=1, description="How many tokens.")


class Windowed(Strategy):
    name = "windowed"
    loops = (LOOP,)
    Params = WindowParams


def test_params_defaults_and_validation():
    assert Windowed().params.window == 4
    assert Windowed({"window": 7}).params.window == 7
    with pytest.raises(ConfigError) as e:
        Windowed({"window": 0}, path="strategies.1.params")
    assert e.value.path == "strategies.1.params.window"
    with pytest.raises(ConfigError) as e:
        Windowed({"widnow": 3}, path="strategies.0.params")
    assert e.value.path == "strategies.0.params.widnow" and "window" in e.value.message


def test_user_order_kept_without_constraints():
    a, b, c = make("a"), make("b"), make("c")
    assert [s.name for s in resolve([c, a, b], LOOP)] == ["c", "a", "b"]


def test_before_after_order():
    a = make("a", after=("c",))
    b = make("b")
    c = make("c", before=("b",))
    assert [s.name for s in resolve([a, b, c], LOOP)] == ["c", "a", "b"]


def test_cycle_is_an_error():
    a = make("a", before=("b",))
    b = make("b", before=("a",))
    with pytest.raises(CompositionError, match="cycle"):
        resolve([a, b], LOOP)


def test_slot_conflict_names_both():
    a = make("cache-a", slot="kv-cache")
    b = make("cache-b", slot="kv-cache")
    with pytest.raises(CompositionError) as e:
        resolve([a, b], LOOP)
    assert "cache-a" in str(e.value) and "cache-b" in str(e.value) and "keep one" in str(e.value)


def test_declared_conflict_by_name_or_slot():
    a = make("a", conflicts=("b",))
    with pytest.raises(CompositionError, match="'a' conflicts with 'b'"):
        resolve([make("b"), a], LOOP)
    c = make("c", conflicts=("kv-cache",))
    with pytest.raises(CompositionError, match="'c' conflicts with 'd'"):
        resolve([c, make("d", slot="kv-cache")], LOOP)


def test_missing_requirement():
    a = make("a", requires=("kv-cache",))
    with pytest.raises(CompositionError, match="requires 'kv-cache'"):
        resolve([a], LOOP)
    assert resolve([a, make("b", slot="kv-cache")], LOOP)


def test_unsupported_loop_and_duplicates():
    with pytest.raises(CompositionError, match="does not support"):
        resolve([make("a")], "continuous-denoising")
    with pytest.raises(CompositionError, match="listed twice"):
        resolve([make("a"), make("a")], LOOP)


# -- keyword construction, like diffusers' config classes ---------------------------------------
def test_params_as_keyword_arguments():
    from decodekit.plugins.faster_diffusion import FasterDiffusion
    from decodekit.plugins.sjd import Sjd

    fd = FasterDiffusion(key_steps="paper")
    assert fd.params == FasterDiffusion({"key_steps": "paper"}).params
    assert fd.params.key_steps == "paper"
    sjd = Sjd(window=8, coupling="coupled")
    assert (sjd.params.window, sjd.params.coupling) == (8, "coupled")
    assert sjd.params.init == Sjd().params.init  # the rest keep their defaults
    assert Sjd({"window": 8}, init="horizontal-repeat").params.window == 8  # merged into a mapping
    assert Windowed(window=7).params.window == 7


def test_keyword_params_are_validated_with_the_key_path():
    from decodekit.plugins.sjd import Sjd

    with pytest.raises(ConfigError, match="unknown parameter") as e:
        Sjd(windw=8)
    assert e.value.path == "params.windw"
    with pytest.raises(ConfigError) as e:
        Sjd(window=0)
    assert e.value.path == "params.window"


def test_params_object_and_keywords_together_are_an_error():
    from decodekit.plugins.faster_diffusion import FasterDiffusion
    from decodekit.plugins.sjd import Sjd

    with pytest.raises(ConfigError, match="not both.*window"):
        Sjd(Sjd.Params(window=4), window=8)
    with pytest.raises(ConfigError, match="not both"):
        FasterDiffusion(FasterDiffusion.Params(), key_steps="paper")
    with pytest.raises(ConfigError, match="not both"):
        Windowed(WindowParams(), window=2)
