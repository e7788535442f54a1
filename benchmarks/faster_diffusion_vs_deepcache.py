"""Faster-Diffusion against DeepCache on one pipeline, in one process: speed-up against fidelity.

Three kinds of arm: decodekit's ``faster-diffusion`` schedules, the DeepCache
package's ``DeepCacheSDHelper`` at several intervals, and decodekit's ``deep-cache``
at the same intervals (the package's algorithm through decodekit's hooks; its
outputs equal the package's, so its PSNR must match the package arm's) plus
``deep-cache`` with ``parallel: true`` (Faster-Diffusion's parallel decoder on the
shallow steps). ``--arms fd,deepcache,dk`` picks kinds (default: all).

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

DeepCache (``pip install DeepCache==0.1.1``, in decodekit's ``test`` extra) is
imported lazily; without it the package's arms are skipped with a note.

With ``--model zoo`` the pipeline is instead the trained reference-zoo model
``zoo:shapes-sd`` (32x32 images) at its operating point, guidance 3.0, DDIM,
on the 16 prompts of examples/faster-diffusion.yaml; the Faster-Diffusion arms
compose ``prior-noise`` (``--prior-noise``, default 0.003 there as in the
example, 0 for the random UNet), and every arm also gets the zoo judge's
figures (``shapes_judge_metric``: adherence, shape+colour adherence, agreement
with the baseline, Frechet distance to the baseline on the judge's features).

    .venv/bin/python benchmarks/faster_diffusion_vs_deepcache.py --steps 50 --rounds 3
    .venv/bin/python benchmarks/faster_diffusion_vs_deepcache.py --model zoo --steps 50 --rounds 3

On a GPU, ``--device cuda --dtype float16 --width 320 --latent-size 64 --cross-dim 768``
gives Stable Diffusion 1.5's UNet at full width on 512x512-sized latents (random
weights; a one-layer text encoder of width 768 and a tiny VAE around it). Timers
synchronise the device around each UNet call and each pipeline call.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny: the tiny text encoder and VAE

FD_SCHEDULES = ["paper", "uniform-2", "uniform-3", "uniform-4", "uniform-5"]
DEEPCACHE_INTERVALS = [2, 3, 5]
DK_PARALLEL_INTERVALS = [3, 5]  # decodekit deep-cache with parallel: true
ARM_KINDS = ("fd", "deepcache", "dk")
ZOO_EXAMPLE = ROOT / "examples/faster-diffusion.yaml"


def zoo_pipeline():
    """``zoo:shapes-sd`` from its folder, DDIM (its saved scheduler), progress bar off."""
    import diffusers
    from decodekit.pipelines.zoo import zoo_path
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(zoo_path("shapes-sd"), safety_checker=None)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def zoo_prompts() -> list[str]:
    """The 16 prompts of examples/faster-diffusion.yaml (``inputs.prompt``)."""
    import yaml

    return list(yaml.safe_load(ZOO_EXAMPLE.read_text())["inputs"]["prompt"])


def sd15_shaped_pipeline(width: int, seed: int = 0, latent_size: int = 32, cross_dim: int = 64):
    """A random StableDiffusionPipeline with SD 1.5's UNet block layout at base width ``width``."""
    import diffusers
    from decodekit.testing import tiny_text_encoder, tiny_vae
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),  # SD 1.5: 320, 640, 1280, 1280
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, width),
    )
    text_encoder, tokenizer = tiny_text_encoder(hidden=cross_dim)
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


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class UNetTimer:
    """Seconds spent inside ``unet.__call__`` (torch hooks run around whatever forward is installed).

    On a GPU the device is synchronised at both ends, so the time is the UNet's work.
    """

    def __init__(self, unet: torch.nn.Module):
        self.total = 0.0
        self._t0 = 0.0
        self._handles = [
            unet.register_forward_pre_hook(lambda m, a: self._start()),
            unet.register_forward_hook(lambda m, a, o: self._stop()),
        ]

    def _start(self) -> None:
        sync()
        self._t0 = time.perf_counter()

    def _stop(self) -> None:
        sync()
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


def arms(
    has_deepcache: bool, sequential: bool = True, kinds: tuple[str, ...] = ARM_KINDS
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "baseline", "kind": "baseline"}]
    if sequential and "fd" in kinds:
        out.append(
            {
                "name": "fd paper (sequential)",
                "kind": "fd",
                "params": {"key_steps": "paper", "parallel_decoder": False},
            }
        )
    for sched in FD_SCHEDULES if "fd" in kinds else []:
        out.append(
            {
                "name": f"fd {sched}",
                "kind": "fd",
                "params": {"key_steps": sched, "parallel_decoder": True},
            }
        )
    if has_deepcache and "deepcache" in kinds:
        for n in DEEPCACHE_INTERVALS:
            out.append({"name": f"deepcache {n}", "kind": "deepcache", "interval": n})
    if "dk" in kinds:
        for n in DEEPCACHE_INTERVALS:
            out.append({"name": f"dk deep-cache {n}", "kind": "dk", "params": {"interval": n}})
        for n in DK_PARALLEL_INTERVALS:
            out.append(
                {
                    "name": f"dk deep-cache {n} parallel",
                    "kind": "dk",
                    "params": {"interval": n, "parallel": True},
                }
            )
    return out


def initial_latents(pipe, n: int, seed: int) -> torch.Tensor:
    """Seeded initial noise for ``n`` prompts, on the UNet's device and dtype: (n, C, h, w)."""
    side = pipe.unet.config.sample_size
    return torch.randn(
        n, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed)
    ).to(pipe.unet.device, pipe.unet.dtype)


def timed_call(pipe, prompts: list[str], kwargs: dict[str, Any]) -> tuple[list, float]:
    """The images of one pipeline call and its wall-clock seconds (device synchronised first)."""
    sync()
    t0 = time.perf_counter()
    images = pipe(prompts, **kwargs).images
    return images, time.perf_counter() - t0


def run_arm(
    pipe,
    arm: dict[str, Any],
    prompts: list[str],
    steps: int,
    seed: int,
    measure,
    guidance: float = 7.5,
    prior_noise: float = 0.0,
):
    """One pipeline call of ``arm``; returns (images, figures from ``measure`` and the run).

    ``prior_noise`` > 0 composes ``prior-noise`` with the Faster-Diffusion arms only.
    """
    import decodekit

    kwargs = dict(
        num_inference_steps=steps,
        latents=initial_latents(pipe, len(prompts), seed),
        output_type="pil",
        guidance_scale=guidance,
    )
    meter = measure(pipe.unet)
    try:
        if arm["kind"] == "fd":
            specs: list[dict[str, Any]] = [{"name": "faster-diffusion", "params": arm["params"]}]
            if prior_noise > 0:
                specs.append({"name": "prior-noise", "params": {"prior_noise": prior_noise}})
            with decodekit.attach(pipe, specs) as run:
                images, wall = timed_call(pipe, prompts, kwargs)
            extra = {"full_calls": run.last["nfe"], "ideal_own": run.ideal_speedup()}
        elif arm["kind"] == "dk":
            with decodekit.attach(pipe, [{"name": "deep-cache", "params": arm["params"]}]) as run:
                images, wall = timed_call(pipe, prompts, kwargs)
            extra = {"full_calls": run.last["nfe"], "ideal_own": run.ideal_speedup()}
        elif arm["kind"] == "deepcache":
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=arm["interval"], cache_branch_id=0)
            helper.enable()
            try:
                images, wall = timed_call(pipe, prompts, kwargs)
            finally:
                helper.disable()
            extra = {"full_calls": len(range(0, steps, arm["interval"]))}
        else:
            images, wall = timed_call(pipe, prompts, kwargs)
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
    """Speed-up (x) against PSNR to the baseline (y), one dot per arm (PIL only); with judge
    figures in the rows, a second panel of speed-up against judge shape+colour adherence."""
    from PIL import Image

    panels = [("psnr_db", "PSNR to baseline (dB)", 2.0)]
    if "judge_shape_colour_strategy" in rows[0]:
        panels.append(("judge_shape_colour_strategy", "judge shape+colour adherence", 0.05))
    img = Image.new("RGB", (640 * len(panels), 420), "white")
    for i, (key, label, pad) in enumerate(panels):
        img.paste(_panel(rows, key, label, pad), (640 * i, 0))
    img.save(path)


def _panel(rows: list[dict[str, Any]], key: str, label: str, pad: float):
    from PIL import Image, ImageDraw

    w, h, m = 640, 420, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    pts = [r for r in rows if r["name"] != "baseline"]
    xs = [r["wall_speedup"] for r in pts]
    ys = [r[key] for r in pts]
    if key != "psnr_db":  # the baseline's own value as a reference line
        ys.append(rows[0][key])
    x0, x1 = 1.0, max(xs) * 1.1
    y0, y1 = min(ys) - pad, max(ys) + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    d.line([(m, h - m), (w - m, h - m)], fill="black")
    d.line([(m, m), (m, h - m)], fill="black")
    d.text((w // 2 - 90, h - m + 25), "wall-clock speed-up over baseline", fill="black")
    d.text((5, m - 30), label, fill="black")
    d.text((m, h - m + 5), f"{x0:.1f}", fill="black")
    d.text((w - m - 20, h - m + 5), f"{x1:.1f}", fill="black")
    fmt = ".0f" if key == "psnr_db" else ".2f"
    d.text((5, m), f"{y1:{fmt}}", fill="black")
    d.text((5, h - m - 10), f"{y0:{fmt}}", fill="black")
    if key != "psnr_db":
        _, yb = at(x0, rows[0][key])
        d.line([(m, yb), (w - m, yb)], fill=(150, 150, 150))
        d.text((w - m - 60, yb - 12), "baseline", fill=(150, 150, 150))
    for r in pts:
        x, y = at(r["wall_speedup"], r[key])
        color = {"deepcache": (200, 60, 40), "dk": (30, 150, 60)}.get(
            r["name"].split(" ")[0], (40, 110, 200)
        )
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
        d.text((x + 6, y - 6), r["name"].replace("fd ", ""), fill=color)
    d.text((w - 330, 10), "blue: faster-diffusion  red: DeepCache  green: deep-cache", fill="black")
    return img


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=32, help="UNet base width (SD 1.5: 320)")
    ap.add_argument(
        "--model",
        choices=["random-sd15", "zoo"],
        default="random-sd15",
        help="random SD-1.5-layout UNet (default) or the trained zoo:shapes-sd",
    )
    ap.add_argument(
        "--prior-noise",
        type=float,
        default=None,
        help="prior-noise composed with the Faster-Diffusion arms (default: 0.003 for zoo, 0 otherwise)",
    )
    ap.add_argument("--out", default=None, help="output stem (.json and .png are written)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument(
        "--latent-size", type=int, default=32, help="random UNet: latent side (SD 1.5: 64)"
    )
    ap.add_argument(
        "--cross-dim", type=int, default=64, help="random UNet: text width (SD 1.5: 768)"
    )
    ap.add_argument("--batch", type=int, default=1, help="random UNet: prompts per call")
    ap.add_argument(
        "--arms",
        default=",".join(ARM_KINDS),
        help="comma-separated kinds of arm: fd (faster-diffusion), deepcache (the package), "
        "dk (decodekit's deep-cache); the baseline always runs",
    )
    args = ap.parse_args(argv)
    args.arms = tuple(a for a in args.arms.split(",") if a)
    if not args.arms or set(args.arms) - set(ARM_KINDS):
        ap.error(f"--arms takes a comma-separated subset of {','.join(ARM_KINDS)}")
    if args.out is None:
        stem = "faster_diffusion_vs_deepcache" + ("_zoo" if args.model == "zoo" else "")
        args.out = str(ROOT / "benchmarks/results/faster-diffusion/cpu-2core" / stem)
    return args


def deepcache_installed() -> bool:
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        print(
            "DeepCache is not installed; its arms are skipped. "
            "Install it with: .venv/bin/pip install DeepCache==0.1.1 (in the test extra)"
        )
        return False
    return True


def load(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The pipeline on the device and the prompts of every call."""
    if args.model == "zoo":
        pipe, prompts = zoo_pipeline(), zoo_prompts()
    else:
        pipe = sd15_shaped_pipeline(
            args.width, latent_size=args.latent_size, cross_dim=args.cross_dim
        )
        prompts = [
            "a red circle",
            "a big blue square on the left",
            "a small green triangle",
            "the red circle on top",
        ][: args.batch] * (1 + args.batch // 4)
        prompts = prompts[: args.batch]
    return pipe.to(args.device, getattr(torch, args.dtype)), prompts


def timed_rounds(pipe, todo: list[dict[str, Any]], prompts, args, run_kw) -> tuple[dict, dict]:
    """Warm every arm up, then time ``args.rounds`` rounds (baseline first, the others
    rotated): wall and UNet seconds per arm and round."""
    for arm in todo:
        run_arm(pipe, arm, prompts, min(args.steps, 5), 1, UNetTimer, **run_kw)
    wall: dict[str, list[float]] = {a["name"]: [] for a in todo}
    unet: dict[str, list[float]] = {a["name"]: [] for a in todo}
    others = todo[1:]
    for r in range(args.rounds):
        order = [todo[0]] + others[r % len(others) :] + others[: r % len(others)]
        for arm in order:
            _, fig = run_arm(pipe, arm, prompts, args.steps, 0, UNetTimer, **run_kw)
            wall[arm["name"]].append(fig["wall_s"])
            unet[arm["name"]].append(fig["meter"])
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    return wall, unet


def arm_row(name: str, outputs, flops, info, wall, unet) -> dict[str, Any]:
    """One arm's figures: speed-ups (median over rounds), FLOP ideal, PSNR to the baseline."""
    wall_ratio = statistics.median(b / a for b, a in zip(wall["baseline"], wall[name]))
    unet_ratio = statistics.median(b / a for b, a in zip(unet["baseline"], unet[name]))
    ideal = flops["baseline"] / flops[name]
    return {
        "name": name,
        "full_unet_calls": info[name]["full_calls"],
        "wall_s_median": statistics.median(wall[name]),
        "wall_speedup": wall_ratio,
        "unet_speedup": unet_ratio,
        "flop_ideal_speedup": ideal,
        "strategy_ideal_speedup": info[name].get("ideal_own"),
        "unet_speedup_over_ideal": unet_ratio / ideal,
        "psnr_db": psnr(outputs["baseline"], outputs[name]),
    }


def describe(args, argv, prompts, guidance, prior_noise, has_deepcache, rows) -> dict[str, Any]:
    """The result document: command, machine, pipeline, settings and the rows."""
    return {
        "command": "python benchmarks/faster_diffusion_vs_deepcache.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": (
            f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, {args.dtype}"
            if args.device.startswith("cuda")
            else f"{platform.machine()} CPU, torch threads {args.threads}, {platform.platform()}"
        ),
        "torch": torch.__version__,
        "pipeline": (
            f"zoo:shapes-sd, 32x32 images, DDIM-{args.steps}, CFG {guidance}, "
            f"batch {len(prompts)} (prompts of {ZOO_EXAMPLE.relative_to(ROOT)})"
            if args.model == "zoo"
            else f"random SD-1.5-layout UNet, width {args.width}, "
            f"{args.latent_size}x{args.latent_size} latents, text width {args.cross_dim}, "
            f"DDIM-{args.steps}, CFG {guidance}, batch {len(prompts)}, {args.dtype}"
        ),
        "model": args.model,
        "prior_noise_on_fd_arms": prior_noise,
        "prompts": prompts,
        "rounds": args.rounds,
        "deepcache": has_deepcache,
        "rows": rows,
    }


def print_tables(rows: list[dict[str, Any]], zoo: bool) -> None:
    print(
        f"{'arm':24} {'full':>4} {'wall x':>7} {'unet x':>7} {'ideal x':>7} {'unet/ideal':>10} {'PSNR':>7}"
    )
    for r in rows:
        print(
            f"{r['name']:24} {r['full_unet_calls']:>4} {r['wall_speedup']:>7.2f} {r['unet_speedup']:>7.2f} "
            f"{r['flop_ideal_speedup']:>7.2f} {r['unet_speedup_over_ideal']:>10.2f} {r['psnr_db']:>7.2f}"
        )
    if zoo:
        print(
            f"{'arm':24} {'adh base':>8} {'adh arm':>8} {'s+c base':>8} {'s+c arm':>8} "
            f"{'agree':>6} {'frechet':>8}"
        )
        for r in rows:
            print(
                f"{r['name']:24} {r['judge_adherence_baseline']:>8.3f} {r['judge_adherence_strategy']:>8.3f} "
                f"{r['judge_shape_colour_baseline']:>8.3f} {r['judge_shape_colour_strategy']:>8.3f} "
                f"{r['judge_agreement']:>6.3f} {r.get('judge_frechet_to_baseline', float('nan')):>8.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    zoo = args.model == "zoo"
    prior_noise = args.prior_noise if args.prior_noise is not None else (0.003 if zoo else 0.0)
    guidance = 3.0 if zoo else 7.5
    has_deepcache = deepcache_installed()
    pipe, prompts = load(args)
    todo = arms(has_deepcache, sequential=not zoo, kinds=args.arms)
    run_kw = {"guidance": guidance, "prior_noise": prior_noise}

    # Outputs and FLOPs, once per arm (not timed).
    outputs, flops, info = {}, {}, {}
    for arm in todo:
        images, fig = run_arm(pipe, arm, prompts, args.steps, 0, UNetFlops, **run_kw)
        outputs[arm["name"]], flops[arm["name"]], info[arm["name"]] = images, fig["meter"], fig
    wall, unet = timed_rounds(pipe, todo, prompts, args, run_kw)

    rows = []
    for arm in todo:
        rows.append(arm_row(arm["name"], outputs, flops, info, wall, unet))
        if zoo:
            from decodekit.pipelines.judges import shapes_judge_metric

            judged = shapes_judge_metric(
                "stable-diffusion",
                outputs["baseline"],
                outputs[arm["name"]],
                SimpleNamespace(prompt=prompts, num_images_per_prompt=1),
            )
            rows[-1].update(judged or {})
    result = describe(args, argv, prompts, guidance, prior_noise, has_deepcache, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print_tables(rows, zoo)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
