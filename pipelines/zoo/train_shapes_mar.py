"""Train `shapes-mar` and `shapes-mar-small`: class-conditional MAR models over shapes-sd's latents.

MAR ("Autoregressive Image Generation without Vector Quantization") at tiny scale, on
one-shape `shapes` renders (32x32) with the VAR zoo's classes, shape x colour (24:
``"red circle"`` ... ``"orange star"``; position and size are left to the model):

1. the renders are encoded once by shapes-sd's frozen ``AutoencoderKL`` into the moments of
   its posterior (mean and standard deviation of the 4x8x8 latents); as MAR does with its
   cached moments, every training step draws a fresh sample of the posterior and multiplies
   it by the VAE's ``scaling_factor`` (latents of unit standard deviation);
2. a `MARModel` (MAE-style encoder over the visible tokens and buffer class tokens, decoder
   over all of them, a small diffusion MLP head per token) learns MAR's objective: a random
   order per image, one masking ratio per batch drawn from a truncated normal on
   ``[mask_ratio_min, 1]`` centred at 1 with standard deviation 0.25, the head's diffusion
   loss on the masked tokens only, each repeated ``diffusion_batch_mul`` times with its own
   noise and timestep; classes dropped to the null class 10% of the time for classifier-free
   guidance; AdamW (betas 0.9/0.95, weight decay 0.02), linear warm-up then a constant rate
   (MAR's schedule), gradients clipped at 3, an EMA of the weights saved.

Output folders, as `MARPipeline.save_pretrained` writes them (``config.json``,
``model.safetensors``, the class names); ``vae`` is a link to shapes-sd's VAE folder (one
copy of its weights)::

    python -m decodekit.pipelines.zoo.train_shapes_mar train --size base \\
        --out pipelines/zoo/models/shapes-mar
    python -m decodekit.pipelines.zoo.train_shapes_mar train --size small \\
        --out pipelines/zoo/models/shapes-mar-small

``evaluate`` measures a folder (judge adherence of samples, Fréchet distance) and
``sweep`` tries guidance / temperature settings on the selection seeds::

    python -m decodekit.pipelines.zoo.train_shapes_mar evaluate shapes-mar --cfg 3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from decodekit.pipelines.mar import MARConfig, MARModel
from decodekit.pipelines.mar_pipeline import PIPELINE_FILE, MARPipeline
from decodekit.pipelines.zoo import zoo_path
from decodekit.pipelines.zoo.train_shapes_var import (
    CLASS_NAMES,
    LABEL_DROPOUT,
    VAR_EVAL_SEED,
    _folder,
    class_data,
    class_sample_report,
    selection_runner,
)
from decodekit.pipelines.zoo.training import earlier_runs, link_folder, write_training_record
from tqdm import tqdm

PATCH_SIZE = 2
"""Latent positions per token side: 4x8x8 latents -> 16 tokens of 16 numbers."""
OPERATING_POINT: dict[str, Any] = {
    "num_iter": 8,
    "cfg": 6.0,
    "cfg_schedule": "linear",
    "temperature": 1.0,
}
"""The sampling settings of the gates (chosen with ``sweep``; docs/zoo.md)."""
LATENT_CACHE_VERSION = 1


# --------------------------------------------------------------------------- stage 1: latents
@torch.no_grad()
def encode_moments(
    vae, images: torch.Tensor, batch_size: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and standard deviation of images in [-1, 1], unscaled: (N, 4, 8, 8) each."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        posterior = vae.encode(images[i : i + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_moments(
    vae_folder: Path, num_images: int, seed: int, cache: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior moments (float16 values, as float32) and class ids of ``class_data(num_images, seed)``.

    With `cache` (a ``.safetensors`` file), they are read from it when it was written for
    the same VAE weights and renders, else computed and written there in float16.
    """
    import hashlib

    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    weights = Path(vae_folder) / "diffusion_pytorch_model.safetensors"
    meta = {
        "vae_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "num_images": str(num_images),
        "seed": str(seed),
        "version": str(LATENT_CACHE_VERSION),
    }
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            same = f.metadata() == meta
        if same:
            data = load_file(str(cache))
            return data["mean"].float(), data["std"].float(), data["labels"]
    images, labels = class_data(num_images, seed)
    mean, std = encode_moments(AutoencoderKL.from_pretrained(vae_folder).eval(), images)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mean": mean.half().contiguous(),
            "std": std.half().contiguous(),
            "labels": labels,
        }
        save_file(tensors, str(cache), metadata=meta)
    # float16 precision with or without a cache, so a run does not depend on having one
    return mean.half().float(), std.half().float(), labels


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator: torch.Generator
) -> torch.Tensor:
    """A sample of the posterior, scaled as the model sees latents."""
    noise = torch.randn(mean.shape, generator=generator)
    return (mean + std * noise) * scaling_factor


# --------------------------------------------------------------------------- stage 2: MAR
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(
        encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
        decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
        diffloss_w=64, diffloss_d=2,
    ),
    "base": dict(
        encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
        diffloss_w=128, diffloss_d=3,
    ),
}  # fmt: skip
"""The zoo sizes: shapes-mar-small (the draft of speculative decoding) and shapes-mar."""


DIM_KEYS = (
    "encoder_embed_dim", "encoder_depth", "encoder_num_heads",
    "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "diffloss_w", "diffloss_d",
)  # fmt: skip
"""The MARConfig fields ``train`` takes as options (``--encoder-embed-dim`` ...), over ``--size``."""


def mar_config(size: str = "base", **overrides: Any) -> MARConfig:
    """A MAR over shapes-sd's 4x8x8 latents in 2x2 patches: 16 tokens of 16 numbers, 24 classes.

    Dropout is off (the renders are unlimited and training is short); four buffer tokens
    carry the class; the head samples with 100 DDPM steps, as MAR's default, but on the
    linear beta schedule: under MAR's cosine schedule (betas clipped at 0.999) the first
    respaced sampling step multiplies the head's noise error by about 350, which a briefly
    trained head cannot afford (its samples blow up to a standard deviation of hundreds).
    The masking ratio is MAR's truncated normal (mean 1, std 0.25) cut at 0.1 instead of
    0.7: at 0.7 no training row has more than 4 of the 16 tokens known, while sampling
    (MAR's cosine reveal schedule) draws most tokens with 5 to 13 known, and a small model
    does not carry over to them (its shapes come out in scattered fragments).
    Each token's loss is drawn once a step (``diffusion_batch_mul`` 1, the default of
    MAR's ``main_mar.py``): on a CPU the head's passes are most of a step's cost.
    """
    base = dict(
        img_size=32,
        vae_stride=4,
        patch_size=PATCH_SIZE,
        vae_embed_dim=4,
        class_num=len(CLASS_NAMES),
        buffer_size=4,
        label_drop_prob=LABEL_DROPOUT,
        mask_ratio_min=0.1,
        attn_dropout=0.0,
        proj_dropout=0.0,
        num_sampling_steps="100",
        diffusion_batch_mul=1,
        noise_schedule="linear",
    )
    return MARConfig(**{**base, **SIZES[size], **overrides})


def train_mar_model(
    model: MARModel,
    moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scaling_factor: float,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    lr: float = 1e-3,
    warmup: float = 0.05,
    ema_rate: float = 0.999,
    posterior: str = "sample",
    max_seconds: float | None = None,
    stop_after: int | None = None,
) -> tuple[MARModel, list[float], int]:
    """MAR's training (`MARModel.training_loss`).

    AdamW (betas 0.9/0.95, weight decay 0.02) at `lr` after a linear warm-up over the first
    `warmup` of the steps, then constant (MAR's schedule); gradients clipped at 3; the EMA's
    rate ramps up as ``(1 + step) / (10 + step)`` to `ema_rate`. With `max_seconds`,
    training stops after the step that passes that much time; with `stop_after`, after
    that many steps (the warm-up still spans `steps`, so a run cut short by time is
    replayed step for step by its step count). Returns the EMA model, the mean loss every
    100 steps and the steps taken.
    """
    started = time.time()
    mean, std, labels = moments
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    warm = max(1, round(steps * warmup))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    losses, window = [], []
    bar = tqdm(range(steps), desc=f"mar-{model.config.encoder_embed_dim}", mininterval=30)
    done = 0
    for step in bar:
        if max_seconds is not None and time.time() - started > max_seconds:
            break
        if stop_after is not None and step >= stop_after:
            break
        rows = torch.randint(0, len(labels), (batch_size,), generator=generator)
        if posterior == "sample":
            latents = sample_latents(mean[rows], std[rows], scaling_factor, generator)
        else:
            latents = mean[rows] * scaling_factor
        loss = model.training_loss(model.patchify(latents), labels[rows], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        schedule.step()
        rate = min(ema_rate, (1 + step) / (10 + step))
        with torch.no_grad():
            for p, q in zip(model.parameters(), ema.parameters()):
                q.lerp_(p, 1 - rate)
        window.append(loss.item())
        done = step + 1
        if done % 100 == 0 or done == steps:
            losses.append(round(sum(window) / len(window), 4))
            window = []
        bar.set_postfix(loss=f"{loss.item():.4f}")
    if window:
        losses.append(round(sum(window) / len(window), 4))
    model.eval()
    return ema, losses, done


def train_mar(
    out: Path,
    size: str = "base",
    *,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 1e-3,
    init_from: Path | None = None,
    num_images: int = 20000,
    seed: int = 0,
    vae_folder: Path | None = None,
    latent_cache: Path | None = None,
    posterior: str = "sample",
    max_minutes: float | None = None,
    stop_after: int | None = None,
    measure: bool = True,
    command: str | None = None,
    **dims: Any,
) -> Path:
    """Train a MAR of `size` (or `dims` overriding it) and save the pipeline folder to `out`.

    With `init_from` (a mar folder), training continues from that folder's model (its
    config is kept; `size` and `dims` are then ignored).
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    started = time.time()
    vae_folder = Path(vae_folder or zoo_path("shapes-sd") / "vae")
    scaling_factor = AutoencoderKL.load_config(vae_folder)["scaling_factor"]
    moments = latent_moments(vae_folder, num_images, seed, latent_cache)
    encode_seconds = round(time.time() - started, 1)
    if init_from is not None:
        model = MARModel.from_pretrained(Path(init_from) / "model").train().requires_grad_(True)
    else:
        model = MARModel(mar_config(size, **dims))
    ema, losses, done = train_mar_model(
        model,
        moments,
        scaling_factor,
        steps,
        batch_size,
        generator,
        lr=lr,
        posterior=posterior,
        max_seconds=None if max_minutes is None else 60 * max_minutes,
        stop_after=stop_after,
    )
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out / "model")
    (out / PIPELINE_FILE).write_text(json.dumps({"class_names": CLASS_NAMES}, indent=1) + "\n")
    link_folder(out / "vae", vae_folder)  # one copy of shapes-sd's VAE
    gates = evaluate_mar(out) if measure else {}
    config = ema.config
    write_training_record(
        out,
        started,
        earlier_runs=earlier_runs(init_from),
        command=command
        or f"python -m decodekit.pipelines.zoo.train_shapes_mar train --size {size} --out {out}",
        seed=seed,
        size=size if init_from is None else None,
        parameters=sum(p.numel() for p in ema.parameters()),
        head_parameters=sum(p.numel() for p in ema.diffloss.parameters()),
        model={k: v for k, v in config.to_dict().items() if k != "grad_checkpointing"},
        tokens_per_image=config.seq_len,
        steps=done,
        steps_asked=steps,
        max_minutes=max_minutes,
        stop_after=stop_after,
        num_images=num_images,
        batch_size=batch_size,
        lr=lr,
        schedule="AdamW (0.9, 0.95), weight decay 0.02, 5% linear warm-up then constant, "
        "clip 3, EMA 0.999",
        posterior=posterior,
        init_from=str(init_from) if init_from is not None else None,
        encode_seconds=encode_seconds,
        losses=losses,
        gates=gates,
    )
    return out


# --------------------------------------------------------------------------- evaluation
def evaluate_mar(
    folder: str | Path = "shapes-mar",
    num_images: int = 240,
    judge: Any = None,
    pipe: MARPipeline | None = None,
    seed: int = VAR_EVAL_SEED,
    **sampling: Any,
) -> dict[str, Any]:
    """Class adherence of `num_images` samples (10 a class) and their Fréchet distance to renders.

    As the VAR zoo measures it (`train_shapes_var.evaluate_var`): sample i is class i mod 24
    with generator seed ``seed + i``; ``sampling`` (num_iter, cfg, cfg_schedule,
    temperature) defaults to `OPERATING_POINT`.
    """
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    judge = judge or ShapesJudge.load()
    pipe = pipe or MARPipeline.from_pretrained(_folder(folder))
    sampling = {**OPERATING_POINT, **sampling}
    return class_sample_report(pipe, judge, num_images, seed, batch_size=120, **sampling)


def sweep(folder: str | Path, num_images: int = 240) -> list[dict[str, Any]]:
    """Guidance 1..6 at temperature 1, then temperature, constant guidance and 16 steps at the best.

    Measured on the selection samples (generator seeds from 60000), not the gate's.
    """
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    judge, pipe = ShapesJudge.load(), MARPipeline.from_pretrained(_folder(folder))
    run = selection_runner(evaluate_mar, judge, pipe, num_images)
    rows = [run(cfg=cfg, temperature=1.0) for cfg in (1.0, 2.0, 3.0, 4.0, 6.0)]
    best = max(rows, key=lambda r: r["adherence_class"])["cfg"]
    for temperature in (0.7, 0.85, 1.15):
        rows.append(run(cfg=best, temperature=temperature))
    rows.append(run(cfg=best, temperature=1.0, cfg_schedule="constant"))
    rows.append(run(cfg=best, temperature=1.0, num_iter=16))
    return rows


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    """Command line: ``train``, ``evaluate`` or ``sweep``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    train = sub.add_parser("train", help="train a class-conditional MAR over shapes-sd's latents")
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--size", choices=sorted(SIZES), default="base")
    for dim in DIM_KEYS:
        train.add_argument("--" + dim.replace("_", "-"), type=int, default=None)
    train.add_argument("--steps", type=int, default=4000)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--init-from", type=Path, default=None, help="continue from a mar folder")
    train.add_argument("--num-images", type=int, default=20000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae", type=Path, default=None, help="default: shapes-sd's vae/")
    train.add_argument(
        "--latent-cache", type=Path, default=None, help="a .safetensors file for the moments"
    )
    train.add_argument(
        "--posterior",
        choices=("sample", "mean"),
        default="sample",
        help="train on a fresh sample of the VAE posterior every step (MAR) or on its mean",
    )
    train.add_argument(
        "--max-minutes", type=float, default=None, help="stop training after this long"
    )
    train.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many steps, the warm-up still spanning --steps (replays a run "
        "that --max-minutes cut short: give its recorded steps)",
    )
    train.add_argument("--no-measure", action="store_true", help="skip the gates at the end")
    for name in ("evaluate", "sweep"):
        p = sub.add_parser(name, help=f"{name} a mar folder or zoo name; prints JSON")
        p.add_argument("model", help="zoo name (shapes-mar) or folder")
        p.add_argument("--num-images", type=int, default=240)
        if name == "evaluate":
            p.add_argument("--seed", type=int, default=VAR_EVAL_SEED)
            for key, value in OPERATING_POINT.items():
                kind = str if isinstance(value, str) else type(value)
                p.add_argument("--" + key.replace("_", "-"), type=kind, default=value)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(
        ["python -m decodekit.pipelines.zoo.train_shapes_mar", *(argv or sys.argv[1:])]
    )
    if args.stage == "train":
        given = ("steps", "batch_size", "lr", "init_from", "num_images", "seed", "posterior")
        given += ("max_minutes", "stop_after")
        settings = {k: getattr(args, k) for k in given}
        dims = {k: getattr(args, k) for k in DIM_KEYS if getattr(args, k) is not None}
        train_mar(
            args.out,
            args.size,
            vae_folder=args.vae,
            latent_cache=args.latent_cache,
            measure=not args.no_measure,
            command=command,
            **settings,
            **dims,
        )
    elif args.stage == "sweep":
        print(json.dumps(sweep(args.model, args.num_images), indent=1))
    else:
        sampling = {k: getattr(args, k) for k in OPERATING_POINT}
        row = evaluate_mar(args.model, args.num_images, seed=args.seed, **sampling)
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
