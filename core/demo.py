"""The embedded default of ``decodekit demo``: bench configs over the reference zoo, no download.

Each config benches one strategy set on one zoo model; the demo writes a
JSON and a PNG per config and a markdown table of speed-up, model calls and
quality. The zoo models are trained and committed in this repository
(``decodekit.pipelines.zoo``), so the demo needs nothing from the network.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .errors import ConfigError, DecodekitError
from .outputs import atomic_write_text

# Inputs are kept small so the whole demo runs in about a minute on a 2-core CPU.
SHAPE_PROMPTS = [
    "a small red circle on the left",
    "a large green square on the right",
    "a small blue triangle at the top",
    "a large yellow star at the bottom",
    "a small purple circle in the centre",
    "a large orange square on the left",
    "a large red triangle on the right",
    "a small green star at the top",
]
ARITH_PROMPTS = ["86-7=", "8+5=", "97-47=", "172-9=", "6+98=", "0+60=", "92-30=", "109-93="]

DEMO_CONFIGS: dict[str, dict[str, Any]] = {
    "shapes-sd": {
        "pipeline": {
            "type": "stable-diffusion",
            "model": "zoo:shapes-sd",
            "device": "auto",
            "dtype": "float32",
            "options": {"scheduler": "ddim"},
        },
        "strategies": [
            {"name": "faster-diffusion", "params": {"key_steps": "paper"}},
            {"name": "prior-noise", "params": {"prior_noise": 0.003}},
        ],
        "inputs": {
            "prompt": SHAPE_PROMPTS,
            "num_inference_steps": 50,
            "guidance_scale": 3.0,
            "seed": 0,
        },
        "bench": {"repeat": 3, "warmup": 1},
    },
    "arith-mdlm": {
        "pipeline": {
            "type": "masked-diffusion-lm",
            "model": "zoo:arith-mdlm",
            "device": "auto",
            "dtype": "float32",
        },
        "strategies": [
            {"name": "dkv-cache", "params": {"variant": "decode", "refresh_interval": 4}},
            {"name": "parallel-threshold", "params": {"threshold": 0.9}},
        ],
        "inputs": {  # a 64-token window: the answer, then <eos> to the end (docs/zoo.md)
            "prompt": ARITH_PROMPTS,
            "gen_length": 64,
            "block_length": 32,
            "steps": 64,
            "seed": 0,
        },
        "bench": {"repeat": 3, "warmup": 1},
    },
}
"""Demo name → run config (the same shape as a YAML file)."""


def demo_configs() -> dict[str, dict[str, Any]]:
    """Copies of the embedded demo configs."""
    return copy.deepcopy(DEMO_CONFIGS)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _bytes(v: int | None) -> str:
    if v is None:
        return "–"
    return f"{v / 2**20:.1f} MiB"


def _spread(r: dict[str, Any]) -> str:
    """``×1.61–×1.90 (75%, 3 pairs)``, with ``within noise`` when the interval holds ×1."""
    s = r.get("speedup_spread")
    if not s:
        return "–"
    noise = ", within noise" if s["within_noise"] else ""
    return f"×{_fmt(s['low'])}–×{_fmt(s['high'])} ({s['coverage']:.0%}, {s['n']} pairs{noise})"


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of bench results, one row per demo config."""
    lines = [
        "| config | strategies | speed-up (median of pairs) | spread over pairs | FLOP-ideal "
        "| model calls (baseline → strategy) | peak memory (baseline / strategy) | quality |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        strategies = ", ".join(s["name"] for s in r["strategies"]) or "none"
        nfe = r["nfe"]
        mem = r["peak_memory"]
        quality = (
            "; ".join(
                f"{k}={_fmt(v)}" for figures in r["quality"].values() for k, v in figures.items()
            )
            or "–"
        )
        lines.append(
            f"| {name} | {strategies} | ×{_fmt(r['speedup'])} | {_spread(r)} "
            f"| {'×' + _fmt(r['ideal_speedup']) if r['ideal_speedup'] else '–'} "
            f"| {nfe['baseline']} → {nfe['strategy']} | {_bytes(mem['baseline'])} / {_bytes(mem['strategy'])} "
            f"({mem['kind']}) | {quality} |"
        )
    return "\n".join(lines) + "\n"


def run_demo(
    out_dir: str | Path = "outputs/demo",
    configs: dict[str, dict[str, Any]] | None = None,
    repeat: int | None = None,
    manager=None,
    threads: int | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Bench every demo config; write ``<name>.json``, ``<name>.png`` and ``README.md`` into ``out_dir``.

    ``threads``: torch CPU threads for every config (default: each config's
    ``pipeline.threads``, else one on a CPU; `decodekit.runtime.set_threads`).
    ``progress``: a bar per config on stderr, labelled with its name (None: only
    on a terminal).
    """
    from .bench import bench
    from .config import load_config
    from .runtime import configure_threads

    configs = demo_configs() if configs is None else configs
    out = Path(out_dir)
    # Validate every config before the first model loads, so a bad one fails fast.
    loaded = {}
    for name, cfg in configs.items():
        try:
            loaded[name] = load_config({**cfg, "output": {"dir": str(out / name)}}, manager=manager)
            loaded[name].resolve_strategies(manager)
        except ConfigError as e:
            raise ConfigError(e.path, f"(demo config {name!r}) {e.message}") from e
        except DecodekitError as e:
            raise DecodekitError(f"demo config {name!r}: {e}") from e
    results = {}
    for name, cfg in loaded.items():
        configure_threads(cfg, threads)
        results[name] = bench(
            cfg,
            repeat=repeat,
            json_path=out / f"{name}.json",
            png_path=out / f"{name}.png",
            manager=manager,
            progress=progress,
            label=name,
        )
    machine = next(iter(results.values()))["machine"] if results else {}
    device = machine.get("device", "–")
    n = machine.get("torch_threads", "–")
    text = (
        "# decodekit demo\n\n"
        f"Baseline and strategies run alternately in one process on `{device}` with {n} torch "
        f"thread{'' if n == 1 else 's'}; the speed-up is the median "
        "of per-pair time ratios. On CPU only ratios mean something.\n\n" + markdown_table(results)
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "README.md", text)
    return results
