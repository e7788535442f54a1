"""Every feature cache on one pipeline: decodekit's points against other packages', one Pareto chart.

On a UNet pipeline (``--model shapes-sd``, or ``random-sd15``: Stable Diffusion
1.5's UNet layout at ``--width``) decodekit's points are ``deep-cache`` intervals
(sequential and with ``parallel``), ``faster-diffusion`` schedules and diffusers'
Pyramid Attention Broadcast through decodekit; the peers are the DeepCache package
(``DeepCacheSDHelper``) and diffusers' PAB applied by hand. On a diffusion
transformer (``--model shapes-dit``, a Flux-shaped DiT, or ``random-sd3``: SD3's
transformer at ``--width``/``--layers``) decodekit's points are diffusers' caches
through decodekit (first-block-cache thresholds, taylorseer-cache, faster-cache,
mag-cache where the model has calibrated ratios, pyramid-attention-broadcast); the
peers are the same diffusers caches applied by hand (``enable_cache``) and the
cache-dit package's DBCache at several ``residual_diff_threshold`` /
``Bn_compute_blocks`` settings (``pip install 'decodekit[peers]'``). cache-dit
refuses UNet pipelines, and a peer whose package is missing is left out; the
result says which and why.

Every point runs against one baseline in rotating pairs in one process
(`decodekit.sweep.pareto_bench`): speed-up is the median over pairs of the
baseline's time over the point's, fidelity the zoo judge's Fréchet distance to
the baseline's images (16 prompts or more), else the PSNR to them. The table
(``.md``), the chart (``.png``, decodekit's points circles, the peers' squares,
dominated points hollow) and the raw result (``.json``, with ``uptime`` before and
after) go to ``--out``.

    .venv/bin/python benchmarks/feature_caches.py --model shapes-sd --repeat 3
    .venv/bin/python benchmarks/feature_caches.py --model shapes-dit --repeat 7

On a GPU at SD 1.5 / SD3 widths (random weights, tiny text encoders and VAE):

    python benchmarks/feature_caches.py --model random-sd15 --width 320 --latent-size 64 \\
        --device cuda --dtype float16
    python benchmarks/feature_caches.py --model random-sd3 --width 1536 --layers 24 \\
        --latent-size 128 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.faster_diffusion_vs_deepcache, tests.tiny

from decodekit.sweep import Arm, ArmUnavailable  # noqa: E402

UNET_MODELS = ("shapes-sd", "random-sd15")
MODELS = UNET_MODELS + ("shapes-dit", "random-sd3")
SD_EXAMPLE = ROOT / "examples/deep-cache.yaml"  # 16 prompts, DDIM-50, guidance 3.0
DIT_EXAMPLE = ROOT / "examples/first-block-cache.yaml"  # Flux, 28 steps, true CFG 3.0
CACHE_DIT_SETTINGS = [  # (residual_diff_threshold, Bn_compute_blocks); Fn_compute_blocks 1
    (0.08, 0),
    (0.12, 0),
    (0.2, 0),
    (0.3, 0),
    (0.08, 1),
    (0.2, 1),
]


# -- the baseline ------------------------------------------------------------------------------
def base_config(args: argparse.Namespace, model_dir: Path | None) -> dict[str, Any]:
    """The baseline run: a zoo example's pipeline and inputs, or a random pipeline saved in ``model_dir``."""
    doc = yaml.safe_load(SD_EXAMPLE.read_text())
    if args.model in ("shapes-dit", "random-sd3"):
        dit = yaml.safe_load(DIT_EXAMPLE.read_text())
        # the 16 prompts of the SD example: the judge's Fréchet distance needs 16 images
        doc = {**dit, "inputs": {**dit["inputs"], "prompt": doc["inputs"]["prompt"]}}
    doc.pop("strategies", None)
    doc["pipeline"].update(device=args.device, dtype=args.dtype)
    if model_dir is not None:
        doc["pipeline"]["model"] = str(model_dir)
        doc["inputs"]["prompt"] = doc["inputs"]["prompt"][: args.prompts]
        if args.model == "random-sd3":
            doc["inputs"].pop("extra", None)  # SD3: classifier-free guidance as a doubled batch
            doc["inputs"].pop("negative_prompt", None)
            doc["inputs"].pop("height", None)  # the transformer's sample size decides
            doc["inputs"].pop("width", None)
            doc["inputs"]["guidance_scale"] = 3.0
    if args.steps:
        doc["inputs"]["num_inference_steps"] = args.steps
    doc["bench"] = {"repeat": args.repeat, "warmup": 1}
    doc["output"] = {"dir": str(Path(tempfile.gettempdir()) / "feature-caches-out")}
    return doc


def save_random_pipeline(args: argparse.Namespace, folder: Path) -> Path:
    """A random pipeline at ``--width`` saved as a diffusers folder (decodekit loads it as any model)."""
    import torch

    if args.model == "random-sd15":
        from benchmarks.faster_diffusion_vs_deepcache import sd15_shaped_pipeline

        pipe = sd15_shaped_pipeline(args.width, latent_size=args.latent_size, cross_dim=64)
    else:
        pipe = sd3_shaped_pipeline(args.width, args.layers, args.latent_size)
    pipe.to(dtype=getattr(torch, args.dtype)).save_pretrained(folder)
    return folder


def sd3_shaped_pipeline(width: int, layers: int, latent_size: int):
    """A random StableDiffusion3Pipeline whose transformer has SD3's layout at ``width`` (SD3
    medium: 1536 = 24 heads of 64, 24 layers, 2x2 patches); tiny text encoders and VAE."""
    from decodekit.testing import tiny_sd3_pipeline
    from diffusers import SD3Transformer2DModel

    pipe = tiny_sd3_pipeline()
    heads = max(1, width // 64)
    pipe.transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=4,
        num_layers=layers,
        attention_head_dim=width // heads,
        num_attention_heads=heads,
        joint_attention_dim=64,  # the tiny T5's width
        caption_projection_dim=width,
        pooled_projection_dim=64,  # the two tiny CLIP projections together
        out_channels=4,
        pos_embed_max_size=latent_size // 2,
    )
    return pipe


# -- decodekit's points ------------------------------------------------------------------------
def decodekit_arms(model: str) -> list[Arm]:
    """decodekit's points on this model: each a list of strategies."""

    def arm(label: str, *specs: tuple[str, dict[str, Any]]) -> Arm:
        return Arm(label, [{"name": n, "params": p} for n, p in specs])

    if model in UNET_MODELS:
        return [
            *(arm(f"deep-cache {n}", ("deep-cache", {"interval": n})) for n in (2, 3, 5)),
            *(
                arm(f"deep-cache {n} parallel", ("deep-cache", {"interval": n, "parallel": True}))
                for n in (3, 5)
            ),
            *(
                arm(f"faster-diffusion {k}", ("faster-diffusion", {"key_steps": k}))
                for k in ("paper", "uniform-3")
            ),
            arm(
                "faster-diffusion paper + prior-noise",
                ("faster-diffusion", {"key_steps": "paper"}),
                ("prior-noise", {"prior_noise": 0.003}),
            ),
            arm("pyramid-attention-broadcast", ("pyramid-attention-broadcast", PAB)),
        ]
    arms = [arm(f"first-block-cache {t}", ("first-block-cache", {"threshold": t})) for t in FBC]
    if model == "random-sd3":  # recorded as not run, with the reason
        arms = [Arm("first-block-cache", apply=refuse(FBC_ON_SD3))]
    arms += [
        arm("taylorseer-cache", ("taylorseer-cache", TAYLORSEER)),
        arm("pyramid-attention-broadcast", ("pyramid-attention-broadcast", PAB_DIT)),
    ]
    if model == "shapes-dit":  # the example's ratios are this checkpoint's own
        example = yaml.safe_load((ROOT / "examples/mag-cache.yaml").read_text())
        arms.append(arm("mag-cache", ("mag-cache", example["strategies"][0]["params"])))
        arms.append(arm("faster-cache", ("faster-cache", FASTER_CACHE_FLUX)))
    return arms


FBC = (0.05, 0.1, 0.2)
FBC_ON_SD3 = (
    "first-block-cache refuses SD3: its last block returns no encoder states "
    "(context_pre_only), which diffusers' first-block cache subtracts from (by hand it fails "
    "at the first call, first_block_cache.py:176)"
)
PAB = {  # examples/pyramid-attention-broadcast.yaml
    "spatial_attention_block_skip_range": 2,
    "cross_attention_block_skip_range": 4,
    "spatial_attention_timestep_skip_range": [100, 800],
    "cross_attention_timestep_skip_range": [100, 800],
}
PAB_DIT = {
    "spatial_attention_block_skip_range": 2,
    "spatial_attention_timestep_skip_range": [100, 800],
}
TAYLORSEER = {  # examples/taylorseer-cache.yaml
    "cache_interval": 5,
    "disable_cache_before_step": 3,
    "max_order": 1,
    "taylor_factors_dtype": "float32",
}
FASTER_CACHE_FLUX = {  # examples/faster-cache.yaml
    "is_guidance_distilled": True,
    "spatial_attention_block_skip_range": 2,
    "spatial_attention_timestep_skip_range": [-1, 681],
}


def refuse(reason: str):
    """An arm's ``apply`` that leaves it out of the bench with ``reason``."""

    def apply(pipe: Any):
        raise ArmUnavailable(reason)

    return apply


# -- the peers ---------------------------------------------------------------------------------
def denoiser_of(pipe: Any) -> Any:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def deepcache_arm(interval: int, steps: int) -> Arm:
    """The DeepCache package's ``DeepCacheSDHelper`` at ``interval``, branch 0."""

    def apply(pipe: Any):
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError:
            raise ArmUnavailable(
                "DeepCache is not installed (pip install DeepCache==0.1.1)"
            ) from None
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=0)
        helper.enable()

        def undo() -> dict[str, Any]:
            helper.disable()
            return {
                "nfe": len(range(0, steps, interval))
            }  # the UNet in full every interval-th step

        return undo

    return Arm(f"DeepCache {interval}", apply=apply, by="DeepCache 0.1.1")


def diffusers_arm(label: str, make_config) -> Arm:
    """One of diffusers' caches applied by hand, as its documentation shows.

    ``make_config(current_timestep)`` builds the config; PAB and FasterCache read
    the timestep through that callback: the pipeline's ``current_timestep`` where it
    has one (Flux), else the timestep the denoiser was last called with (read in a
    forward pre-hook, the caller's job on SD 1.5 and SD3). Models with diffusers'
    ``CacheMixin`` get ``enable_cache``/``disable_cache``; others the ``apply_*``
    function and ``HookRegistry.remove_hook``.
    """

    def apply(pipe: Any):
        import diffusers.hooks as dh
        from diffusers.models.cache_utils import CacheMixin

        denoiser = denoiser_of(pipe)
        seen: dict[str, float] = {}

        def record(module, args, kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            seen["t"] = float(t.flatten()[0]) if hasattr(t, "flatten") else float(t)

        if hasattr(type(pipe), "current_timestep"):
            config = make_config(lambda: pipe.current_timestep)
        else:
            config = make_config(lambda: seen["t"])
        stateful = isinstance(config, (dh.FirstBlockCacheConfig, dh.TaylorSeerCacheConfig))
        if stateful and not isinstance(denoiser, CacheMixin):
            raise ArmUnavailable(
                f"diffusers' {type(config).__name__} keeps state per cache context, and "
                f"{type(denoiser).__name__} has no cache_context nor a pipeline that resets it"
            )
        handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
        if isinstance(denoiser, CacheMixin):
            denoiser.enable_cache(config)
            remove = denoiser.disable_cache
        else:  # PAB on a UNet or SD3: diffusers' function, its hook removed by name
            dh.apply_pyramid_attention_broadcast(denoiser, config)

            def remove() -> None:
                from diffusers.hooks.pyramid_attention_broadcast import (
                    _PYRAMID_ATTENTION_BROADCAST_HOOK,
                )

                registry = dh.HookRegistry.check_if_exists_or_initialize(denoiser)
                registry.remove_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK, recurse=True)

        def undo() -> None:
            remove()
            handle.remove()

        return undo

    return Arm(label, apply=apply, by="diffusers (by hand)")


def diffusers_peers(model: str) -> list[Arm]:
    import diffusers.hooks as dh
    import torch

    def pab(params):
        def make(cb):
            return dh.PyramidAttentionBroadcastConfig(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in params.items()},
                current_timestep_callback=cb,
            )

        return make

    if model in UNET_MODELS:
        return [diffusers_arm("diffusers PAB", pab(PAB))]
    arms = [
        diffusers_arm(f"diffusers FBC {t}", lambda cb, t=t: dh.FirstBlockCacheConfig(threshold=t))
        for t in (FBC if model != "random-sd3" else ())
    ]
    taylor = {**TAYLORSEER, "taylor_factors_dtype": torch.float32}
    arms.append(
        diffusers_arm("diffusers TaylorSeer", lambda cb: dh.TaylorSeerCacheConfig(**taylor))
    )
    arms.append(diffusers_arm("diffusers PAB", pab(PAB_DIT)))
    return arms


def cache_dit_arm(threshold: float, bn: int, steps: int, separate_cfg: bool) -> Arm:
    """cache-dit's DBCache (``cache_dit.enable_cache``): the first block always, the last ``bn``
    always, the rest reused while the first block's residual changes by less than ``threshold``;
    cache-dit's own warm-up (8 steps) and defaults otherwise."""
    copies: dict[int, Any] = {}

    def apply(pipe: Any):
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
        try:
            import cache_dit
        except ImportError:
            raise ArmUnavailable(
                "cache-dit is not installed (pip install 'decodekit[peers]')"
            ) from None
        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=1,
            Bn_compute_blocks=bn,
            residual_diff_threshold=threshold,
            num_inference_steps=steps,
            enable_separate_cfg=separate_cfg,
        )
        # cache-dit runs on its own copy of the denoiser (same weights): after its
        # disable_cache, diffusers' first-block cache applied to the same transformer fails
        # (TypeError in first_block_cache.py), even with every attribute cache-dit left put back
        name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        original = getattr(pipe, name)
        if id(original) not in copies:
            copies[id(original)] = copy.deepcopy(original)
        setattr(pipe, name, copies[id(original)])
        try:
            cache_dit.enable_cache(pipe, cache_config=config)
        except ValueError as e:  # "... is not officially supported by cache-dit"
            setattr(pipe, name, original)
            raise ArmUnavailable(f"cache-dit refuses this pipeline: {e}") from None

        def undo() -> dict[str, Any]:
            stats = cache_dit.summary(pipe, logging=False)
            cache_dit.disable_cache(pipe)
            setattr(pipe, name, original)
            # one entry per cached block list; each counts the whole call
            cached = max(len(s.cached_steps or []) + len(s.cfg_cached_steps or []) for s in stats)
            per_step = 2 if separate_cfg else 1  # cond and uncond calls, or one batched call
            executed = max((s.accumulated_executed_steps or 0) * per_step for s in stats)
            return {"transformer_calls": executed, "cached_calls": cached, "nfe": executed - cached}

        return undo

    label = f"cache-dit F1B{bn} {threshold}"
    return Arm(label, apply=apply, by="cache-dit", params={"threshold": threshold, "Bn": bn})


def peer_arms(model: str, steps: int, separate_cfg: bool) -> list[Arm]:
    arms = diffusers_peers(model)
    if model in UNET_MODELS:
        arms = [deepcache_arm(n, steps) for n in (2, 3, 5)] + arms
        # cache-dit refuses UNet pipelines; one arm says so in the result
        return arms + [cache_dit_arm(0.08, 0, steps, separate_cfg)]
    return arms + [cache_dit_arm(t, bn, steps, separate_cfg) for t, bn in CACHE_DIT_SETTINGS]


# -- the run -----------------------------------------------------------------------------------
def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def verdict(result: dict[str, Any]) -> str:
    """Whether some decodekit point is dominated by no peer point (the bench's question)."""
    points = result["points"]
    peers = [p for p in points if p["by"] != "decodekit"]
    from decodekit.sweep import mark_dominated

    kept = []
    for p in [p for p in points if p["by"] == "decodekit"]:
        trial = [dict(q) for q in peers] + [dict(p)]
        mark_dominated(trial)
        if not trial[-1]["dominated"]:
            kept.append(p["label"])
    if kept:
        return "decodekit points that no peer point dominates: " + ", ".join(kept)
    return "every decodekit point is dominated by some peer point"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="shapes-sd")
    ap.add_argument("--repeat", type=int, default=3, help="baseline/point pairs (rotating)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the example's)"
    )
    ap.add_argument(
        "--width", type=int, default=32, help="random models: width (SD 1.5 320, SD3 1536)"
    )
    ap.add_argument(
        "--layers", type=int, default=2, help="random-sd3: transformer layers (SD3: 24)"
    )
    ap.add_argument("--latent-size", type=int, default=16, help="random models: latent side")
    ap.add_argument("--prompts", type=int, default=16, help="random models: prompts per call")
    ap.add_argument("--no-peers", action="store_true", help="decodekit's points only")
    ap.add_argument("--out", default=None, help="output stem (.json, .md, .png)")
    args = ap.parse_args(argv)
    if args.out is None:
        where = "cpu-2core" if args.device == "cpu" else args.device
        args.out = str(ROOT / "benchmarks/results/feature-caches" / where / args.model)
    return args


def main(argv: list[str] | None = None) -> int:
    import torch
    from decodekit.config import load_config
    from decodekit.sweep import pareto_bench

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = uptime()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = None
        if args.model.startswith("random"):
            model_dir = save_random_pipeline(args, Path(tmp) / args.model)
        doc = base_config(args, model_dir)
        config = load_config(doc)
        steps = config.inputs.num_inference_steps
        separate_cfg = float((config.inputs.extra or {}).get("true_cfg_scale", 1.0)) > 1.0
        arms = decodekit_arms(args.model)
        if not args.no_peers:
            arms += peer_arms(args.model, steps, separate_cfg)
        out = Path(args.out)
        result = pareto_bench(
            config,
            arms,
            what="feature caches, decodekit's points and other packages'",
            json_path=out.with_suffix(".json"),
            png_path=out.with_suffix(".png"),
            markdown_path=out.with_suffix(".md"),
            label=args.model,
        )
    result["command"] = "python benchmarks/feature_caches.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    result["load"] = {"before": load_before, "after": uptime()}
    result["verdict"] = verdict(result)
    from decodekit.bench import write_json

    write_json(result, out.with_suffix(".json"))
    with out.with_suffix(".md").open("a") as f:
        f.write(f"\nLoad: {load_before} (before); {result['load']['after']} (after).\n")
        f.write(f"\n{result['verdict']}.\n")
    print(out.with_suffix(".md").read_text())
    print(json.dumps({"wrote": [str(out.with_suffix(s)) for s in (".json", ".md", ".png")]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
