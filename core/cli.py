"""The ``decodekit`` command: run, validate and bench YAML configs; list plugins and the zoo; the demo.

Every decodekit error prints one line, ``error: <key path>: <message>``, on
stderr and exits with status 2. Any other exception from a command is reported
the same way, as ``error: <stage>: <ExceptionType>: <message>`` with the stage
it came from (reading config, loading model, generating ...). ``--debug`` (or
``DECODEKIT_DEBUG=1``) prints the traceback too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from .errors import ConfigError, DecodekitError

EXIT_USAGE = 2


def _add_set(p: argparse.ArgumentParser) -> None:
    """The options of the commands that read a config: ``--set``, ``--trust-remote-code``, ``--debug``."""
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="RISK: let the model loader execute Python files from the model folder "
        "(transformers/diffusers remote code). Only for folders you trust; a config cannot ask for it.",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the traceback behind an error",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="let transformers/diffusers logs, progress bars and warnings through",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value; KEY is a dotted path with list indices "
        "(strategies.0.params.key_steps=uniform-4), VALUE is parsed as YAML. Repeatable.",
    )


def _add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch CPU threads (default: pipeline.threads, else 1 on a CPU)."""
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: pipeline.threads of the config, else 1 on a CPU "
        "and torch's default on a GPU)",
    )


def _add_progress(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--no-progress``: the bar on stderr (default: only on a terminal)."""
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show the progress bar on stderr (default: only when stderr is a terminal)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``decodekit`` command."""
    parser = argparse.ArgumentParser(
        prog="decodekit",
        description="Composable decoding strategies for diffusion and multimodal models.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    parser.add_argument("--debug", action="store_true", help="print the traceback behind an error")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="let transformers/diffusers logs, progress bars and warnings through",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run", help="generate with the strategies of a YAML config and save the outputs"
    )
    p.add_argument("config", help="YAML run config")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse a non-empty output folder: remove the files its previous run recorded in run.json",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="prompts per pipeline call, with a progress bar over prompts (default: "
        "inputs.batch_size where the pipeline has it, else all prompts in one call)",
    )
    _add_threads(p)
    _add_progress(p)
    _add_set(p)

    p = sub.add_parser(
        "validate", help="check a YAML config (names, params, inputs, composition) and print ok"
    )
    p.add_argument("config")
    _add_set(p)

    p = sub.add_parser("bench", help="measure strategies against the baseline, side by side")
    p.add_argument("config")
    p.add_argument(
        "--repeat", type=int, help="baseline/strategy pairs (default: bench.repeat of the config)"
    )
    p.add_argument(
        "--json",
        dest="json_path",
        help="write the result as JSON here (default: OUTPUT_DIR/bench.json)",
    )
    p.add_argument(
        "--png", dest="png_path", help="write a picture here (default: OUTPUT_DIR/bench.png)"
    )
    p.add_argument(
        "--overhead",
        action="store_true",
        help="also measure decodekit's own cost (hook dispatch per model call, attach + detach)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="bench every value of a strategy param against one baseline (a Pareto bench: "
        "speed-up against fidelity); KEY is a --set path under strategies. Repeatable: "
        "every combination. Writes OUTPUT_DIR/sweep.json, .md and .png unless --json/--png say.",
    )
    _add_threads(p)
    _add_progress(p)
    _add_set(p)

    p = sub.add_parser("plugins", help="list installed strategies, pipelines and quality metrics")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("demo", help="bench the embedded zoo configs (no download)")
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--repeat", type=int, help="baseline/strategy pairs per config")
    _add_threads(p)
    _add_progress(p)

    p = sub.add_parser("zoo", help="the reference zoo of tiny models")
    zoo_sub = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    zoo_sub.add_parser("list", help="list the zoo models")
    zp = zoo_sub.add_parser("path", help="print the folder of a zoo model")
    zp.add_argument("name", help="a zoo model name (decodekit zoo list)")

    sub.add_parser(
        "schema", help="print the JSON Schema of the YAML config (for editors), with the plugins"
    )

    p = sub.add_parser(
        "ngram", help="n-gram models for superposed decoding (ngram build ...)", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "convert-llada",
        help="write a LLaDA checkpoint as a transformers Llama that dkv-cache can hook",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "convert-llamagen",
        help="write LlamaGen's class-conditional GPT and VQ tokenizer as an ar-image folder",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "convert-var",
        help="write VAR's released VQ-VAE (and transformer) checkpoints as a var folder",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "train-predictor",
        help="train dynamic-llava's token predictors on a frozen VLM (shapes-vqa data)",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser(
        "convert-mar",
        help="write MAR's released checkpoints (and its KL-16 VAE) as a mar folder",
        add_help=False,
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``decodekit``; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not hasattr(args, "rest"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:  # commands that parse their own arguments get them all, --help included
        args.rest = unknown + args.rest
    handler = {
        "run": cmd_run,
        "validate": cmd_validate,
        "bench": cmd_bench,
        "plugins": cmd_plugins,
        "demo": cmd_demo,
        "zoo": cmd_zoo,
        "schema": cmd_schema,
        "ngram": cmd_ngram,
        "convert-llada": cmd_convert_llada,
        "convert-llamagen": cmd_convert_llamagen,
        "convert-var": cmd_convert_var,
        "convert-mar": cmd_convert_mar,
        "train-predictor": cmd_train_predictor,
    }[args.command]
    debug = getattr(args, "debug", False) or bool(os.environ.get("DECODEKIT_DEBUG"))
    verbose = getattr(args, "verbose", False) or bool(os.environ.get("DECODEKIT_VERBOSE"))
    try:
        if args.command not in _LOADING_COMMANDS:
            status = handler(args) or 0
            sys.stdout.flush()  # a closed pipe shows here, inside the try
            return status
        from .runtime import kept_threads, quiet_libraries

        with quiet_libraries(not verbose), kept_threads():
            return handler(args) or 0
    except BrokenPipeError:  # `decodekit plugins --json | head`: the reader left, end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail
        return 1
    except DecodekitError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else still ends as one line, never a bare traceback
        if debug:
            traceback.print_exc()
        print(f"error: {stage_of(e, args.command)}: {_bounded(e)}", file=sys.stderr)
        return EXIT_USAGE


# The commands that load models: library logs, bars and warnings stay quiet unless --verbose.
_LOADING_COMMANDS = ("run", "bench", "demo")

# The call a command was making when an exception left it, by function name.
_STAGES = {
    "load_config": "reading config",
    "read_yaml": "reading config",
    "get_manager": "loading plugins",
    "resolve_strategies": "checking strategies",
    "build_strategies": "checking strategies",
    "prepare_output_dir": "preparing the output folder",
    "prepare": "preparing the output folder",
    "finish": "saving",
    "load_pipeline": "loading model",
    "load": "loading model",
    "attach": "attaching",
    "__enter__": "attaching",
    "__exit__": "detaching",
    "generate": "generating",
    "save": "saving",
    "bench": "benchmarking",
    "run_demo": "benchmarking",
}


def stage_of(e: BaseException, command: str) -> str:
    """The stage an exception came from: what the ``cmd_*`` function was calling when it rose."""
    frames = [f for f, _ in traceback.walk_tb(e.__traceback__)]
    for i, frame in enumerate(frames):
        code = frame.f_code
        if code.co_name.startswith("cmd_") and code.co_filename == __file__:
            if i + 1 < len(frames):
                name = frames[i + 1].f_code.co_name
                return _STAGES.get(name, name.strip("_").replace("_", " "))
            return command
    return command


def _bounded(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters of message."""
    try:
        text = str(e)
    except Exception:  # a broken __str__ must not hide the error
        text = "(message unavailable)"
    text = " ".join(text[: limit * 4].split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def cmd_ngram(args: argparse.Namespace) -> int:
    """``decodekit ngram build ...``, handled by the superposed strategy's n-gram module."""
    from .plugins.ngram import ngram_cli

    return ngram_cli(args.rest)


def cmd_convert_llada(args: argparse.Namespace) -> int:
    """``decodekit convert-llada SRC DST``: LLaDA's checkpoint as a bidirectional Llama."""
    from .pipelines.convert_llada import convert_cli

    return convert_cli(args.rest)


def cmd_convert_llamagen(args: argparse.Namespace) -> int:
    """``decodekit convert-llamagen SRC_GPT SRC_VQ DST``: LlamaGen c2i as an ar-image folder."""
    from .pipelines.convert_llamagen import convert_cli

    return convert_cli(args.rest)


def cmd_convert_var(args: argparse.Namespace) -> int:
    """``decodekit convert-var [--vae PTH] [--var PTH] --out DIR``: VAR as a var folder."""
    from .pipelines.convert_var import convert_var_cli

    return convert_var_cli(args.rest)


def cmd_convert_mar(args: argparse.Namespace) -> int:
    """``decodekit convert-mar [--mar PTH] [--vae CKPT] --out DIR``: MAR as a mar folder."""
    from .pipelines.convert_mar import convert_mar_cli

    return convert_mar_cli(args.rest)


def cmd_train_predictor(args: argparse.Namespace) -> int:
    """``decodekit train-predictor MODEL [--out DIR] ...``: dynamic-llava's predictors."""
    from .predictor_training import train_predictor_cli

    return train_predictor_cli(args.rest)


def one_line(e: DecodekitError) -> str:
    """``<path>: <message>`` for a config error, the message otherwise, on one line.

    The key path is shown with its non-printable characters escaped (a key
    ``"\r"`` stays visible) and bounded; the message's whitespace is collapsed.
    """
    message = " ".join(str(e.message if isinstance(e, ConfigError) else e).split())
    if isinstance(e, ConfigError) and e.path:
        path = "".join(c if c.isprintable() else repr(c)[1:-1] for c in e.path)
        if len(path) > 200:
            path = path[:197] + "..."
        return f"{path}: {message}"
    return message


# -- run / validate / bench ---------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Load the config, attach the strategies, generate, save the outputs, print a summary.

    The output folder is checked (created, writable, empty unless ``--overwrite``)
    before the model loads; every file is written atomically, and ``run.json``
    records the config, versions, stats, timings and the files written.
    """
    import time
    from dataclasses import replace

    from .config import load_config
    from .distributed import Job, check_placement, world_for
    from .manager import get_manager
    from .runtime import configure_threads
    from .session import attach

    manager = get_manager()
    for line in manager.failed_report():  # first: a failed plugin may explain a config error
        print(f"warning: plugin {line}", file=sys.stderr)
    cfg = load_config(args.config, args.overrides, trust_remote_code=args.trust_remote_code)
    cfg.resolve_strategies(manager)
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None and batch_size < 1:
        raise ConfigError("--batch-size", f"must be at least 1, got {batch_size}")
    world = world_for(cfg.device)  # one process, or one of those accelerate/torchrun started
    cfg = replace(cfg, device=world.device(cfg.device))
    threads = configure_threads(cfg, getattr(args, "threads", None))
    out_dir = Path(cfg.output.dir)
    job = Job(
        cfg,
        world,
        overwrite=getattr(args, "overwrite", False),
        batch_size=batch_size,
        progress=getattr(args, "progress", None),
        label=Path(args.config).name,
    )
    job.prepare()  # before the model loads: the folder is checked, or the run resumes
    if job.finished:
        return 0
    run, load_s = None, 0.0
    try:
        t0 = time.perf_counter()
        target = cfg.load_pipeline()
        load_s = time.perf_counter() - t0
        check_placement(target, cfg.build_strategies(manager))  # device_map: one device each?
        with attach(
            target, cfg.strategy_specs(), pipeline=cfg.adapter.name, manager=manager
        ) as run:
            job.generate(target, run)
    except BaseException:
        job.interrupted(run, load_s)
        raise
    record = job.finish(run, load_s)
    if record is None:
        return 0  # not rank 0: rank 0 prints the whole run's figures
    stats = record["stats"]
    names = ", ".join(s.name for s in run.strategies) or "none (baseline)"
    shown_threads = f"{threads} torch thread{'s' if threads != 1 else ''}"
    if world.size > 1:
        shown_threads += f" per process, {world.size} processes"
    print(f"{cfg.adapter.name} on {cfg.device} ({shown_threads}), strategies: {names}")
    print(
        f"  model calls: {stats['nfe']}  served by strategies: {stats['served']}  time: {stats['time_s']:.3f} s"
    )
    several = stats.get("calls", 1) > 1
    last = f" (last call of {stats['calls']})" if several else ""
    for name, figures in stats["strategies"].items():
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
        print(f"  {name}{last}: {shown}")
        totals = (stats.get("totals") or {}).get(name)
        if several and totals:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in totals.items())
            print(f"  {name} (all {stats['calls']} calls): {shown}")
    ideal = run.ideal_speedup()
    if ideal is not None:
        print(f"  FLOP-ideal speed-up: x{ideal:.2f}")
    print(f"  wrote {len(record['files'])} file(s) and run.json to {out_dir}")
    return 0


def _versions() -> dict[str, str | None]:
    """Installed versions of decodekit and the libraries that shape its outputs."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("decodekit", "torch", "diffusers", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate names, params, inputs, model source and strategy composition; print ok."""
    from .config import load_config
    from .manager import get_manager

    manager = get_manager()
    for line in manager.failed_report():  # first: a failed plugin may explain a config error
        print(f"warning: plugin {line}", file=sys.stderr)
    cfg = load_config(args.config, args.overrides, trust_remote_code=args.trust_remote_code)
    ordered = cfg.resolve_strategies(manager)
    names = " -> ".join(s.name for s in ordered) or "no strategies"
    print(f"ok: {cfg.adapter.name} ({cfg.adapter.loop}) on {cfg.device}, {names}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Bench the config's strategies against the baseline and write JSON and PNG."""
    from dataclasses import replace

    from .bench import bench
    from .config import load_config
    from .distributed import bench_across, world_for
    from .manager import get_manager
    from .runtime import configure_threads

    cfg = load_config(args.config, args.overrides, trust_remote_code=args.trust_remote_code)
    manager = get_manager()
    if args.repeat is not None and args.repeat < 1:
        raise ConfigError("--repeat", f"must be at least 1, got {args.repeat}")
    if getattr(args, "sweep", None):
        return cmd_sweep(args, cfg, manager)
    world = world_for(cfg.device)  # one process, or one of those accelerate/torchrun started
    cfg = replace(cfg, device=world.device(cfg.device))
    configure_threads(cfg, getattr(args, "threads", None))
    out_dir = Path(cfg.output.dir)
    json_path = args.json_path or out_dir / "bench.json"
    png_path = args.png_path or out_dir / "bench.png"
    progress = getattr(args, "progress", None)
    kw = dict(
        repeat=args.repeat,
        manager=manager,
        overhead=args.overhead,
        progress=False if progress is None and not world.is_main else progress,
        label=Path(args.config).name,
    )
    if world.size > 1:  # each process benches its shard of the prompts; rank 0 joins them
        r = bench_across(cfg, world, json_path, png_path, **kw)
        if r is None:
            return 0
        print(f"processes: {world.size} (each one's figures under 'ranks' in the JSON)")
    else:
        r = bench(cfg, json_path=json_path, png_path=png_path, **kw)
    print(format_bench(r))
    if "overhead" in r:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in r["overhead"].items())
        print(f"decodekit overhead: {shown}")
    print(f"wrote {json_path} and {png_path}")
    return 0


def cmd_sweep(args: argparse.Namespace, cfg: Any, manager: Any) -> int:
    """``bench --sweep``: every sweep point against one baseline; JSON, markdown table and PNG."""
    from .runtime import configure_threads
    from .sweep import sweep_bench, sweep_table

    if args.overhead:
        raise ConfigError("--overhead", "cannot be combined with --sweep; bench one point for it")
    configure_threads(cfg, getattr(args, "threads", None))
    out_dir = Path(cfg.output.dir)
    json_path = Path(args.json_path or out_dir / "sweep.json")
    png_path = args.png_path or out_dir / "sweep.png"
    r = sweep_bench(
        cfg,
        args.sweep,
        repeat=args.repeat,
        manager=manager,
        json_path=json_path,
        png_path=png_path,
        markdown_path=json_path.with_suffix(".md"),
        progress=getattr(args, "progress", None),
        label=Path(args.config).name,
    )
    print(sweep_table(r), end="")
    print(f"wrote {json_path}, {json_path.with_suffix('.md')} and {png_path}")
    return 0


def format_bench(r: dict[str, Any]) -> str:
    """A short text summary of a bench result."""
    names = ", ".join(s["name"] for s in r["strategies"]) or "none"
    b, s = r["baseline"], r["strategy"]
    mem = r["peak_memory"]
    lines = [
        f"strategies: {names}   device: {r['machine']['device']}   "
        f"torch threads: {r['machine'].get('torch_threads', '-')}   pairs: {r['repeat']}",
        f"{'':12}{'baseline':>14}{'strategy':>14}",
        f"{'time (med)':12}{b['time_s']['median']:>13.4f}s{s['time_s']['median']:>13.4f}s",
        f"{'model calls':12}{b['nfe']:>14}{s['nfe']:>14}",
        f"{'peak mem':12}{_mib(mem['baseline']):>14}{_mib(mem['strategy']):>14}   ({mem['kind']})",
        f"speed-up: x{r['speedup']:.3f} (median of per-pair ratios)"
        + (f"   FLOP-ideal: x{r['ideal_speedup']:.3f}" if r["ideal_speedup"] else ""),
    ]
    phases = (r.get("pipeline") or {}).get("baseline") or {}
    if "prefill_s" in phases:  # the vlm adapter's split of the time, and the cache held
        pb, ps = r["pipeline"]["baseline"], r["pipeline"]["strategy"]
        lines.insert(4, f"{'prefill':12}{pb['prefill_s']:>13.4f}s{ps['prefill_s']:>13.4f}s")
        lines.insert(5, f"{'decode':12}{pb['decode_s']:>13.4f}s{ps['decode_s']:>13.4f}s")
        if pb.get("kv_cache_bytes"):
            kv_b, kv_s = _mib(pb["kv_cache_bytes"]), _mib(ps["kv_cache_bytes"])
            lines.insert(6, f"{'K/V cache':12}{kv_b:>14}{kv_s:>14}   (held at the end)")
    if r.get("speedup_spread"):
        from .figures import spread_text

        pairs = " ".join(f"x{v:.3f}" for v in r["pair_ratios"])
        lines.append(f"per pair: {pairs}; {spread_text(r['speedup_spread'])}")
    for source, figures in r["quality"].items():
        if figures:
            lines.append(
                f"quality ({source}): " + ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
            )
    return "\n".join(lines)


def _mib(v: int | None) -> str:
    return "-" if v is None else f"{v / 2**20:.1f} MiB"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- plugins ---------------------------------------------------------------------------


def _fields(model: Any) -> list[dict[str, Any]]:
    """Name, type, default and description of each field of a pydantic model."""
    from pydantic_core import PydanticUndefined

    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        type_name = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
        if f.default_factory is not None:
            default, required = f.default_factory(), False
        elif f.default is PydanticUndefined:
            default, required = None, True
        else:
            default, required = f.default, False
        out.append(
            {
                "name": name,
                "type": type_name,
                "default": default,
                "required": required,
                "description": f.description or "",
            }
        )
    return out


def _origin(manager: Any, kind: str, name: str) -> dict[str, str]:
    try:
        info = manager.origin(kind, name)
    except KeyError:
        return {"package": "?", "version": "?", "plugin": "?"}
    return {"package": info.package, "version": info.version, "plugin": info.plugin}


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def plugins_info(manager: Any = None) -> dict[str, Any]:
    """Everything ``decodekit plugins`` shows, as JSON-ready data."""
    from .bench import jsonable
    from .manager import get_manager
    from .strategy import strategy_hooks

    manager = manager or get_manager()
    reg = manager.registry
    strategies = []
    for name, cls in sorted(reg.strategies.items()):
        strategies.append(
            {
                "name": name,
                **_origin(manager, "strategies", name),
                "summary": _first_line(cls.__doc__),
                "paper": cls.paper,
                "loops": list(cls.loops),
                "slot": cls.slot,
                "requires": list(cls.requires),
                "conflicts": list(cls.conflicts),
                "before": list(cls.before),
                "after": list(cls.after),
                "params": _fields(cls.Params),
                "hooks": strategy_hooks(cls),
            }
        )
    pipelines = []
    for name, cls in sorted(reg.pipelines.items()):
        pipelines.append(
            {
                "name": name,
                **_origin(manager, "pipelines", name),
                "loop": cls.loop,
                "description": cls.description or _first_line(cls.__doc__),
                "inputs": _fields(cls.Inputs),
            }
        )
    metrics = [{"name": n, **_origin(manager, "metrics", n)} for n in sorted(reg.metrics)]
    failed = [{"name": n, "error": err} for n, err in sorted(reg.failed.items())]
    return jsonable(
        {"strategies": strategies, "pipelines": pipelines, "metrics": metrics, "failed": failed}
    )


def cmd_plugins(args: argparse.Namespace) -> int:
    """Print installed strategies, pipelines, metrics and failed plugins."""
    info = plugins_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"strategies ({len(info['strategies'])}):")
    for s in info["strategies"]:
        print(f"  {s['name']}  [{s['package']} {s['version']}]  {s['summary']}")
        print(f"    loops: {', '.join(s['loops']) or '-'}   slot: {s['slot'] or '-'}")
        if s["requires"] or s["conflicts"]:
            print(
                f"    requires: {', '.join(s['requires']) or '-'}   conflicts: {', '.join(s['conflicts']) or '-'}"
            )
        if s["paper"]:
            print(f"    paper: {s['paper']}")
        for p in s["params"]:
            default = "(required)" if p["required"] else f"= {p['default']!r}"
            desc = f"  {p['description']}" if p["description"] else ""
            print(f"    {p['name']}: {p['type']} {default}{desc}")
        print(f"    hooks: {', '.join(s['hooks']) or '-'}")
    print(f"pipelines ({len(info['pipelines'])}):")
    for p in info["pipelines"]:
        print(
            f"  {p['name']}  [{p['package']} {p['version']}]  loop: {p['loop']}  {p['description']}"
        )
    if info["metrics"]:
        print(f"quality metrics ({len(info['metrics'])}):")
        for m in info["metrics"]:
            print(f"  {m['name']}  [{m['package']} {m['version']}]")
    if info["failed"]:
        print(f"failed ({len(info['failed'])}):")
        for f in info["failed"]:
            print(f"  {f['name']}: {f['error']}")
    return 0


# -- demo / zoo -------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Bench the embedded zoo configs and write PNGs and a markdown table."""
    from .demo import markdown_table, run_demo

    if args.repeat is not None and args.repeat < 1:
        raise ConfigError("--repeat", f"must be at least 1, got {args.repeat}")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ConfigError("--threads", f"must be at least 1, got {threads}")
    results = run_demo(
        args.out, repeat=args.repeat, threads=threads, progress=getattr(args, "progress", None)
    )
    print(markdown_table(results), end="")
    print(f"wrote {Path(args.out) / 'README.md'} and one JSON and PNG per config")
    return 0


def zoo_rows() -> list[dict[str, Any]]:
    """The zoo models as dicts, name first (``decodekit.pipelines.zoo.list_models``)."""
    from decodekit.pipelines import zoo

    return [dict(m) for m in zoo.list_models()]


def cmd_zoo(args: argparse.Namespace) -> int:
    """``decodekit zoo list``: a table of the zoo models; ``zoo path NAME``: its folder."""
    if args.zoo_command == "path":
        from .config import _resolve_zoo

        print(_resolve_zoo(args.name, "NAME"))
        return 0
    rows = zoo_rows()
    if not rows:
        print("the zoo is empty")
        return 0
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    if "description" in cols:  # the long column goes last
        cols = [c for c in cols if c != "description"] + ["description"]
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    if isinstance(v, dict):
        return ", ".join(f"{k}={w}" for k, w in v.items()) or "-"
    return " ".join(str(v).split())


def cmd_schema(args: argparse.Namespace) -> int:
    """``decodekit schema``: the JSON Schema of the YAML config, with the installed plugins."""
    from .schema import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def _package_version() -> str:
    """decodekit's installed version, else the source tree's ``__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("decodekit")
    except PackageNotFoundError:
        from . import __version__

        return __version__


if __name__ == "__main__":
    sys.exit(main())
