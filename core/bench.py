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
from .manager import PluginManager, get_manager
from .outputs import atomic_save_image, atomic_write_text
from .session import attach


class PeakMemory:
    """Peak memory of a block: CUDA max-allocated on a CUDA device, else the peak RSS increase.

    On CPU a background thread samples ``/proc/self/statm`` every ``interval_s``;
    short spikes between samples can be missed. Where ``/proc`` does not exist
    the figure is None and the kind says ``unavailable``.
    """

    def __init__(self, device: str, interval_s: float = 0.002):
        self.device = device
        self.interval_s = interval_s
        self.peak: int | None = None
        if device.startswith("cuda"):
            self.kind = "cuda_max_allocated"
        elif os.path.exists("/proc/self/statm"):
            self.kind = "cpu_rss_delta"
        else:
            self.kind = "unavailable"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None


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
) -> dict[str, Any]:
    """Measure ``config``'s strategies against the baseline; optionally write JSON and a PNG.

    Args:
        config: a loaded `RunConfig`.
        repeat: baseline/strategy pairs to measure (default ``config.bench.repeat``).
        json_path: where to write the result as JSON.
        png_path: where to write a picture (the adapter's side-by-side, else a bar chart).
        manager: plugin manager (default: the global one).
        clock: the timer, injectable for tests.
        progress: show a tqdm bar (None: only on a terminal).
        overhead: also measure decodekit's own cost on this pipeline
            (`decodekit.overhead.measure_overhead`), under ``overhead``.

    Returns:
        A dict with ``speedup`` (median per-pair ratio), ``pair_ratios``,
        ``ideal_speedup``, ``nfe``, ``peak_memory``, ``quality``, per-arm
        ``baseline``/``strategy`` figures, ``strategies``, ``config`` and ``machine``.
    """
    manager = manager or get_manager()
    repeat = config.bench.repeat if repeat is None else repeat
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    adapter = config.adapter
    specs = config.strategy_specs()
    config.resolve_strategies(manager)  # composition errors before the model loads
    target = config.load_pipeline()

    def run_arm(arm_specs: list[dict[str, Any]]) -> dict[str, Any]:
        return _run_arm(config, target, arm_specs, manager, clock)

    arms = _alternate(run_arm, specs, config.bench.warmup, repeat, progress)
    ratios = pair_ratios(
        [r["time_s"] for r in arms["baseline"]], [r["time_s"] for r in arms["strategy"]]
    )
    base_last, strat_last = arms["baseline"][-1], arms["strategy"][-1]
    base_out, strat_out = base_last["outputs"], strat_last["outputs"]
    baseline, strategy = _arm_summary(arms["baseline"]), _arm_summary(arms["strategy"])
    result: dict[str, Any] = {
        "speedup": statistics.median(ratios),
        "pair_ratios": ratios,
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
        "baseline": baseline,
        "strategy": strategy,
        "strategies": specs,
        "repeat": repeat,
        "warmup": config.bench.warmup,
        "config": config.summary(),
        "machine": machine_info(config.device),
    }
    if overhead:
        from .overhead import measure_overhead

        result["overhead"] = measure_overhead(target)
    _write(result, adapter, base_out, strat_out, json_path, png_path)
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
    progress: bool | None,
) -> dict[str, list[dict[str, Any]]]:
    """Warm both arms up, then measure ``repeat`` baseline/strategy pairs in alternating order."""
    from tqdm.auto import tqdm

    arms: dict[str, list[dict[str, Any]]] = {"baseline": [], "strategy": []}
    arm_specs = {"baseline": [], "strategy": specs}
    total = warmup * 2 + repeat * 2
    disable = None if progress is None else not progress  # None: tqdm shows it only on a terminal
    with tqdm(total=total, desc="bench", disable=disable, leave=False) as bar:
        for _ in range(warmup):
            for arm in ("baseline", "strategy"):
                run_arm(arm_specs[arm])
                bar.update()
        for i in range(repeat):
            # Swap the order in every other pair so neither arm always runs second.
            order = ("baseline", "strategy") if i % 2 == 0 else ("strategy", "baseline")
            for arm in order:
                arms[arm].append(run_arm(arm_specs[arm]))
                bar.update()
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
        "stats": runs[-1]["stats"],
    }


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
    adapter: Any,
    base_out: Any,
    strat_out: Any,
    json_path: str | os.PathLike | None,
    png_path: str | os.PathLike | None,
) -> None:
    """Write the JSON and the picture (the adapter's side-by-side, else a bar chart)."""
    if json_path is not None:
        write_json(result, json_path)
    if png_path is not None:
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        drawn = bool(adapter.picture(base_out, strat_out, Path(png_path)))
        if not drawn:
            bar_chart(result, png_path)
        result["picture"] = {"path": str(png_path), "kind": "adapter" if drawn else "bar-chart"}
        if json_path is not None:
            write_json(result, json_path)


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
    """Draw wall time and NFE of both arms as a PNG bar chart (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    groups = [
        (
            "wall time (s, median)",
            result["baseline"]["time_s"]["median"],
            result["strategy"]["time_s"]["median"],
        ),
        ("model calls (NFE)", result["baseline"]["nfe"], result["strategy"]["nfe"]),
    ]
    w, h, margin, top = 560, 300, 30, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    names = ", ".join(s["name"] for s in result["strategies"]) or "no strategy"
    draw.text(
        (margin, 10),
        f"baseline vs {names}: speed-up x{result['speedup']:.2f}",
        fill="black",
        font=font,
    )
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
