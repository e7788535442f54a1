"""A Pareto bench: every point of a strategy-param sweep against one baseline, in one run.

``decodekit bench CONFIG --sweep strategies.0.params.X=a,b,c`` (repeatable: the
points are every combination) loads the pipeline once, and in each pair runs the
baseline once and every point once, in an order that rotates from pair to pair.
Each point gets the median of its per-pair ratios to that pair's baseline time,
its spread, its model calls and its quality against the baseline; its
*fidelity* is the judge's Fréchet distance to the baseline where the config's
outputs have a judge (lower is better), else the PSNR to the baseline for images,
else the token agreement for text (higher is better). A point is *dominated*
when another is at least as fast and at least as faithful, and better in one.

`pareto_bench` is the same bench over any list of `Arm` s: decodekit strategy
sets that no single sweep spans (deep-cache intervals beside faster-diffusion
schedules), and *external* arms, code outside decodekit (another package's cache
applied through its own API) that the bench applies before each of its runs and
removes after, so peers are timed and judged against the same baseline in the
same rotation. An external arm that cannot run on the pipeline raises
`ArmUnavailable`; the bench leaves it out and records why. Every baseline run's
outputs are compared with the first one's: an arm whose removal leaves the
pipeline changed shows as ``baseline.repeatable: false``.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bench import PeakMemory, _quality, _run_arm, _sync, machine_info, write_json
from .config import RunConfig, load_config
from .demo import _fmt
from .errors import ConfigError, DecodekitError
from .figures import speedup_spread
from .manager import PluginManager, get_manager
from .outputs import atomic_save_image, atomic_write_text
from .progress import Bar, Eta, bench_label

# (key in the quality figures, what it is called, whether higher is better), in order of preference
FIDELITY = [
    ("judge_frechet_to_baseline", "judge Fréchet to the baseline", False),
    ("psnr", "PSNR to the baseline (dB)", True),
    ("token_agreement", "token agreement with the baseline", True),
]


class ArmUnavailable(DecodekitError):
    """An external arm's code cannot run on this pipeline (package missing, pipeline refused)."""


@dataclass
class Arm:
    """One point of a Pareto bench.

    A decodekit arm gives ``strategies`` (specs as in a config's ``strategies``);
    an external arm gives ``apply(target)``, which changes the loaded pipeline in
    place and returns a function that undoes the change (the bench calls both
    around every run of the arm and times only the pipeline call between). The
    undo function may return a dict of figures about the run (``nfe``: denoiser
    calls run in full), kept as the run's stats. ``by`` names who runs the point
    (``decodekit``, or the package), shown in the table and chart.
    """

    label: str
    strategies: list[dict[str, Any]] = field(default_factory=list)
    apply: Callable[[Any], Callable[[], Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    by: str = "decodekit"

    @property
    def external(self) -> bool:
        return self.apply is not None


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``strategies.0.params.X=a,b,c`` → ``("strategies.0.params.X", [a, b, c])`` (values as YAML).

    Only strategy paths can be swept: the baseline (pipeline, inputs) is the same
    for every point.
    """
    import yaml

    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ConfigError("--sweep", f"expected KEY=V1,V2,... got {text!r}")
    if not key.startswith("strategies."):
        raise ConfigError(
            "--sweep",
            f"{key!r}: only strategy paths can be swept (strategies.N.params.NAME); the "
            "baseline must stay the same for every point. Use --set for other keys.",
        )
    parsed = []
    for v in values.split(","):
        try:
            parsed.append(yaml.safe_load(v.strip()))
        except yaml.YAMLError as e:
            raise ConfigError("--sweep", f"{key}: cannot read value {v!r}: {e}") from None
    return key, parsed


def sweep_points(sweeps: list[str]) -> list[dict[str, Any]]:
    """Every combination of the sweeps' values, as ``{path: value}`` (first sweep varies slowest)."""
    parsed = [parse_sweep(s) for s in sweeps]
    keys = [k for k, _ in parsed]
    if len(set(keys)) != len(keys):
        raise ConfigError("--sweep", "the same key is swept twice; give its values once")
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in parsed))]


def point_label(point: dict[str, Any]) -> str:
    """``key_steps=paper, prior_noise=0.003`` (the last part of each path)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items())


def fidelity(quality: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The point's fidelity figure from its quality figures: ``key``, ``name``, ``value``,
    ``higher_is_better``; None when it has none of them."""
    for key, name, higher in FIDELITY:
        for figures in quality.values():
            if key in figures and figures[key] is not None:
                return {"key": key, "name": name, "value": figures[key], "higher_is_better": higher}
    return None


def mark_dominated(points: list[dict[str, Any]]) -> None:
    """Set ``dominated`` on each point (``speedup`` and ``fidelity.value``; see the module doc).

    Points without a fidelity figure are compared on speed alone.
    """

    def score(p: dict[str, Any]) -> tuple[float, float]:
        f = p.get("fidelity")
        if f is None or not isinstance(f["value"], (int, float)) or math.isnan(f["value"]):
            return p["speedup"], 0.0
        return p["speedup"], f["value"] if f["higher_is_better"] else -f["value"]

    for p in points:
        s = score(p)
        p["dominated"] = any(
            q is not p and score(q)[0] >= s[0] and score(q)[1] >= s[1] and score(q) != s
            for q in points
        )


def sweep_bench(
    config: RunConfig,
    sweeps: list[str],
    repeat: int | None = None,
    manager: PluginManager | None = None,
    *,
    external: Sequence[Arm] = (),
    json_path: str | os.PathLike | None = None,
    png_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Bench every sweep point of ``config`` against one baseline; optionally write JSON, markdown, PNG.

    ``external``: arms run beside the sweep's points (`Arm`, `pareto_bench`).
    Returns `pareto_bench`'s dict with ``sweeps`` added; each point's ``params``
    are the swept paths and values.
    """
    points = sweep_points(sweeps)
    arms = [Arm(point_label(p), [], params=p) for p in points]
    if len({a.label for a in arms}) < len(arms):  # labels that only the full paths tell apart
        for i, a in enumerate(arms):
            a.label = f"point {i + 1}"
    manager = manager or get_manager()
    for arm, point in zip(arms, points):  # every point is checked before the model loads
        overrides = [f"{k}={_yaml(v)}" for k, v in point.items()]
        cfg = load_config(
            config.raw, overrides, manager, trust_remote_code=config.trust_remote_code
        )
        cfg.resolve_strategies(manager)
        arm.strategies = cfg.strategy_specs()
    return pareto_bench(
        config,
        arms + list(external),
        repeat,
        manager,
        what="sweep of " + "; ".join(sweeps),
        extra={"sweeps": list(sweeps)},
        json_path=json_path,
        png_path=png_path,
        markdown_path=markdown_path,
        clock=clock,
        progress=progress,
        label=label,
    )


def pareto_bench(
    config: RunConfig,
    arms: Sequence[Arm],
    repeat: int | None = None,
    manager: PluginManager | None = None,
    *,
    what: str | None = None,
    extra: dict[str, Any] | None = None,
    json_path: str | os.PathLike | None = None,
    png_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool | None = None,
    label: str | None = None,
) -> dict[str, Any]:
    """Bench every arm against one baseline of ``config`` in rotating pairs (see the module doc).

    ``config``'s own strategies are not run; its pipeline and inputs are the
    baseline. ``what`` says what the points are (table and chart titles);
    ``extra`` is merged into the result.

    Returns a dict with ``points`` (each: ``label``, ``by``, ``params``,
    ``strategies``, ``speedup``, ``pair_ratios``, ``speedup_spread``, ``nfe``,
    ``quality``, ``fidelity``, ``dominated``), ``unavailable`` (external arms left
    out: ``label``, ``by``, ``reason``), ``baseline`` (times, model calls,
    ``repeatable``), ``what``, ``repeat``, ``warmup``, ``label``, ``config`` and
    ``machine``.
    """
    manager = manager or get_manager()
    repeat = config.bench.repeat if repeat is None else repeat
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    if len({a.label for a in arms}) < len(arms) or "baseline" in {a.label for a in arms}:
        raise ValueError("every arm needs its own label, and none may be 'baseline'")
    for arm in arms:  # composition errors before the model loads
        if not arm.external:
            check = load_config(
                {**config.raw, "strategies": arm.strategies},
                manager=manager,
                trust_remote_code=config.trust_remote_code,
            )
            check.resolve_strategies(manager)
    label = label or (config.file.name if config.file else str(config.pipeline.model))
    target = config.load_pipeline()
    by_label = {a.label: a for a in arms}

    def run(name: str) -> dict[str, Any]:
        arm = by_label.get(name)
        if arm is not None and arm.external:
            return _run_external(config, target, arm.apply, clock)
        return _run_arm(config, target, arm.strategies if arm else [], manager, clock)

    # With external arms, the baseline's outputs before any of them touched the pipeline:
    # every later baseline run must equal them, or an arm's undo left something behind.
    reference = run("baseline")["outputs"] if any(a.external for a in arms) else None
    unavailable = []
    for arm in [a for a in arms if a.external]:  # refusals at apply time leave the arm out
        try:
            arm.apply(target)()
        except ArmUnavailable as e:
            unavailable.append({"label": arm.label, "by": arm.by, "reason": str(e)})
            del by_label[arm.label]
    names = ["baseline"] + list(by_label)
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in names}
    warmup = config.bench.warmup
    eta = Eta({a: repeat for a in names})
    with Bar(len(names) * (warmup + repeat), progress) as bar:
        for i in range(warmup):
            for name in names:
                bar.show(bench_label(label, name, i + 1, warmup, warmup=True))
                run(name)
                bar.advance()
        for i in range(repeat):
            order = names[i % len(names) :] + names[: i % len(names)]  # rotate: no arm always first
            for name in order:
                bar.show(bench_label(label, name, i + 1, repeat))
                runs[name].append(run(name))
                eta.record(name, runs[name][-1]["time_s"])
                bar.advance(eta=eta.seconds())
    base_times = [r["time_s"] for r in runs["baseline"]]
    base_out = runs["baseline"][0]["outputs"]
    reference = base_out if reference is None else reference
    results = []
    for name, arm in by_label.items():
        times = [r["time_s"] for r in runs[name]]
        ratios = [b / s if s > 0 else float("inf") for b, s in zip(base_times, times)]
        quality = _quality(config, manager, base_out, runs[name][-1]["outputs"])
        results.append(
            {
                "label": name,
                "by": arm.by,
                "params": arm.params,
                "strategies": arm.strategies,
                "speedup": statistics.median(ratios),
                "pair_ratios": ratios,
                "speedup_spread": speedup_spread(ratios),
                "time_s": {"median": statistics.median(times), "all": times},
                "nfe": runs[name][-1]["stats"].get("nfe"),
                "ideal_speedup": runs[name][-1]["ideal"],
                "stats": runs[name][-1]["stats"] if arm.external else None,
                "quality": quality,
                "fidelity": fidelity(quality),
            }
        )
    mark_dominated(results)
    result = {
        "what": what or f"{len(results)} points",
        **(extra or {}),
        "points": results,
        "unavailable": unavailable,
        "baseline": {
            "time_s": {"median": statistics.median(base_times), "all": base_times},
            "nfe": runs["baseline"][-1]["stats"]["nfe"],
            "repeatable": all(_identical(reference, r["outputs"]) for r in runs["baseline"]),
        },
        "repeat": repeat,
        "warmup": warmup,
        "label": label,
        "config": config.summary(),
        "machine": machine_info(config.device),
    }
    if markdown_path is not None:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(markdown_path), sweep_table(result))
    if png_path is not None:
        pareto_chart(result, png_path)
        result["picture"] = {"path": str(png_path), "kind": "pareto"}
    if json_path is not None:
        write_json(result, json_path)
    return result


def _run_external(
    config: RunConfig, target: Any, apply: Callable[[Any], Callable[[], Any]], clock
) -> dict[str, Any]:
    """One timed call of ``target`` with an external arm applied (and removed after), measured
    as decodekit's arms are (`decodekit.bench.PeakMemory` around the timed call)."""
    undo = apply(target)
    stats: Any = None
    try:
        with PeakMemory(config.device) as mem:
            _sync(config.device)
            t0 = clock()
            outputs = config.adapter.generate(target, config.inputs)
            _sync(config.device)
            dt = clock() - t0
    finally:
        stats = undo()
    return {
        "time_s": dt,
        "outputs": outputs,
        "stats": dict(stats or {}),
        "ideal": None,
        "peak": mem.peak,
    }


def _identical(a: Any, b: Any) -> bool:
    """Whether two pipeline outputs are equal exactly (images, tensors, nested lists, text)."""
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_identical, a, b))
    if hasattr(a, "__array__") or hasattr(a, "numpy"):
        import numpy as np

        x = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
        y = b.detach().cpu().numpy() if hasattr(b, "detach") else np.asarray(b)
        return x.shape == y.shape and bool(np.array_equal(x, y))
    return a == b


def _yaml(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def sweep_table(result: dict[str, Any]) -> str:
    """A markdown table of the points, dominated ones marked; with points run by other packages,
    a column says who ran each, and arms left out are listed below with why."""
    fid = next((p["fidelity"]["name"] for p in result["points"] if p["fidelity"]), "fidelity")
    peers = any(p.get("by", "decodekit") != "decodekit" for p in result["points"])
    lines = [
        f"{_what(result)[0].upper()}{_what(result)[1:]} on `{result['label']}`: "
        f"{result['repeat']} pairs, baseline {_fmt(result['baseline']['time_s']['median'])} s "
        f"and {result['baseline']['nfe']} model calls (median), "
        f"{result['machine']['device']} with {result['machine'].get('torch_threads', '–')} torch thread(s).",
        "",
        f"| point | speed-up (median of pairs) | spread over pairs | model calls | {fid} | Pareto |"
        + (" run by |" if peers else ""),
        "|---|---|---|---|---|---|" + ("---|" if peers else ""),
    ]
    for p in result["points"]:
        s = p["speedup_spread"]
        spread = f"×{_fmt(s['low'])}–×{_fmt(s['high'])} ({s['coverage']:.0%})"
        value = _fmt(p["fidelity"]["value"]) if p["fidelity"] else "–"
        mark = "dominated" if p["dominated"] else "**front**"
        nfe = "–" if p["nfe"] is None else p["nfe"]
        lines.append(
            f"| {p['label']} | ×{_fmt(p['speedup'])} | {spread} | {nfe} | {value} | {mark} |"
            + (f" {p.get('by', 'decodekit')} |" if peers else "")
        )
    for u in result.get("unavailable", []):
        lines.append(f"\nNot run: {u['label']} ({u['by']}): {u['reason']}")
    if result["baseline"].get("repeatable") is False:
        lines.append(
            "\n**The baseline's outputs changed between pairs: an arm left the pipeline changed.**"
        )
    return "\n".join(lines) + "\n"


def _what(result: dict[str, Any]) -> str:
    return result.get("what") or "sweep of " + "; ".join(result.get("sweeps", []))


def pareto_chart(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Speed-up against fidelity, one dot per point (hollow grey when dominated), the front joined."""
    from PIL import Image, ImageDraw

    from .figures import BLUE, GREY, LIGHT_BLUE, _font, _num, _wrap

    points = result["points"]
    have = [p for p in points if p["fidelity"] and _drawable(p["fidelity"]["value"])]
    finite = [p["fidelity"]["value"] for p in have if _finite(p["fidelity"]["value"])]
    # identical outputs have an infinite PSNR: drawn past the largest finite one
    edge = (max(finite) + 5.0) if finite else 50.0

    # distances spread over orders of magnitude (a judge's Fréchet): a log axis, or the good
    # points crowd into one corner beside a few bad ones
    log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100

    def fx(p: dict[str, Any]) -> float:
        v = p["fidelity"]["value"]
        v = v if _finite(v) else edge
        return math.log10(v) if log else v

    name = next((p["fidelity"]["name"] for p in points if p["fidelity"]), "fidelity (none)")
    w, h, left, top, bottom = (
        (640, 436, 70, 56, 50) if len(points) <= 10 else (960, 640, 70, 56, 50)
    )
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font, bold = _font(11), _font(13)
    machine = result["machine"]
    title = _wrap(f"{result['label']}: {_what(result)}", bold, w - 16)
    for k, line in enumerate(title[:2]):
        draw.text((8, 6 + 16 * k), line, fill="black", font=bold)
    top += 16 * (min(2, len(title)) - 1)
    draw.text(
        (8, top - 32),
        f"{result['repeat']} pairs; speed-up: median of per-pair ratios to the baseline, bar: "
        f"its interval; {machine['device']}, {machine.get('torch_threads', '?')} thread(s)"[:110],
        fill=GREY,
        font=font,
    )
    xs = [fx(p) for p in have] or [0.0, 1.0]
    ys = [
        v
        for p in points
        for v in (p["speedup"], p["speedup_spread"]["low"], p["speedup_spread"]["high"])
        if _finite(v)
    ] + [1.0]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    xpad, ypad = (x1 - x0) * 0.1 or 0.5, (y1 - y0) * 0.1 or 0.1
    x0 = max(0.0, x0 - xpad) if x0 >= 0 and not log else x0 - xpad
    x1, y0, y1 = x1 + xpad, max(0.0, y0 - ypad), y1 + ypad
    pw, ph = w - left - 20, h - top - bottom
    higher = not have or have[0]["fidelity"]["higher_is_better"]

    def px(x: float, y: float) -> tuple[int, int]:
        along = (x - x0) / (x1 - x0)
        return (
            int(left + pw * (along if higher else 1 - along)),  # better is always to the right
            int(top + ph - ph * (min(max(y, y0), y1) - y0) / (y1 - y0)),
        )

    draw.rectangle([left, top, left + pw, top + ph], outline=GREY)
    ly = px(x0, 1.0)[1]
    for x in range(left, left + pw, 6):
        draw.line([x, ly, x + 3, ly], fill=GREY)
    draw.text((left + 4, ly - 14), "x1 (baseline)", fill=GREY, font=font)
    draw.text((left - 60, top - 2), f"x{y1:.2f}", fill=GREY, font=font)
    draw.text((left - 60, top + ph - 12), f"x{y0:.2f}", fill=GREY, font=font)
    ends = [f"{10**x0:.2g}", f"{10**x1:.2g}"] if log else [_num(x0), _num(x1)]
    lo_text, hi_text = ends if higher else ends[::-1]
    draw.text((left, top + ph + 4), lo_text, fill=GREY, font=font)
    draw.text((left + pw - font.getlength(hi_text), top + ph + 4), hi_text, fill=GREY, font=font)
    better = "higher" if higher else "lower"
    axis = f"{name} ({better} is better, drawn to the right{', log scale' if log else ''})"
    draw.text((left + pw // 6, top + ph + 20), axis, fill="black", font=font)
    draw.text((8, top + ph // 2), "speed-up", fill="black", font=font)
    front = sorted((p for p in have if not p["dominated"]), key=fx)
    if len(front) > 1:
        draw.line([px(fx(p), p["speedup"]) for p in front], fill=LIGHT_BLUE, width=2)
    taken: list[tuple[int, int]] = []  # label positions drawn, so close points do not overprint
    for p in sorted(have, key=lambda p: -p["speedup"]):
        x, y = px(fx(p), p["speedup"])
        spread = p["speedup_spread"]
        if _finite(spread["low"]) and _finite(spread["high"]):
            top_y, low_y = px(0, spread["high"])[1], px(0, spread["low"])[1]
            draw.line([x, top_y, x, low_y], fill=GREY)
            draw.line([x - 3, top_y, x + 3, top_y], fill=GREY)
            draw.line([x - 3, low_y, x + 3, low_y], fill=GREY)
        # decodekit's points are circles, other packages' squares
        shape = draw.ellipse if p.get("by", "decodekit") == "decodekit" else draw.rectangle
        if p["dominated"]:
            shape([x - 5, y - 5, x + 5, y + 5], outline=GREY, width=2)
        else:
            shape([x - 5, y - 5, x + 5, y + 5], fill=BLUE)
        text = p["label"][:40] + ("" if _finite(p["fidelity"]["value"]) else " (identical)")
        ty = y - 7
        while any(abs(tx - x) < 120 and abs(ty - t) < 13 for tx, t in taken):
            ty += 13
        taken.append((x, ty))
        tx = x + 8 if x + 8 + font.getlength(text) < left + pw else x - 8 - font.getlength(text)
        draw.text((tx, ty), text, fill=GREY if p["dominated"] else "black", font=font)
    missing = len(points) - len(have)
    peers = any(p.get("by", "decodekit") != "decodekit" for p in points)
    note = (
        "filled: on the front; hollow: dominated"
        + ("; circle: decodekit, square: another package" if peers else "")
        + (f"; {missing} point(s) without a fidelity figure not drawn" if missing else "")
    )
    draw.text((8, h - 16), note, fill=GREY, font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(img, path)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _drawable(v: Any) -> bool:
    """A finite figure, or an infinite PSNR (identical outputs); not NaN."""
    return isinstance(v, (int, float)) and (math.isfinite(v) or v == float("inf"))


__all__ = [
    "parse_sweep",
    "sweep_points",
    "point_label",
    "fidelity",
    "mark_dominated",
    "sweep_bench",
    "pareto_bench",
    "Arm",
    "ArmUnavailable",
    "sweep_table",
    "pareto_chart",
]
