"""Side-by-side measurement of a configured strategy set against the plain pipeline.

`bench` loads the pipeline once, warms up both arms, then runs baseline and
strategy in alternating pairs in one process. Each pair gives a ratio
``baseline_time / strategy_time``; the reported speed-up is the median of those
ratios, which cancels slow drift (thermal, other load) better than a ratio of
medians. Absolute times mean something only on a GPU; on CPU quote ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import RunConfig
from .figures import (
    draw_image_figure,
    draw_spread,
    draw_text_figure,
    is_image_list,
    is_text_rows,
    speedup_spread,
    spread_text,
    strategy_label,
)
from .manager import PluginManager, get_manager
from .outputs import atomic_save_image, atomic_write_text
from .progress import Bar, Eta, bench_label
from .session import attach


class PeakMemory:
    """Peak memory of a block: CUDA max-allocated on a CUDA device, else the peak RSS increase.

    On Linux the kernel's resident-set high-water mark is reset at entry (``5`` to
    ``/proc/self/clear_refs``) and read at exit (``VmHWM`` in ``/proc/self/status``):
    exact, and nothing runs beside the timed code. Where that reset is not allowed,
    a background thread samples ``/proc/self/statm`` every ``interval_s`` (short
    spikes between samples can be missed, and the sampling thread takes a little
    of the interpreter's time). Where ``/proc`` does not exist the figure is None
    and the kind says ``unavailable``.
    """

    def __init__(self, device: str, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.peak: int | None = None
        if device.startswith("cuda"):
            self.kind = "cuda_max_allocated"
        elif _can_reset_high_water_mark():
            self.kind = "cpu_rss_high_water"
        elif os.path.exists("/proc/self/statm"):
            self.kind = "cpu_rss_delta"
        else:
            self.kind = "unavailable"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self, start: int) -> None:
        peak = start
        while not self._stop.is_set():
            peak = max(peak, self._rss())
            self._stop.wait(self.interval_s)
        self.peak = max(peak, self._rss()) - start

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_max_allocated":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_rss_high_water":
            self._start = self._rss()
            _reset_high_water_mark()
        elif self.kind == "cpu_rss_delta":
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, args=(self._rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_max_allocated":
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.kind == "cpu_rss_high_water":
            self.peak = max(0, _high_water_mark() - self._start)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


def _high_water_mark() -> int:
    """This process's peak resident set since the last reset, in bytes (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_HWM_OK: bool | None = None


def _can_reset_high_water_mark() -> bool:
    """Whether the kernel lets this process reset and read its RSS high-water mark (once)."""
    global _HWM_OK
    if _HWM_OK is None:
        try:
            _reset_high_water_mark()
            _high_water_mark()
            _HWM_OK = True
        except OSError:
            _HWM_OK = False
    return _HWM_OK


def pair_ratios(baseline_times: list[float], strategy_times: list[float]) -> list[float]:
    """Per-pair speed-ups ``baseline / strategy`` (inf where the strategy took no measurable time)."""
    return [
        b / s if s > 0 else float("inf")
        for b, s in zip(baseline_times, strategy_times, strict=True)
    ]


def _count(outputs: Any) -> int | None:
    try:
        return len(outputs)
    except TypeError:
        return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def bench(
    config: RunConfig,
    repeat: int | None = None,
    json_path: str | os.PathLike | None = None,
    png_path: str | os.PathLike | None = None,
    manager: PluginManager | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool | None = None,
    overhead: bool = False,
    label: str | None = None,
) -> dict[str, Any]:
    """Measure ``config``'s strategies against the baseline; optionally write JSON and a PNG.

    Args:
        config: a loaded `RunConfig`.
        repeat: baseline/strategy pairs to measure (default ``config.bench.repeat``).
        json_path: where to write the result as JSON.
        png_path: where to write a picture (the adapter's side-by-side, else a bar chart).
        manager: plugin manager (default: the global one).
        clock: the timer, injectable for tests.
        progress: show a progress bar on stderr (None: only on a terminal), labelled
            with the config, arm and pair, with an ETA from the measured runs only.
        overhead: also measure decodekit's own cost on this pipeline
            (`decodekit.overhead.measure_overhead`), under ``overhead``.
        label: the config's name on the bar and the picture (default: the
            config file's name, else the model).

    Returns:
        A dict with ``speedup`` (median per-pair ratio), ``pair_ratios``,
        ``speedup_spread`` (`decodekit.figures.speedup_spread`: median, range,
        interval of the median and whether it contains ×1), ``ideal_speedup``, ``nfe``, ``peak_memory``, ``quality``,
        ``compile_s`` (with ``pipeline.compile``: each arm's first call, which compiles,
        in seconds; None otherwise), ``pipeline`` (the adapter's own figures, such as the
        vlm adapter's prefill and decode seconds and K/V cache bytes: each arm's medians
        over pairs and their ratio baseline / strategy; None when the adapter has none), per-arm
        ``baseline``/``strategy`` figures, ``strategies``, ``label``, ``config`` and ``machine``.
    """
    manager = manager or get_manager()
    repeat = config.bench.repeat if repeat is None else repeat
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    specs = config.strategy_specs()
    config.resolve_strategies(manager)  # composition errors before the model loads
    if label is None:
        label = config.file.name if config.file else str(config.pipeline.model)
    target = config.load_pipeline()
    from .distributed import check_placement

    check_placement(target, config.build_strategies(manager))  # a device_map's split model

    def run_arm(arm_specs: list[dict[str, Any]]) -> dict[str, Any]:
        return _run_arm(config, target, arm_specs, manager, clock)

    compile_s = None
    if config.pipeline.compile:  # each arm's first call compiles: timed apart, not in the pairs
        compile_s = {"baseline": run_arm([])["time_s"], "strategy": run_arm(specs)["time_s"]}
    arms = _alternate(run_arm, specs, config.bench.warmup, repeat, Bar(0, progress), label)
    ratios = pair_ratios(
        [r["time_s"] for r in arms["baseline"]], [r["time_s"] for r in arms["strategy"]]
    )
    base_last, strat_last = arms["baseline"][-1], arms["strategy"][-1]
    base_out, strat_out = base_last["outputs"], strat_last["outputs"]
    baseline, strategy = _arm_summary(arms["baseline"]), _arm_summary(arms["strategy"])
    result: dict[str, Any] = {
        "speedup": statistics.median(ratios),
        "pair_ratios": ratios,
        "speedup_spread": speedup_spread(ratios),
        "ideal_speedup": strat_last["ideal"],
        "nfe": {
            "baseline": baseline["nfe"],
            "strategy": strategy["nfe"],
            "ratio": baseline["nfe"] / strategy["nfe"] if strategy["nfe"] else None,
        },
        "peak_memory": {
            "kind": base_last["kind"],
            "baseline": baseline["peak_memory"],
            "strategy": strategy["peak_memory"],
        },
        "quality": _quality(config, manager, base_out, strat_out),
        "pipeline": _pipeline_figures(baseline["pipeline"], strategy["pipeline"]),
        "baseline": baseline,
        "strategy": strategy,
        "strategies": specs,
        "repeat": repeat,
        "warmup": config.bench.warmup,
        "compile_s": compile_s,
        "label": label,
        "config": config.summary(),
        "machine": machine_info(config.device),
    }
    if overhead:
        from .overhead import measure_overhead

        result["overhead"] = measure_overhead(target)
    _write(result, config, base_out, strat_out, json_path, png_path)
    return result


def _run_arm(
    config: RunConfig,
    target: Any,
    specs: list[dict[str, Any]],
    manager: PluginManager,
    clock: Callable[[], float],
) -> dict[str, Any]:
    """One timed call of ``target`` with ``specs`` attached (none: the baseline)."""
    adapter = config.adapter
    run = attach(target, specs, pipeline=adapter.name, manager=manager)
    try:
        with PeakMemory(config.device) as mem:
            _sync(config.device)
            t0 = clock()
            outputs = adapter.generate(target, config.inputs)
            _sync(config.device)
            dt = clock() - t0
        return {
            "time_s": dt,
            "outputs": outputs,
            "stats": run.stats,
            "ideal": run.ideal_speedup(),
            "peak": mem.peak,
            "kind": mem.kind,
        }
    finally:
        run.detach()


def _alternate(
    run_arm: Callable[[list[dict[str, Any]]], dict[str, Any]],
    specs: list[dict[str, Any]],
    warmup: int,
    repeat: int,
    bar: Bar,
    label: str = "bench",
) -> dict[str, list[dict[str, Any]]]:
    """Warm both arms up, then measure ``repeat`` baseline/strategy pairs in alternating order.

    ``bar`` shows which config, arm and pair runs; its ETA counts measured runs only.
    """
    arms: dict[str, list[dict[str, Any]]] = {"baseline": [], "strategy": []}
    arm_specs = {"baseline": [], "strategy": specs}
    bar.total = warmup * 2 + repeat * 2
    eta = Eta({"baseline": repeat, "strategy": repeat})
    with bar:
        for i in range(warmup):
            for arm in ("baseline", "strategy"):
                bar.show(bench_label(label, arm, i + 1, warmup, warmup=True))
                run_arm(arm_specs[arm])  # not timed into the ETA
                bar.advance()
        for i in range(repeat):
            # Swap the order in every other pair so neither arm always runs second.
            order = ("baseline", "strategy") if i % 2 == 0 else ("strategy", "baseline")
            for arm in order:
                bar.show(bench_label(label, arm, i + 1, repeat))
                arms[arm].append(run_arm(arm_specs[arm]))
                eta.record(arm, arms[arm][-1]["time_s"])
                bar.advance(eta=eta.seconds())
    return arms


def _arm_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Times, NFE, served calls, throughput and peak memory of one arm's measured runs."""
    times = [r["time_s"] for r in runs]
    med = statistics.median(times)
    nfes = [r["stats"]["nfe"] for r in runs]
    peaks = [r["peak"] for r in runs if r["peak"] is not None]
    items = _count(runs[-1]["outputs"])
    return {
        "time_s": {"median": med, "min": min(times), "max": max(times), "all": times},
        "nfe": nfes[-1],
        "nfe_all": nfes,
        "served": runs[-1]["stats"]["served"],
        "items": items,
        "items_per_s": (items / med) if items and med > 0 else None,
        "peak_memory": max(peaks) if peaks else None,
        "pipeline": _median_figures([r["stats"].get("pipeline") or {} for r in runs]),
        "stats": runs[-1]["stats"],
    }


def _median_figures(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric figure of the adapter's stats (`PipelineAdapter.stats`): its median over runs."""
    keys = [
        k
        for k, v in (per_run[-1] if per_run else {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    return {
        k: statistics.median(vals)
        for k in keys
        if (vals := [r[k] for r in per_run if isinstance(r.get(k), (int, float))])
    }


def _pipeline_figures(base: dict[str, Any], strat: dict[str, Any]) -> dict[str, Any] | None:
    """Both arms' adapter figures (medians over pairs) and ``ratio``: baseline / strategy."""
    if not base and not strat:
        return None
    ratio = {k: base[k] / strat[k] for k in base if k in strat and strat[k] and base[k] is not None}
    return {"baseline": base, "strategy": strat, "ratio": ratio}


def _quality(
    config: RunConfig, manager: PluginManager, base_out: Any, strat_out: Any
) -> dict[str, dict[str, Any]]:
    """The adapter's quality figures and every registered metric's (those that answer)."""
    adapter = config.adapter
    quality = {"adapter": dict(adapter.quality(base_out, strat_out) or {})}
    for name, fn in manager.registry.metrics.items():
        figures = fn(adapter.name, base_out, strat_out, config.inputs)
        if figures is not None:
            quality[name] = dict(figures)
    return quality


def _write(
    result: dict[str, Any],
    config: RunConfig,
    base_out: Any,
    strat_out: Any,
    json_path: str | os.PathLike | None,
    png_path: str | os.PathLike | None,
) -> None:
    """Write the JSON and the picture (`draw_picture`)."""
    if json_path is not None:
        write_json(result, json_path)
    if png_path is not None:
        kind = draw_picture(result, config, base_out, strat_out, png_path)
        result["picture"] = {"path": str(png_path), "kind": kind}
        if json_path is not None:
            write_json(result, json_path)


def draw_picture(
    result: dict[str, Any],
    config: RunConfig,
    base_out: Any,
    strat_out: Any,
    path: str | os.PathLike,
) -> str:
    """Draw the bench picture at ``path``; returns its kind.

    Images: ``image-grid``, a column per prompt and a row per arm
    (`decodekit.figures.draw_image_figure`); text rows: ``text-samples``, the
    texts side by side with their differences marked (`draw_text_figure`); both
    with the strategies, speed-up, quality and the spread over pairs. Other
    outputs: the adapter's own picture (``adapter``), else ``bar-chart``.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if is_image_list(base_out) and is_image_list(strat_out):
        prompt = getattr(config.inputs, "prompt", None)
        prompts = [prompt] if isinstance(prompt, (str, int)) else list(prompt or [])
        per = int(getattr(config.inputs, "num_images_per_prompt", 1) or 1)
        draw_image_figure(result, base_out, strat_out, [str(p) for p in prompts], path, per)
        return "image-grid"
    if is_text_rows(base_out) and is_text_rows(strat_out):
        draw_text_figure(result, base_out, strat_out, path)
        return "text-samples"
    if config.adapter.picture(base_out, strat_out, Path(path)):
        return "adapter"
    bar_chart(result, path)
    return "bar-chart"


def machine_info(device: str) -> dict[str, Any]:
    """Where the numbers came from: device, torch version, CPU/GPU names."""
    import torch

    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def jsonable(obj: Any) -> Any:
    """A JSON-ready copy of ``obj`` (tensors become lists or summaries, paths strings, NaN/inf strings)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return jsonable(obj.model_dump(mode="json"))
    if hasattr(obj, "tolist") and hasattr(obj, "numel"):
        return (
            jsonable(obj.tolist())
            if obj.numel() <= 64
            else f"<tensor {tuple(obj.shape)} {obj.dtype}>"
        )
    if hasattr(obj, "item"):
        try:
            return jsonable(obj.item())
        except (TypeError, ValueError):
            pass
    return repr(obj)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a bench result as indented JSON (outputs themselves are not included)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(jsonable(result), indent=2) + "\n")


def bar_chart(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Draw wall time and NFE of both arms as a PNG bar chart (PIL only).

    The title names the strategies with their params and the speed-up; with
    ``pair_ratios`` in ``result`` the spread over pairs is drawn below the bars.
    """
    from PIL import Image, ImageDraw, ImageFont

    from .figures import SPREAD_H

    groups = [
        (
            "wall time (s, median)",
            result["baseline"]["time_s"]["median"],
            result["strategy"]["time_s"]["median"],
        ),
        ("model calls (NFE)", result["baseline"]["nfe"], result["strategy"]["nfe"]),
    ]
    w, h, margin, top = 560, 300, 30, 50
    ratios = result.get("pair_ratios")
    spread = result.get("speedup_spread") or (speedup_spread(ratios) if ratios else None)
    img = Image.new("RGB", (w, h + (SPREAD_H if spread else 0)), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    speed = spread_text(spread) if spread else f"×{result['speedup']:.2f}"
    title = f"{result.get('label') or 'bench'}: baseline vs {strategy_label(result['strategies'])}"
    draw.text((margin, 6), title[:90], fill="black", font=font)
    draw.text((margin, 22), f"speed-up {speed}"[:90], fill="black", font=font)
    colors = {"baseline": (120, 120, 120), "strategy": (40, 110, 200)}
    group_w = (w - 2 * margin) // len(groups)
    bar_w = group_w // 4
    plot_h = h - top - 50
    for g, (label, b, s) in enumerate(groups):
        x0 = margin + g * group_w + group_w // 4
        peak = max(b or 0, s or 0) or 1
        for k, (arm, v) in enumerate((("baseline", b), ("strategy", s))):
            v = v or 0
            bh = int(plot_h * v / peak)
            x = x0 + k * (bar_w + 8)
            y1 = top + plot_h
            draw.rectangle([x, y1 - bh, x + bar_w, y1], fill=colors[arm])
            text = f"{v:.3g}" if isinstance(v, float) else str(v)
            draw.text((x, y1 - bh - 12), text, fill="black", font=font)
        draw.text((x0, top + plot_h + 8), label, fill="black", font=font)
    draw.rectangle([margin, h - 20, margin + 10, h - 10], fill=colors["baseline"])
    draw.text((margin + 14, h - 21), "baseline", fill="black", font=font)
    draw.rectangle([margin + 90, h - 20, margin + 100, h - 10], fill=colors["strategy"])
    draw.text((margin + 104, h - 21), "strategy", fill="black", font=font)
    if spread:
        draw_spread(draw, (margin, h, w - margin, h + SPREAD_H), ratios, spread)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(img, path)


__all__ = [
    "bench",
    "pair_ratios",
    "PeakMemory",
    "bar_chart",
    "machine_info",
    "write_json",
    "jsonable",
]
