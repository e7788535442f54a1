"""Issue 22's fuzz suite: generated configs through `decodekit validate` end in ok or one `error:` line.

For every built-in pipeline adapter, alone and with each built-in strategy
that runs on its loop, hypothesis writes configs whose ``inputs``,
``pipeline.options`` and strategy ``params`` are drawn from the pydantic
models' own fields: valid values, the fields' boundaries and one past them,
wrong types, huge, negative, NaN and infinite numbers, and unknown keys. Each
goes through ``decodekit validate`` in-process, which must exit 0 (printing
``ok:``) or exit 2 with exactly one ``error:`` line that names a key path,
and never print a traceback. Validate loads no model, so the whole suite
(`EXAMPLES_PER_PAIR` x the pairs, over 1,000 configs) runs in about a minute
on 2 cores.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any

import annotated_types
import pytest
import yaml
from decodekit.cli import main
from decodekit.manager import get_manager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES_PER_PAIR = 120
"""Configs generated per (adapter, strategy) pair; 13 pairs make 1,560 configs."""

# Adapters without a zoo model (llada2, third-party) validate against an empty folder.
ZOO_MODELS = {
    "stable-diffusion": "zoo:shapes-sd",
    "causal-lm": "zoo:arith-ar",
    "masked-diffusion-lm": "zoo:arith-mdlm",
}
BASE_INPUTS: dict[str, dict[str, Any]] = {
    "stable-diffusion": {"prompt": ["a red circle"], "num_inference_steps": 4},
    "causal-lm": {"prompt": ["12+7="], "max_new_tokens": 4},
    "masked-diffusion-lm": {"prompt": ["12+7="], "gen_length": 8, "block_length": 4, "steps": 4},
}
# Keys a user might put in a free-form mapping (inputs.extra): real ones and near misses.
EXTRA_KEYS = ["eta", "temperature", "top_k", "num_beams", "strength", "generator", "tempreture"]
REFUSED_OPTIONS = ["trust_remote_code", "local_files_only"]
# A key path: a top-level section, then its keys (printable, control characters escaped).
ERROR_LINE = re.compile(r"^error: (pipeline|strategies|inputs|output|bench)(\.[^\n]*?)?: \S")

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 2**63, 2**64, 10**30, -(10**30)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -0.0]),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=100), max_size=4),
    st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def _pairs() -> list[tuple[str, str | None]]:
    """Each built-in adapter alone and with each built-in strategy of its loop."""
    reg = get_manager().registry
    pairs: list[tuple[str, str | None]] = []
    for name, adapter in sorted(reg.pipelines.items()):
        pairs.append((name, None))
        pairs += [
            (name, s) for s, cls in sorted(reg.strategies.items()) if adapter.loop in cls.loops
        ]
    return pairs


def _bounds(field: Any) -> list[Any]:
    """The field's default and each bound with the values one step either side of it."""
    out = [] if field.is_required() else [field.get_default(call_default_factory=True)]
    for m in field.metadata:
        for attr in ("ge", "gt", "le", "lt", "multiple_of"):
            v = getattr(m, attr, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                step = 1 if isinstance(v, int) else 0.5
                out += [v, v - step, v + step]
    return out


def _like(annotation: Any) -> st.SearchStrategy:
    """Values of roughly the annotation's type (valid ones and near misses)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _like(args[0])
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_like(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args) | st.text(max_size=8)
    if origin is list:
        return st.lists(_like(args[0]), max_size=4)
    if origin is tuple:
        return st.lists(_like(args[0]), max_size=4)
    if origin is dict:
        keys = st.sampled_from(EXTRA_KEYS) | st.text(min_size=1, max_size=8)
        return st.dictionaries(keys, JUNK, max_size=3)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(min_value=-3, max_value=200)
    if annotation is float:
        return st.floats(min_value=-2.0, max_value=20.0)
    if annotation is str:
        return st.text(max_size=12) | st.sampled_from(["paper-50", "uniform-4", "all", ""])
    return JUNK


def _value(field: Any) -> st.SearchStrategy:
    bounds = _bounds(field)
    options = [_like(field.annotation), JUNK]
    if bounds:
        options.insert(0, st.sampled_from(bounds))
    return st.one_of(options)


@st.composite
def _section(draw, model: Any, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` with a few of ``model``'s fields set to drawn values, maybe an unknown key."""
    out = dict(base)
    fields = model.model_fields
    if fields:
        names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=3))
        for name in names:
            out[name] = draw(_value(fields[name]))
    if draw(st.integers(0, 9)) == 0:
        out[draw(st.text(min_size=1, max_size=10))] = draw(JUNK)
    return out


@st.composite
def configs(draw, adapter_name: str, strategy_name: str | None, folder: str) -> dict[str, Any]:
    """One generated config for ``adapter_name`` (with ``strategy_name``, if any)."""
    reg = get_manager().registry
    adapter = reg.pipelines[adapter_name]
    pipeline: dict[str, Any] = {
        "type": adapter_name,
        "model": ZOO_MODELS.get(adapter_name, folder),
        "device": "cpu",
    }
    which = draw(st.integers(0, 9))
    if which == 0:
        pipeline["options"] = {draw(st.sampled_from(REFUSED_OPTIONS)): draw(JUNK)}
    elif which <= 2:
        pipeline["options"] = draw(_section(adapter.Options, {}))
    doc: dict[str, Any] = {
        "pipeline": pipeline,
        "inputs": draw(_section(adapter.Inputs, BASE_INPUTS.get(adapter_name, {}))),
    }
    if strategy_name is not None:
        params = draw(_section(reg.strategies[strategy_name].Params, {}))
        doc["strategies"] = [{"name": strategy_name, "params": params}]
    return doc


def _dump(doc: dict[str, Any]) -> str | None:
    try:
        return yaml.safe_dump(doc, allow_unicode=False)
    except yaml.YAMLError:  # a value YAML cannot write is no config
        return None


PAIRS = _pairs()


def test_the_suite_generates_over_a_thousand_configs():
    assert len(PAIRS) * EXAMPLES_PER_PAIR >= 1000
    reg = get_manager().registry
    assert {a for a, _ in PAIRS} == set(reg.pipelines)
    assert {s for _, s in PAIRS if s} == set(reg.strategies)


@pytest.mark.parametrize(
    ("adapter", "strategy"), PAIRS, ids=[f"{a}+{s or 'none'}" for a, s in PAIRS]
)
def test_validate_is_ok_or_one_error_line_naming_a_key(adapter, strategy, capsys, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "model").mkdir()
    config = folder / "config.yaml"

    @settings(
        max_examples=EXAMPLES_PER_PAIR,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(doc=configs(adapter, strategy, str(folder / "model")))
    def check(doc: dict[str, Any]) -> None:
        text = _dump(doc)
        if text is None:
            return
        config.write_text(text)
        capsys.readouterr()
        code = main(["validate", str(config)])
        out, err = capsys.readouterr()
        shown = f"config:\n{text}\nstdout:\n{out}\nstderr:\n{err}"
        assert "Traceback" not in out + err, shown
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        if code == 0:
            assert out.startswith("ok: ") and not errors, shown
        else:
            assert code == 2, shown
            assert len(errors) == 1, shown
            assert ERROR_LINE.match(errors[0]), shown

    check()


def test_generated_values_reach_the_boundaries():
    """The generator draws each bounded field's limits (a check of the suite itself)."""
    from decodekit.pipelines.stable_diffusion import StableDiffusionInputs

    bounds = _bounds(StableDiffusionInputs.model_fields["num_inference_steps"])
    assert {0, 1, 2, 999, 1000, 1001} <= set(bounds)
    assert any(
        isinstance(m, annotated_types.Ge)
        for m in StableDiffusionInputs.model_fields["seed"].metadata
    )
