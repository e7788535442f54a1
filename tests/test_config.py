"""YAML config loader: every user error is a ConfigError naming its key path (plus fuzzing).

Runs against the toy plugin of tests/tiny.py (registered by the ``toy`` fixture).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from decodekit.config import DTYPES, TOP_LEVEL, apply_overrides, load_config
from decodekit.errors import CompositionError, ConfigError, UnknownNameError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tiny import ToyAdapter, ToyInputs, ToyPipe, toy_config


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_error(doc, manager, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_config(doc, overrides, manager=manager)
    return ei.value


# -- loading -----------------------------------------------------------------------------


def test_valid_yaml_loads_with_relative_model_folder(toy, manager, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # the folder is found next to the config, not in the cwd
    cfg_file = write_yaml(
        tmp_path / "run.yaml",
        """
pipeline: {type: toy, model: toy-model, device: auto, options: {scale: 2.0}}
strategies:
  - halve
  - name: halve
    params:
inputs: {steps: 5, seed: 3}
""",
    )
    # Listing a strategy twice is a composition question, not a schema one.
    cfg = load_config(cfg_file, manager=manager)
    assert cfg.adapter is ToyAdapter
    assert Path(cfg.source) == toy.resolve()
    assert cfg.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cfg.pipeline.dtype == "float32"
    assert isinstance(cfg.inputs, ToyInputs) and cfg.inputs.steps == 5 and cfg.inputs.seed == 3
    assert cfg.strategy_specs() == [
        {"name": "halve", "params": {}},
        {"name": "halve", "params": {}},
    ]
    assert cfg.bench.repeat == 3 and cfg.bench.warmup == 1 and cfg.output.dir == "outputs"
    assert cfg.file == cfg_file
    with pytest.raises(CompositionError, match="listed twice"):
        cfg.resolve_strategies(manager)
    pipe = cfg.load_pipeline()
    assert isinstance(pipe, ToyPipe) and pipe.scale == 2.0


def test_yaml_syntax_error_names_file_line_and_column(toy, manager, tmp_path):
    f = write_yaml(tmp_path / "bad.yaml", "pipeline:\n  type: toy\n  model: [unclosed\n")
    e = config_error(f, manager)
    assert e.path == ""
    assert "bad.yaml:" in e.message and "invalid YAML" in e.message
    assert ":4:1" in e.message or ":3:" in e.message


def test_duplicate_yaml_key_is_an_error(toy, manager, tmp_path):
    f = write_yaml(
        tmp_path / "dup.yaml", "pipeline: {type: toy, model: x}\npipeline: {type: toy}\n"
    )
    e = config_error(f, manager)
    assert "duplicate key 'pipeline'" in e.message and "dup.yaml:2:1" in e.message


def test_missing_config_file(manager, tmp_path):
    e = config_error(tmp_path / "nope.yaml", manager)
    assert "does not exist" in e.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(toy, manager, tmp_path, text):
    e = config_error(write_yaml(tmp_path / "c.yaml", text), manager)
    assert e.path == "" and "must be a mapping" in e.message


def test_empty_config_says_pipeline_is_missing(toy, manager, tmp_path):
    e = config_error(write_yaml(tmp_path / "c.yaml", ""), manager)
    assert e.path == "pipeline" and "missing" in e.message


@pytest.mark.parametrize(
    "mutate, path, words",
    [
        (lambda c: c.update(strategy=c.pop("strategies")), "strategy", "Did you mean 'strategies'"),
        (lambda c: c["pipeline"].update(modle="x"), "pipeline.modle", "Did you mean 'model'"),
        (lambda c: c["pipeline"].update(type=3), "pipeline.type", "valid string (got int 3)"),
        (lambda c: c["pipeline"].pop("model"), "pipeline.model", "missing required key"),
        (lambda c: c["pipeline"].update(type="tyo"), "pipeline.type", "Did you mean 'toy'"),
        (lambda c: c["pipeline"].update(device="gpu"), "pipeline.device", "unknown device 'gpu'"),
        (lambda c: c["pipeline"].update(dtype="float8"), "pipeline.dtype", "float16"),
        (lambda c: c["pipeline"].update(options=[1]), "pipeline.options", "valid dictionary"),
        (lambda c: c.update(strategies={"name": "halve"}), "strategies", "expected a list"),
        (lambda c: c["strategies"].append(7), "strategies.1", "expected a mapping"),
        (
            lambda c: c["strategies"][0].update(name="halv"),
            "strategies.0.name",
            "Did you mean 'halve'",
        ),
        (
            lambda c: c["strategies"][0].update(parms={}),
            "strategies.0.parms",
            "Did you mean 'params'",
        ),
        (lambda c: c["strategies"][0].pop("name"), "strategies.0.name", "missing required key"),
        (
            lambda c: c["strategies"][0]["params"].update(every=0),
            "strategies.0.params.every",
            "greater than or equal to 1",
        ),
        (
            lambda c: c["strategies"][0]["params"].update(evry=1),
            "strategies.0.params.evry",
            "this strategy takes: every",
        ),
        (lambda c: c["inputs"].update(steps="many"), "inputs.steps", "valid integer"),
        (lambda c: c["inputs"].update(stepz=3), "inputs.stepz", "Did you mean 'steps'"),
        (lambda c: c["inputs"].update(prompt="a"), "inputs.prompt", "valid list"),
        (lambda c: c["output"].update(dir=["x"]), "output.dir", "valid string"),
        (lambda c: c.update(bench={"repeat": 0}), "bench.repeat", "greater than or equal to 1"),
        (lambda c: c.update(bench=[3]), "bench", "expected a mapping, got list"),
    ],
)
def test_user_errors_name_the_key_path(toy, manager, mutate, path, words):
    cfg = toy_config(toy)
    mutate(cfg)
    e = config_error(cfg, manager)
    assert e.path == path
    assert words in e.message
    assert str(e).startswith(f"{path}: ")


def test_unknown_strategy_is_an_unknown_name_error_with_suggestion(toy, manager):
    with pytest.raises(UnknownNameError) as ei:
        load_config(toy_config(toy, strategies=[{"name": "halfe"}]), manager=manager)
    assert ei.value.path == "strategies.0.name" and ei.value.suggestions == ["halve"]


def test_missing_model_folder(toy, manager, tmp_path):
    e = config_error(
        toy_config(toy, pipeline={"type": "toy", "model": "./no/such/folder"}), manager
    )
    assert e.path == "pipeline.model" and "does not exist" in e.message


def test_hub_id_must_be_in_the_local_cache(toy, manager, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    cfg = toy_config(toy, pipeline={"type": "toy", "model": "someorg/tiny-model"})
    e = config_error(cfg, manager)
    assert e.path == "pipeline.model"
    assert "never downloads" in e.message and "hf download someorg/tiny-model" in e.message
    assert "local folder" in e.message
    # Put a snapshot where huggingface_hub's cache layout says it lives: now it resolves, offline.
    repo = cache / "models--someorg--tiny-model"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert Path(load_config(cfg, manager=manager).source) == snapshot


def test_zoo_names_resolve_through_zoo_path(toy, manager, monkeypatch, tmp_path):
    from decodekit.pipelines import zoo

    monkeypatch.setattr(zoo, "zoo_path", lambda name: tmp_path / "zoo" / name)
    monkeypatch.setattr(zoo, "list_models", lambda: [{"name": "toy-sd"}, {"name": "arith-ar"}])
    (tmp_path / "zoo" / "toy-sd").mkdir(parents=True)
    cfg = load_config(
        toy_config(toy, pipeline={"type": "toy", "model": "zoo:toy-sd"}), manager=manager
    )
    assert Path(cfg.source) == tmp_path / "zoo" / "toy-sd"
    with pytest.raises(UnknownNameError) as ei:
        load_config(
            toy_config(toy, pipeline={"type": "toy", "model": "zoo:toy-sdd"}), manager=manager
        )
    assert ei.value.path == "pipeline.model" and ei.value.suggestions == ["toy-sd"]
    e = config_error(toy_config(toy, pipeline={"type": "toy", "model": "zoo:arith-ar"}), manager)
    assert e.path == "pipeline.model" and "does not exist" in e.message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(toy, manager):
    cfg = toy_config(toy)
    cfg["pipeline"]["device"] = "cuda:0"
    e = config_error(cfg, manager)
    assert e.path == "pipeline.device" and "CUDA is not available" in e.message


def test_composition_is_checked_by_resolve_strategies(toy, manager):
    cfg = load_config(toy_config(toy, strategies=["halve", "rival"]), manager=manager)
    with pytest.raises(CompositionError, match="denoiser-cache"):
        cfg.resolve_strategies(manager)
    ordered = load_config(toy_config(toy), manager=manager).resolve_strategies(manager)
    assert [s.name for s in ordered] == ["halve"] and ordered[0].params.every == 2


# -- overrides -----------------------------------------------------------------------------


def test_overrides_set_nested_values_parsed_as_yaml(toy, manager):
    cfg = load_config(
        toy_config(toy),
        [
            "strategies.0.params.every=4",
            "inputs.seed=3",
            "inputs.prompt=[x, y, z]",
            "bench.repeat=5",
        ],
        manager=manager,
    )
    assert cfg.strategy_specs() == [{"name": "halve", "params": {"every": 4}}]
    assert cfg.inputs.seed == 3 and cfg.inputs.prompt == ["x", "y", "z"] and cfg.bench.repeat == 5


def test_override_creates_missing_sections_then_validates_them(toy, manager):
    cfg = toy_config(toy)
    del cfg["bench"]
    assert load_config(cfg, ["bench.warmup=2"], manager=manager).bench.warmup == 2
    e = config_error(cfg, manager, ["bench.warmpu=2"])
    assert e.path == "bench.warmpu" and "Did you mean 'warmup'" in e.message


def test_override_does_not_touch_the_input(toy):
    cfg = toy_config(toy)
    before = copy.deepcopy(cfg)
    out = apply_overrides(cfg, ["inputs.seed=9", "strategies.0.name=rival"])
    assert cfg == before and out["inputs"]["seed"] == 9 and out["strategies"][0]["name"] == "rival"


@pytest.mark.parametrize(
    "override, path, words",
    [
        ("strategies.3.params.every=1", "strategies.3", "out of range; strategies has 1 entries"),
        ("strategies.first.name=x", "strategies.first", "use an index"),
        ("pipeline.type.sub=1", "pipeline.type", "is a string, not a mapping or list"),
        ("noequals", "--set", "expected KEY=VALUE"),
        ("=3", "--set", "expected KEY=VALUE"),
        ("inputs..seed=1", "inputs..seed", "empty segment"),
        ("inputs.seed=[1", "inputs.seed", "invalid YAML"),
        ("inputs.seed=x", "inputs.seed", "valid integer"),
    ],
)
def test_bad_overrides(toy, manager, override, path, words):
    e = config_error(toy_config(toy), manager, [override])
    assert e.path == path and words in e.message


# -- fuzzing -----------------------------------------------------------------------------------

_scalars = st.one_of(
    st.integers(), st.floats(allow_nan=False), st.booleans(), st.text(max_size=5), st.none()
)
_containers = st.one_of(
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_not_str = st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), _containers)
_not_int = st.one_of(  # never valid for an int field, strict or lax (bools are excluded: lax ints take them)
    _containers,
    st.floats().filter(lambda f: not f.is_integer() if f == f and abs(f) != float("inf") else True),
    st.text(alphabet="abcxyz -_", max_size=5),
    st.none(),
)
_not_mapping = st.one_of(
    st.integers(),
    st.floats(),
    st.booleans(),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
_STRATEGY_NAMES = {"halve", "rival"}

# site -> a strategy of values that are invalid there
_BAD_VALUES = {
    ("pipeline",): st.one_of(_not_mapping, st.none()),
    ("pipeline", "type"): st.one_of(_not_str, st.text(max_size=8).filter(lambda s: s != "toy")),
    ("pipeline", "model"): st.one_of(
        _not_str, st.text(alphabet="abcdef", min_size=1, max_size=6).map(lambda s: f"./missing-{s}")
    ),
    ("pipeline", "device"): st.one_of(
        _not_str, st.sampled_from(["gpu", "cuda:x", "CPU", "", "tpu:0", "cuda:99"])
    ),
    ("pipeline", "dtype"): st.one_of(
        _not_str, st.text(max_size=8).filter(lambda s: s not in DTYPES)
    ),
    ("pipeline", "options"): _not_mapping,
    ("strategies",): st.one_of(
        st.integers(),
        st.floats(),
        st.booleans(),
        st.text(max_size=5),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    ),
    ("strategies", 0): st.one_of(
        st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2)
    ),
    ("strategies", 0, "name"): st.one_of(
        _not_str, st.text(max_size=8).filter(lambda s: s not in _STRATEGY_NAMES)
    ),
    ("strategies", 0, "params"): st.one_of(
        st.integers(),
        st.floats(),
        st.booleans(),
        st.text(max_size=5),
        st.lists(st.integers(), max_size=2),
    ),
    ("strategies", 0, "params", "every"): st.one_of(_not_int, st.integers(max_value=0)),
    ("inputs",): _not_mapping,
    ("inputs", "steps"): st.one_of(_not_int, st.integers(max_value=0), st.booleans()),
    ("inputs", "prompt"): st.one_of(
        st.integers(), st.text(max_size=4), st.lists(st.integers(), min_size=1, max_size=2)
    ),
    ("inputs", "seed"): _not_int,
    ("output",): _not_mapping,
    ("output", "dir"): _not_str,
    ("bench",): _not_mapping,
    ("bench", "repeat"): st.one_of(_not_int, st.integers(max_value=0), st.booleans()),
    ("bench", "warmup"): st.one_of(_not_int, st.integers(max_value=-1), st.booleans()),
}
# mappings that refuse unknown keys, with the keys they know
_CLOSED = {
    (): set(TOP_LEVEL),
    ("pipeline",): {"type", "model", "device", "dtype", "options"},
    ("strategies", 0): {"name", "params"},
    ("strategies", 0, "params"): {"every"},
    ("inputs",): {"prompt", "steps", "seed"},
    ("output",): {"dir"},
    ("bench",): {"repeat", "warmup"},
}
_REQUIRED = [("pipeline",), ("pipeline", "type"), ("pipeline", "model"), ("strategies", 0, "name")]


def _mutation():
    bad = st.sampled_from(sorted(_BAD_VALUES, key=str)).flatmap(
        lambda site: _BAD_VALUES[site].map(lambda v: ("set", site, v))
    )
    unknown = st.sampled_from(sorted(_CLOSED, key=str)).flatmap(
        lambda site: (
            st.one_of(st.text(min_size=1, max_size=8), st.integers(-3, 99))
            .filter(lambda k: k not in _CLOSED[site])
            .map(lambda k: ("add", site, k))
        )
    )
    missing = st.sampled_from(_REQUIRED).map(lambda site: ("del", site, None))
    return st.one_of(bad, unknown, missing)


def _apply(doc: dict, mutation) -> str | None:
    """Apply one mutation in place; returns the key path it broke, or None if its parent is gone."""
    op, site, value = mutation
    node = doc
    parent = site if op == "add" else site[:-1]
    for part in parent:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
        if not isinstance(node, (dict, list)):
            return None
    if op == "add":
        if not isinstance(node, dict):
            return None
        node[value] = 1
        return ".".join(str(p) for p in (*site, value))
    key = site[-1]
    if isinstance(node, dict) != isinstance(key, str):
        return None
    if op == "del":
        if key not in node:
            return None
        del node[key]
    elif isinstance(node, list) and key >= len(node):
        return None
    else:
        node[key] = value
    return ".".join(str(p) for p in site)


def _check_path(path: str, broken: list[str]) -> None:
    assert path, "a ConfigError from a mutated mapping must name a key path"
    assert any(path == b or path.startswith(b + ".") for b in broken), (path, broken)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutation=_mutation())
def test_fuzz_single_mutation_names_the_broken_key(toy, manager, mutation):
    doc = toy_config(toy)
    broken = _apply(doc, mutation)
    assert broken is not None
    e = config_error(doc, manager)
    _check_path(e.path, [broken])


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations=st.lists(_mutation(), min_size=1, max_size=4))
def test_fuzz_several_mutations_raise_config_error_only(toy, manager, mutations):
    doc = toy_config(toy)
    broken = [b for b in (_apply(doc, m) for m in mutations) if b is not None]
    if not broken:
        return
    try:
        load_config(doc, manager=manager)
    except ConfigError as e:
        _check_path(e.path, broken)
    else:
        pytest.fail(f"mutations {broken} were accepted")


_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    doc=st.one_of(
        _json.filter(lambda d: not isinstance(d, str)),  # a str would be read as a file path
        st.fixed_dictionaries({}, optional={k: _json for k in TOP_LEVEL}),
    ),
    overrides=st.lists(st.text(alphabet="abcinputsed.0123=[]{}:, ", max_size=14), max_size=2),
)
def test_fuzz_random_documents_and_overrides_raise_only_config_error(toy, manager, doc, overrides):
    try:
        cfg = load_config(doc, overrides, manager=manager)
    except ConfigError:
        return
    assert cfg.adapter is ToyAdapter  # a random document that happens to be valid


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet="pipeline:type -[]{}'\"\n\t&*!|>%@`?,#0", max_size=40))
def test_fuzz_yaml_text_raises_only_config_error(toy, manager, tmp_path, text):
    f = tmp_path / "fuzz.yaml"
    f.write_text(text)
    try:
        load_config(f, manager=manager)
    except ConfigError:
        pass


def test_unreadable_path_is_a_config_error(manager):
    e = config_error("bad\x00name.yaml", manager)
    assert e.path == "" and "cannot read config file" in e.message
