"""The YAML run configuration: schema, loader and ``--set`` overrides; every error names its key path.

A config says which pipeline adapter loads which model, which strategies
attach to it, what inputs it runs and where outputs go::

    pipeline:
      type: stable-diffusion     # a registered adapter name
      model: zoo:shapes-sd       # zoo:<name>, a local folder, or a hub id already in the local HF cache
      device: auto               # auto|cpu|cuda|cuda:N|mps; auto = cuda when available, else cpu
      dtype: float32             # float32|float16|bfloat16|float64
      options: {}                # adapter-specific, passed to adapter.load(options=...)
      threads: 1                 # optional; torch CPU threads (default 1 on cpu, torch's on a GPU)
      compile: false             # optional; true: torch.compile the model call (core/compiling.py)
    strategies:
      - name: faster-diffusion
        params: {key_steps: paper-50}
    inputs: {prompt: ["a red circle"], seed: 0}   # the adapter's Inputs model
    output: {dir: outputs/shapes-sd}
    bench: {repeat: 3, warmup: 1}                  # optional

`load_config` validates all of it before anything is loaded and raises
`ConfigError` whose ``path`` is the key at fault (``strategies.0.params.key_steps``).
A relative model folder is looked up in the current directory, then next to
the config file; a relative ``output.dir`` is taken from the current directory.
Models are never downloaded, and a config cannot enable a model folder's own
code (``pipeline.options`` is each adapter's allow-list; remote code needs the
CLI flag ``--trust-remote-code``).

A config is data from anyone, so its size is bounded before it is looked at:
at most `MAX_CONFIG_BYTES` of YAML, `MAX_DEPTH` levels of nesting and
`MAX_NODES` values counted with every YAML alias expanded (a "billion laughs"
document stops at the limit instead of filling the memory).
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
)

from .errors import ConfigError, DecodekitError, UnknownNameError
from .manager import PluginManager, get_manager
from .pipeline import Inputs, KeyValueError, Options, PipelineAdapter
from .strategy import Strategy, resolve

DTYPES = ("float32", "float16", "bfloat16", "float64")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Files whose presence in the local HF cache shows a hub model was downloaded.
_HUB_MARKERS = ("model_index.json", "config.json")

MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this (1 MiB) is refused before it is parsed."""
MAX_DEPTH = 32
"""Deepest nesting of mappings and lists a config may have."""
MAX_NODES = 100_000
"""Most values a config may hold, counted with YAML aliases expanded."""
# Options a config may never set, whatever the adapter: what they would enable is
# the user's decision on the command line, not the config author's.
_REFUSED_OPTIONS = {
    "trust_remote_code": "a config cannot enable remote code: it executes Python files from "
    "the model folder. If you trust the folder, pass --trust-remote-code on the command line.",
    "local_files_only": "decodekit never downloads; models always load from local files only, "
    "so this option cannot be set. Download the model first (`hf download ...`).",
}


class _Section(BaseModel):
    """Base of the config sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class PipelineConfig(_Section):
    """The ``pipeline`` section: which adapter loads which model, where and in what precision."""

    type: StrictStr = Field(description="a registered pipeline adapter name")
    model: StrictStr = Field(
        description="zoo:<name>, a local folder, or a hub id in the local cache"
    )
    device: StrictStr = Field("auto", description="auto|cpu|cuda|cuda:N|mps")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    options: dict[str, Any] = Field(
        default_factory=dict, description="adapter-specific load options"
    )
    threads: StrictInt | None = Field(
        None,
        ge=1,
        description="torch CPU threads (--threads wins); unset: 1 on a CPU, torch's default on a GPU",
    )
    compile: StrictBool | Literal["inductor", "eager", "aot_eager"] = Field(
        False,
        description="torch.compile the model call (run, bench): true (inductor) or a dynamo "
        "backend; masked-diffusion-lm and stable-diffusion",
    )


class StrategyConfig(_Section):
    """One entry of ``strategies``: a registered strategy name and its params."""

    name: StrictStr
    params: dict[str, Any] = Field(default_factory=dict)


class OutputConfig(_Section):
    """The ``output`` section."""

    dir: StrictStr = Field("outputs", description="folder that `decodekit run` writes outputs into")


class BenchConfig(_Section):
    """The optional ``bench`` section: how `decodekit bench` measures."""

    repeat: StrictInt = Field(3, ge=1, description="baseline/strategy pairs measured")
    warmup: StrictInt = Field(1, ge=0, description="unmeasured runs of each arm first")


TOP_LEVEL = ("pipeline", "strategies", "inputs", "output", "bench")


@dataclass
class RunConfig:
    """A validated run configuration, with the adapter, model source and device resolved."""

    pipeline: PipelineConfig
    strategies: list[StrategyConfig]
    inputs: Inputs
    output: OutputConfig
    bench: BenchConfig
    adapter: type[PipelineAdapter]
    source: str  # the local folder the adapter loads from
    device: str  # `pipeline.device` with "auto" resolved
    raw: dict[str, Any] = field(default_factory=dict)  # the document after overrides
    file: Path | None = None
    options: Options | None = None  # `pipeline.options` checked by the adapter's Options model
    trust_remote_code: bool = False  # given on the command line, never by the config

    def strategy_specs(self) -> list[dict[str, Any]]:
        """The strategies as ``{"name", "params"}`` dicts, ready for `decodekit.attach`."""
        return [{"name": s.name, "params": dict(s.params)} for s in self.strategies]

    def build_strategies(self, manager: PluginManager | None = None) -> list[Strategy]:
        """Fresh strategy instances, in config order."""
        from .session import build_strategies

        return build_strategies(self.strategy_specs(), manager or get_manager(), "strategies")

    def resolve_strategies(self, manager: PluginManager | None = None) -> list[Strategy]:
        """Strategy instances in hook order; `CompositionError` when they cannot run together."""
        return resolve(self.build_strategies(manager), self.adapter.loop)

    def load_pipeline(self) -> Any:
        """Load the model through the adapter (once; callers keep the result).

        A folder the adapter's library cannot read (missing or broken files)
        becomes a `ConfigError` at ``pipeline.model``.
        """
        options = check_options(self.adapter, self.pipeline.options)
        extra: dict[str, Any] = {}
        if self.trust_remote_code:
            import inspect

            if "trust_remote_code" not in inspect.signature(self.adapter.load).parameters:
                raise ConfigError(
                    "--trust-remote-code",
                    f"the {self.adapter.name!r} adapter never runs a model folder's own code; "
                    "drop the flag.",
                )
            extra["trust_remote_code"] = True
        try:
            target = self.adapter.load(
                self.source,
                device=self.device,
                dtype=self.pipeline.dtype,
                options=options.model_dump(exclude_unset=True),
                **extra,
            )
        except DecodekitError:
            raise
        except (OSError, ValueError) as e:
            detail = " ".join(str(e).split())
            if len(detail) > 300:
                detail = detail[:297] + "..."
            raise ConfigError(
                "pipeline.model",
                f"the {self.adapter.name!r} adapter could not load {self.source!r}: "
                f"{type(e).__name__}: {detail}",
            ) from e
        if self.pipeline.compile:
            from .compiling import compile_pipeline

            compile_pipeline(target, self.adapter.name, self.pipeline.compile)
        return target

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description of what runs: pipeline, resolved source and device, strategies, inputs."""
        return {
            "file": str(self.file) if self.file else None,
            "pipeline": {
                **self.pipeline.model_dump(),
                "source": self.source,
                "resolved_device": self.device,
            },
            "strategies": self.strategy_specs(),
            "inputs": self.inputs.model_dump(mode="json"),
            "output": self.output.model_dump(),
            "bench": self.bench.model_dump(),
        }


# -- reading ------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key; the constructor below reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file; syntax errors become a `ConfigError` with the file, line and column.

    Files over `MAX_CONFIG_BYTES` and documents past `MAX_DEPTH` or `MAX_NODES`
    are refused.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                "",
                f"config file {_short(str(p))} is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                "a run config is a few lines of YAML. Check that this is the right file.",
            )
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError("", f"{str(p)!r} is a folder, not a config file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: a NUL in the path
        raise ConfigError("", f"cannot read config file {str(p)!r}: {e}") from None
    doc = parse_yaml(text, str(p))
    check_size(doc)
    return doc


def check_size(doc: Any, path: str = "") -> None:
    """Refuse a document nested deeper than `MAX_DEPTH` or holding over `MAX_NODES` values.

    Values are counted as the document reads with every alias expanded (a
    shared or self-referencing list counts each time it appears), and the walk
    stops at the first limit passed, so its cost is bounded too.
    """
    count = 0
    # One iterator per open container, so memory grows with depth, not with width.
    stack: list[tuple[Any, str]] = []
    node, where = doc, path
    while True:
        count += 1
        if count > MAX_NODES:
            raise ConfigError(
                where,
                f"the config holds more than {MAX_NODES:,} values (YAML aliases counted where "
                "they are used); a run config is a few lines. Remove the repeated anchors/aliases.",
            )
        if isinstance(node, (dict, list, tuple)):
            if len(stack) >= MAX_DEPTH:
                raise ConfigError(
                    where,
                    f"nested more than {MAX_DEPTH} levels deep; a run config needs a few. "
                    "Check for a self-referencing YAML alias.",
                )
            items = iter(node.items()) if isinstance(node, dict) else enumerate(node)
            stack.append((items, where))
        while stack:
            items, parent = stack[-1]
            nxt = next(items, None)
            if nxt is not None:
                key = _short_key(nxt[0])
                node, where = nxt[1], f"{parent}.{key}" if parent else key
                break
            stack.pop()
        else:
            return


def _short_key(k: Any) -> str:
    text = k if isinstance(k, str) else _short(k)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_yaml(text: str, name: str = "<config>") -> Any:
    """Parse YAML text (``name`` labels errors)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise ConfigError(
            "", f"{name}: nested too deeply to read; a run config needs a few levels"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        detail = f"{context}, {problem}" if context else problem
        raise ConfigError("", f"{where}: invalid YAML: {detail}") from None


# -- overrides ------------------------------------------------------------------------


def apply_overrides(doc: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply ``a.b.0.c=value`` overrides (value parsed as YAML) to a copy of ``doc``.

    A missing mapping key is created (validation then says whether it is
    allowed); a list index must already exist.
    """
    import copy

    doc = copy.deepcopy(doc) if doc is not None else {}
    for item in overrides:
        key, sep, value_text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                "--set",
                f"expected KEY=VALUE (like strategies.0.params.key_steps=uniform-4), got {item!r}",
            )
        try:
            value = parse_yaml(value_text, "value")
        except ConfigError as e:
            raise ConfigError(key, f"--set {key}: {e.message}") from None
        parts = key.split(".")
        if any(p == "" for p in parts):
            raise ConfigError(key, "empty segment in the --set key path")
        node = doc
        for i, part in enumerate(parts):
            here = ".".join(parts[: i + 1])
            parent = ".".join(parts[:i]) or "the top level"
            last = i == len(parts) - 1
            if isinstance(node, dict):
                if last:
                    node[part] = value
                    break
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            elif isinstance(node, list):
                if not re.fullmatch(r"-?\d+", part):
                    raise ConfigError(
                        here, f"--set {key}: {parent} is a list; use an index, not {part!r}"
                    )
                idx = int(part)
                if not -len(node) <= idx < len(node):
                    raise ConfigError(
                        here,
                        f"--set {key}: index {idx} is out of range; {parent} has {len(node)} entries",
                    )
                if last:
                    node[idx] = value
                    break
                node = node[idx]
            else:
                raise ConfigError(
                    parent, f"--set {key}: {parent} is a {_type_name(node)}, not a mapping or list"
                )
    return doc


# -- validating -------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", type(None): "null"}.get(
        type(v), type(v).__name__
    )


def _raise_validation(
    e: ValidationError, model: type[BaseModel], prefix: str, data: Any, what: str
) -> None:
    """Turn the first pydantic error into a `ConfigError` at its key path, in plain words."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"] if p != "[key]"]  # "[key]": pydantic's marker for a bad key
    path = ".".join([prefix, *loc] if prefix else loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(model, err["loc"][:-1])
        name = loc[-1] if loc else ""
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            path, f"unknown key in {what}.{hint} Known keys: {', '.join(known) or 'none'}."
        )
    if kind == "missing":
        raise ConfigError(path, "missing required key")
    msg = err["msg"].removeprefix("Value error, ")
    exc = (err.get("ctx") or {}).get("error")
    if isinstance(exc, KeyValueError):  # a validator named the key inside the field
        path = f"{path}.{_short_key(exc.key)}"
        msg = exc.message
    if "input" in err and kind not in ("value_error", "assertion_error"):
        msg = f"{msg} (got {_type_name(err['input'])} {_short(err['input'])})"
    raise ConfigError(path, msg)


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40


def _short(v: Any) -> str:
    """A repr of ``v`` bounded in length and in work: never the whole of a large value."""
    r = _REPR.repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def check_options(
    adapter: type[PipelineAdapter], options: Any, path: str = "pipeline.options"
) -> Options:
    """``pipeline.options`` checked against ``adapter.Options`` (its allow-list).

    ``trust_remote_code`` and ``local_files_only`` are refused for every
    adapter, with the reason and what to do instead.
    """
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(path, f"expected a mapping, got {_type_name(options)} {_short(options)}")
    for key, why in _REFUSED_OPTIONS.items():
        if key in options:
            raise ConfigError(f"{path}.{key}", why)
    model = getattr(adapter, "Options", None) or Options
    return _section(model, options, path, f"options of the {adapter.name!r} pipeline")


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) model at ``loc``, for an unknown-key suggestion."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
    return list(getattr(current, "model_fields", {}) or {})


def _section(model: type[BaseModel], data: Any, path: str, what: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {_type_name(data)} {_short(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        _raise_validation(e, model, path, data, what)


def resolve_device(device: str, path: str = "pipeline.device") -> str:
    """Check a device string and resolve ``auto`` (cuda when available, else cpu)."""
    if not _DEVICE_RE.match(device):
        raise ConfigError(path, f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                path, f"{device!r} asked for, but CUDA is not available here; use auto or cpu"
            )
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise ConfigError(
                path, f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return device
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(path, "'mps' asked for, but MPS is not available here; use auto or cpu")
    return device


def zoo_model_names() -> list[str]:
    """Names of the zoo models (``decodekit.pipelines.zoo``)."""
    from decodekit.pipelines import zoo

    return [m["name"] for m in zoo.list_models()]


def resolve_model(model: str, base_dir: Path | None = None, path: str = "pipeline.model") -> str:
    """Resolve ``pipeline.model`` to a local folder: a zoo model, a folder, or a cached hub snapshot."""
    if not model.strip():
        raise ConfigError(
            path, "empty; give zoo:<name>, a local folder, or a hub id in the local cache"
        )
    if model.startswith("zoo:"):
        return _resolve_zoo(model[4:], path)
    given = Path(model).expanduser()
    candidates = [given]
    if base_dir is not None and not given.is_absolute():
        candidates.append(base_dir / given)
    for c in candidates:
        if c.exists():
            return str(c.resolve())
    looks_local = model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
    looked = " and ".join(repr(str(c)) for c in candidates)
    if looks_local or not _HUB_ID_RE.match(model):
        raise ConfigError(
            path,
            f"model folder {model!r} does not exist (looked at {looked}); give an existing folder",
        )
    cached = _hub_snapshot(model)
    if cached is not None:
        return cached
    raise ConfigError(
        path,
        f"{model!r} is not a local folder (looked at {looked}) and not a hub model in the local "
        "Hugging Face cache; decodekit never downloads. Download it first "
        f"(`hf download {model}`) or set pipeline.model to a local folder.",
    )


def _hub_snapshot(repo_id: str) -> str | None:
    """The cached snapshot folder of ``repo_id``, looked up in the local HF cache only (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for marker in _HUB_MARKERS:
        try:
            hit = try_to_load_from_cache(repo_id, marker)
        except Exception:  # an id the hub library rejects is simply not cached
            return None
        if isinstance(hit, str):
            return str(Path(hit).parent)
    return None


def _resolve_zoo(name: str, path: str) -> str:
    from decodekit.pipelines import zoo

    known = zoo_model_names()
    if name not in known:
        raise UnknownNameError(path, "zoo model", name, known)
    try:
        folder = Path(zoo.zoo_path(name))
    except DecodekitError as e:
        raise ConfigError(path, getattr(e, "message", str(e))) from None
    except (LookupError, ValueError, OSError) as e:
        raise ConfigError(path, f"zoo model {name!r}: {e}") from None
    if not folder.exists():
        raise ConfigError(
            path, f"zoo model {name!r} should be at {str(folder)!r}, which does not exist"
        )
    return str(folder)


def load_config(
    source: str | os.PathLike | dict[str, Any] | Any,
    overrides: list[str] | tuple[str, ...] = (),
    manager: PluginManager | None = None,
    *,
    trust_remote_code: bool = False,
) -> RunConfig:
    """Load, override and validate a run config from a YAML file or an already parsed document.

    ``trust_remote_code`` (the CLI's ``--trust-remote-code``) lets the adapter
    run Python files from the model folder; a config cannot ask for it.

    Raises:
        ConfigError: the first problem found; ``path`` is its key path
            (``UnknownNameError`` for an unknown strategy, pipeline or zoo name).
    """
    file: Path | None = None
    if isinstance(source, (str, os.PathLike)):
        file = Path(source)
        doc = read_yaml(file)
    else:  # an already parsed document
        doc = source
        check_size(doc)
    doc = apply_overrides(doc, list(overrides))
    if overrides:
        check_size(doc)
    if doc is None:
        raise ConfigError(
            "", "the config is empty; it needs at least 'pipeline' with 'type' and 'model'"
        )
    if not isinstance(doc, dict):
        raise ConfigError(
            "",
            f"the config must be a mapping of sections ({', '.join(TOP_LEVEL)}), got {_type_name(doc)}",
        )
    for key in doc:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), TOP_LEVEL, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                str(key), f"unknown top-level key.{hint} Known keys: {', '.join(TOP_LEVEL)}."
            )
    if "pipeline" not in doc:
        raise ConfigError(
            "pipeline", "missing required key; say which adapter (type) loads which model"
        )

    manager = manager or get_manager()  # loaded only once the document parsed
    pipeline = _section(PipelineConfig, doc["pipeline"], "pipeline", "pipeline")
    adapter = manager.pipeline(pipeline.type, "pipeline.type")
    if not _DEVICE_RE.match(pipeline.device):
        raise ConfigError(
            "pipeline.device",
            f"unknown device {pipeline.device!r}; use auto, cpu, cuda, cuda:N or mps",
        )

    options = check_options(adapter, pipeline.options)
    from .compiling import check_compile

    check_compile(adapter.name, pipeline.compile)
    strategies = _strategies(doc.get("strategies"), manager)
    inputs = _section(
        adapter.Inputs, doc.get("inputs"), "inputs", f"inputs of the {adapter.name!r} pipeline"
    )
    output = _section(OutputConfig, doc.get("output"), "output", "output")
    bench = _section(BenchConfig, doc.get("bench"), "bench", "bench")

    base_dir = file.parent if file is not None else None
    source_dir = resolve_model(pipeline.model, base_dir)
    device = resolve_device(pipeline.device)
    return RunConfig(
        pipeline=pipeline,
        strategies=strategies,
        inputs=inputs,
        output=output,
        bench=bench,
        adapter=adapter,
        source=source_dir,
        device=device,
        raw=doc,
        file=file,
        options=options,
        trust_remote_code=trust_remote_code,
    )


def _strategies(data: Any, manager: PluginManager) -> list[StrategyConfig]:
    from .session import build_strategies

    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(
            "strategies", f"expected a list of strategies, got {_type_name(data)} {_short(data)}"
        )
    entries = []
    for i, item in enumerate(data):
        where = f"strategies.{i}"
        if isinstance(item, str):
            item = {"name": item}
        if isinstance(item, dict) and item.get("params", {}) is None:
            item = {**item, "params": {}}
        entry = _section(StrategyConfig, item, where, "a strategy entry")
        for k in entry.params:
            if not isinstance(k, str):
                raise ConfigError(f"{where}.params.{k}", "parameter names must be strings")
        entries.append(entry)
    # Names and params are checked by the strategies' own models.
    build_strategies([{"name": e.name, "params": e.params} for e in entries], manager, "strategies")
    return entries


__all__ = [
    "RunConfig",
    "PipelineConfig",
    "StrategyConfig",
    "OutputConfig",
    "BenchConfig",
    "load_config",
    "check_options",
    "check_size",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_NODES",
    "apply_overrides",
    "read_yaml",
    "parse_yaml",
    "resolve_model",
    "resolve_device",
    "zoo_model_names",
]
