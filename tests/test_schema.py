"""`decodekit schema`: the JSON Schema of the YAML config accepts the examples and refuses typos.

jsonschema is not a dependency, so a small checker of the keywords the schema uses stands in.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from decodekit.schema import config_schema

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").rglob("*.yaml"))

_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def errors(schema: dict, value, root: dict, path: str = "") -> list[str]:
    """Where ``value`` breaks ``schema`` (a subset of draft 2020-12), as ``path: why``."""
    out: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        out += errors(root["$defs"][ref.removeprefix("#/$defs/")], value, root, path)
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            return out + [f"{path}: {value!r} is not {names}"]
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    for key, test in (
        ("minimum", lambda v, m: v >= m),
        ("maximum", lambda v, m: v <= m),
        ("exclusiveMinimum", lambda v, m: v > m),
        ("exclusiveMaximum", lambda v, m: v < m),
    ):
        if key in schema and _is_type(value, "number") and not test(value, schema[key]):
            out.append(f"{path}: {value!r} breaks {key} {schema[key]}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        out.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            if k not in value:
                out.append(f"{path}.{k}: required")
        for k, v in value.items():
            if k in props:
                out += errors(props[k], v, root, f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{path}.{k}: not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += errors(schema["additionalProperties"], v, root, f"{path}.{k}")
    if isinstance(value, list):
        if "items" in schema:
            for i, v in enumerate(value):
                out += errors(schema["items"], v, root, f"{path}.{i}")
        if "minItems" in schema and len(value) < schema["minItems"]:
            out.append(f"{path}: fewer than {schema['minItems']} items")
    for sub in schema.get("allOf", []):
        out += errors(sub, value, root, path)
    if "anyOf" in schema:
        found = [errors(s, value, root, path) for s in schema["anyOf"]]
        if all(found):
            out.append(f"{path}: matches none of anyOf ({min(found, key=len)})")
    if "oneOf" in schema:
        found = [errors(s, value, root, path) for s in schema["oneOf"]]
        matched = sum(not f for f in found)
        if matched != 1:
            out.append(f"{path}: matches {matched} of oneOf")
    if "if" in schema and not errors(schema["if"], value, root, path):
        out += errors(schema.get("then", {}), value, root, path)
    return out


@pytest.fixture(scope="module")
def schema():
    return config_schema()


def test_examples_exist():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.parent.name + "/" + p.name)
def test_schema_accepts_each_example(schema, example):
    assert errors(schema, yaml.safe_load(example.read_text()), schema) == []


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda d: d.update(bench2={}), ".bench2: not allowed"),
        (lambda d: d["pipeline"].update(type="nope"), ".pipeline.type"),
        (lambda d: d["strategies"][0]["params"].update(windw=3), "strategies.0"),
        (lambda d: d["strategies"][0]["params"].update(window="x"), "strategies.0"),
        (lambda d: d["inputs"].update(prompts=["a"]), ".inputs.prompts: not allowed"),
    ],
)
def test_schema_refuses_typos(schema, edit, where):
    doc = yaml.safe_load((Path(__file__).parent.parent / "examples" / "sjd.yaml").read_text())
    edit(doc)
    assert any(where in e for e in errors(schema, doc, schema))


def test_strategy_entries_are_discriminated_by_name(schema):
    entries = schema["properties"]["strategies"]["items"]["anyOf"][1]["oneOf"]
    names = [e["properties"]["name"]["const"] for e in entries]
    assert "sjd" in names and "faster-diffusion" in names and names == sorted(names)
    doc = {"pipeline": {"type": "ar-image", "model": "zoo:shapes-ar"}, "strategies": ["sjd"]}
    assert errors(schema, doc, schema) == []
    doc["strategies"] = ["sdj"]
    assert errors(schema, doc, schema)
