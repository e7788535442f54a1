"""The JSON Schema of a YAML run config, for editors (``decodekit schema``).

Built from the config's own pydantic models: the sections of
`decodekit.config`, each registered strategy's ``Params`` (the strategy
entries are a union discriminated by ``name``) and, per registered pipeline
adapter, its ``Inputs`` and ``Options`` (chosen by ``pipeline.type``).
The checks the schema cannot express (composition, paths, devices) stay with
``decodekit validate``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _key(kind: str, name: str) -> str:
    return f"{kind}_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


class _Defs:
    """Collects ``$defs``; each model's nested definitions get a prefix of their own."""

    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}

    def ref(self, model: type[BaseModel], key: str) -> dict[str, Any]:
        try:
            schema = model.model_json_schema(ref_template=f"#/$defs/{key}__{{model}}")
        except Exception:  # a type pydantic cannot describe: any mapping, checked by validate
            schema = {"type": "object"}
        for name, sub in schema.pop("$defs", {}).items():
            self.defs[f"{key}__{name}"] = sub
        self.defs[key] = schema
        return {"$ref": f"#/$defs/{key}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """A section left empty in YAML (``output:``) is null: its defaults apply."""
    return {"anyOf": [schema, {"type": "null"}]}


def config_schema(manager=None) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a run config with the installed plugins."""
    from .config import BenchConfig, OutputConfig, PipelineConfig
    from .manager import get_manager

    manager = manager or get_manager()
    strategies = manager.registry.strategies
    pipelines = manager.registry.pipelines
    defs = _Defs()

    entries: list[dict[str, Any]] = []
    for name in sorted(strategies):
        cls = strategies[name]
        entry: dict[str, Any] = {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "params": _nullable(defs.ref(cls.Params, _key("params", name))),
            },
            "required": ["name"],
            "additionalProperties": False,
        }
        summary = (cls.__doc__ or "").strip().splitlines()
        if summary:
            entry["description"] = summary[0]
        entries.append(entry)
    strategy_item = {
        "anyOf": [{"type": "string", "enum": sorted(strategies)}, {"oneOf": entries}]
        if entries
        else [{"type": "string"}]
    }

    pipeline = defs.ref(PipelineConfig, "pipeline")
    defs.defs["pipeline"]["properties"]["type"]["enum"] = sorted(pipelines)
    per_adapter: list[dict[str, Any]] = []
    for name in sorted(pipelines):
        adapter = pipelines[name]
        then: dict[str, Any] = {"properties": {}}
        then["properties"]["inputs"] = _nullable(defs.ref(adapter.Inputs, _key("inputs", name)))
        then["properties"]["pipeline"] = {
            "properties": {"options": _nullable(defs.ref(adapter.Options, _key("options", name)))}
        }
        per_adapter.append(
            {
                "if": {
                    "properties": {"pipeline": {"properties": {"type": {"const": name}}}},
                    "required": ["pipeline"],
                },
                "then": then,
            }
        )

    schema: dict[str, Any] = {
        "$schema": DIALECT,
        "$id": "https://decodekit.dev/schema/config.json",
        "title": "decodekit run config",
        "description": "A YAML config for `decodekit run`, `validate` and `bench`.",
        "type": "object",
        "properties": {
            "pipeline": pipeline,
            "strategies": {"type": ["array", "null"], "items": strategy_item},
            "inputs": {"type": ["object", "null"]},
            "output": _nullable(defs.ref(OutputConfig, "output")),
            "bench": _nullable(defs.ref(BenchConfig, "bench")),
        },
        "required": ["pipeline"],
        "additionalProperties": False,
    }
    if per_adapter:
        schema["allOf"] = per_adapter
    schema["$defs"] = dict(sorted(defs.defs.items()))
    return schema


__all__ = ["config_schema", "DIALECT"]
