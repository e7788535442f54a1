"""Faster-Diffusion against DeepCache on one pipeline, in one process: speed-up against fidelity.

The pipeline is a StableDiffusionPipeline whose UNet has Stable Diffusion 1.5's
block layout (3 cross-attention down blocks + 1 plain, mirrored up blocks, 2
resnets per block) at a smaller width, randomly initialised, with 32x32
latents; DDIM, classifier-free guidance on. Arms run in alternating rounds
(baseline first in each round, the others rotated), and every speed-up is the
median over rounds of baseline_time / arm_time of the same round.

Figures per arm: wall-clock speed-up, UNet-time speed-up (time inside the
UNet's ``__call__``, which includes serving from a cache), the FLOP-ideal
speed-up (UNet FLOPs of the baseline call over the arm's, counted with
``torch.utils.flop_counter.FlopCounterMode``), the ratio measured / ideal,
UNet calls run in full, and PSNR of the decoded images to the baseline's.

DeepCache (``pip install DeepCache==0.1.1 --no-deps``) is imported lazily; without
it the DeepCache arms are skipped with a note.

    .venv/bin/python benchmarks/faster_diffusion_vs_deepcache.py --steps 50 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny: the tiny text encoder and VAE

FD_SCHEDULES = ["paper", "uniform-2", "uniform-3", "uniform-4", "uniform-5"]
DEEPCACHE_INTERVALS = [2, 3, 5]


def sd15_shaped_pipeline(width: int, seed: int = 0):
    """A random StableDiffusionPipeline with SD 1.5's UNet block layout at base width ``width``."""
    import diffusers
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from tests.tiny import tiny_text_encoder, tiny_vae

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),  # SD 1.5: 320, 640, 1280, 1280
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=min(32, width),
    )
    text_encoder, tokenizer = tiny_text_encoder(hidden=64)
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class UNetTimer:
    """Seconds spent inside ``unet.__call__`` (torch hooks run around whatever forward is installed)."""

    def __init__(self, unet: torch.nn.Module):
        self.total = 0.0
        self._t0 = 0.0
        self._handles = [
            unet.register_forward_pre_hook(lambda m, a: self._start()),
            unet.register_forward_hook(lambda m, a, o: self._stop()),
        ]

    def _start(self) -> None:
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        self.total += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class UNetFlops:
    """UNet FLOPs of one pipeline call: a FlopCounterMode entered around each ``unet.__call__``."""

    def __init__(self, unet: torch.nn.Module):
        from torch.utils.flop_counter import FlopCounterMode

        self.total = 0
        self._mode: FlopCounterMode | None = None
        self._cls = FlopCounterMode
        self._handles = [
            unet.register_forward_pre_hook(lambda m, a: self._start()),
            unet.register_forward_hook(lambda m, a, o: self._stop()),
        ]

    def _start(self) -> None:
        self._mode = self._cls(display=False)
        self._mode.__enter__()

    def _stop(self) -> None:
        assert self._mode is not None
        self._mode.__exit__(None, None, None)
        self.total += self._mode.get_total_flops()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def arms(has_deepcache: bool) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "baseline", "kind": "baseline"}]
    out.append(
        {
            "name": "fd paper (sequential)",
            "kind": "fd",
            "params": {"key_steps": "paper", "parallel_decoder": False},
        }
    )
    for sched in FD_SCHEDULES:
        out.append(
            {
                "name": f"fd {sched}",
                "kind": "fd",
                "params": {"key_steps": sched, "parallel_decoder": True},
            }
        )
    if has_deepcache:
        for n in DEEPCACHE_INTERVALS:
            out.append({"name": f"deepcache {n}", "kind": "deepcache", "interval": n})
    return out


def run_arm(pipe, arm: dict[str, Any], prompts: list[str], steps: int, seed: int, measure):
    """One pipeline call of ``arm``; returns (images, figures from ``measure`` and the run)."""
    import decodekit

    latents = torch.randn(
        len(prompts), 4, 32, 32, generator=torch.Generator().manual_seed(seed)
    )  # (B, 4, 32, 32)
    kwargs = dict(num_inference_steps=steps, latents=latents, output_type="pil", guidance_scale=7.5)
    meter = measure(pipe.unet)
    extra: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        if arm["kind"] == "fd":
            with decodekit.attach(
                pipe, [{"name": "faster-diffusion", "params": arm["params"]}]
            ) as run:
                t0 = time.perf_counter()
                images = pipe(prompts, **kwargs).images
                wall = time.perf_counter() - t0
            extra = {"full_calls": run.last["nfe"], "ideal_own": run.ideal_speedup()}
        elif arm["kind"] == "deepcache":
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=arm["interval"], cache_branch_id=0)
            helper.enable()
            try:
                t0 = time.perf_counter()
                images = pipe(prompts, **kwargs).images
                wall = time.perf_counter() - t0
            finally:
                helper.disable()
            extra = {"full_calls": len(range(0, steps, arm["interval"]))}
        else:
            images = pipe(prompts, **kwargs).images
            wall = time.perf_counter() - t0
            extra = {"full_calls": steps}
    finally:
        meter.remove()
    return images, {"wall_s": wall, "meter": meter.total, **extra}


def psnr(a: list, b: list) -> float:
    vals = []
    for x, y in zip(a, b):
        mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
        vals.append(float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse))
    return float(np.mean(vals))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Speed-up (x) against PSNR to the baseline (y), one dot per arm (PIL only)."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 420, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [r for r in rows if r["name"] != "baseline"]
    xs = [r["wall_speedup"] for r in pts]
    ys = [r["psnr_db"] for r in pts]
    x0, x1 = 1.0, max(xs) * 1.1
    y0, y1 = min(ys) - 2, max(ys) + 2

    def at(x: float, y: float) -> tuple[float, float]:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    d.text((w // 2 - 90, h - m + 25), "wall-clock speed-up over baseline", fill="black")
    d.text((5, m - 30), "PSNR to baseline (dB)", fill="black")
    d.text((m, h - m + 5), f"{x0:.1f}", fill="black")
    d.text((w - m - 20, h - m + 5), f"{x1:.1f}", fill="black")
    d.text((5, m), f"{y1:.0f}", fill="black")
    d.text((5, h - m - 10), f"{y0:.0f}", fill="black")
    for r in pts:
        x, y = at(r["wall_speedup"], r["psnr_db"])
        color = (200, 60, 40) if r["name"].startswith("deepcache") else (40, 110, 200)
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        d.text((x + 6, y - 6), r["name"].replace("fd ", ""), fill=color)
    d.text((w - 230, 10), "blue: faster-diffusion  red: DeepCache", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=32, help="UNet base width (SD 1.5: 320)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/faster_diffusion_vs_deepcache"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    try:
        import DeepCache  # noqa: F401

        has_deepcache = True
    except ImportError:
        has_deepcache = False
        print(
            "DeepCache is not installed; its arms are skipped. "
            "Install it with: .venv/bin/pip install DeepCache==0.1.1 --no-deps"
        )
    pipe = sd15_shaped_pipeline(args.width)
    prompts = ["a red circle"]
    todo = arms(has_deepcache)

    # Outputs and FLOPs, once per arm (not timed).
    outputs, flops, info = {}, {}, {}
    for arm in todo:
        images, fig = run_arm(pipe, arm, prompts, args.steps, 0, UNetFlops)
        outputs[arm["name"]], flops[arm["name"]], info[arm["name"]] = images, fig["meter"], fig

    # Warm-up, then alternating timed rounds.
    for arm in todo:
        run_arm(pipe, arm, prompts, min(args.steps, 5), 1, UNetTimer)
    wall: dict[str, list[float]] = {a["name"]: [] for a in todo}
    unet: dict[str, list[float]] = {a["name"]: [] for a in todo}
    others = todo[1:]
    for r in range(args.rounds):
        order = [todo[0]] + others[r % len(others) :] + others[: r % len(others)]
        for arm in order:
            _, fig = run_arm(pipe, arm, prompts, args.steps, 0, UNetTimer)
            wall[arm["name"]].append(fig["wall_s"])
            unet[arm["name"]].append(fig["meter"])
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = []
    for arm in todo:
        n = arm["name"]
        wall_ratio = statistics.median(b / a for b, a in zip(wall["baseline"], wall[n]))
        unet_ratio = statistics.median(b / a for b, a in zip(unet["baseline"], unet[n]))
        ideal = flops["baseline"] / flops[n]
        rows.append(
            {
                "name": n,
                "full_unet_calls": info[n]["full_calls"],
                "wall_s_median": statistics.median(wall[n]),
                "wall_speedup": wall_ratio,
                "unet_speedup": unet_ratio,
                "flop_ideal_speedup": ideal,
                "strategy_ideal_speedup": info[n].get("ideal_own"),
                "unet_speedup_over_ideal": unet_ratio / ideal,
                "psnr_db": psnr(outputs["baseline"], outputs[n]),
            }
        )
    result = {
        "command": "python benchmarks/faster_diffusion_vs_deepcache.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, torch threads 1, {platform.platform()}",
        "torch": torch.__version__,
        "pipeline": f"random SD-1.5-layout UNet, width {args.width}, 32x32 latents, DDIM-{args.steps}, CFG 7.5, batch 1",
        "rounds": args.rounds,
        "deepcache": has_deepcache,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(
        f"{'arm':24} {'full':>4} {'wall x':>7} {'unet x':>7} {'ideal x':>7} {'unet/ideal':>10} {'PSNR':>7}"
    )
    for r in rows:
        print(
            f"{r['name']:24} {r['full_unet_calls']:>4} {r['wall_speedup']:>7.2f} {r['unet_speedup']:>7.2f} "
            f"{r['flop_ideal_speedup']:>7.2f} {r['unet_speedup_over_ideal']:>10.2f} {r['psnr_db']:>7.2f}"
        )
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
