"""Train `shapes-msvq` and two class-conditional VAR models (`shapes-var-d6`, `shapes-var-d3`).

Three seeded stages on one-shape `shapes` renders (32x32), classes = shape x colour
(24: ``"red circle"`` ... ``"orange star"``; position and size are left to the model):

1. ``shapes-msvq``: VAR's multi-scale residual VQ-VAE (`MultiScaleVQVAE`, token maps of
   sides ``(1, 2, 3, 4, 6, 8)`` over an 8x8 feature map, a codebook of 128 vectors of
   width 16). VAR's quantiser loss at tiny scale: pixel MSE of the reconstruction from the
   straight-through ``f_hat``, plus, averaged over the scales, the codebook term
   ``|f_hat - sg(f)|^2`` and ``beta = 0.25`` times the commitment term ``|sg(f_hat) - f|^2``
   (VAR's ``VectorQuantizer2.forward``); no perceptual or GAN loss. Codes unused over 100
   steps are re-seeded from the vectors being quantised during the first half of training.
2. the token maps of every render, encoded once by the trained VQ-VAE;
3. two `VARTransformer` of different depth over them (teacher-forced cross-entropy,
   classes dropped to the null class 10% of the time for guidance): width
   ``16 * depth`` in heads 16 wide (VAR's rule is ``64 * depth`` in heads 64 wide; both keep
   the width proportional to the depth), VAR's initialisation (`var_init`). The large
   one is trained at width 48 and then widened (``--widen-from``, `widen_var`); the small
   one, CoDe's refiner, only on the scales it makes (``--loss-from-scale 3``).
   ``--token-cache`` keeps the encoded token maps in a file between runs.

Output folders, as `VARPipeline.save_pretrained` writes them (``transformer/``, ``vq/``,
``var.json`` with the class names); the VQ-VAE is stored once in ``shapes-msvq/`` and the
two VAR folders' ``vq`` are links to it::

    python -m decodekit.pipelines.zoo.train_shapes_var vq --out pipelines/zoo/models/shapes-msvq
    python -m decodekit.pipelines.zoo.train_shapes_var var --depth 6 --widen-from FOLDER \\
        --vq pipelines/zoo/models/shapes-msvq --out pipelines/zoo/models/shapes-var-d6
    python -m decodekit.pipelines.zoo.train_shapes_var var --depth 3 --loss-from-scale 3 \\
        --vq pipelines/zoo/models/shapes-msvq --out pipelines/zoo/models/shapes-var-d3

(docs/zoo.md has every run's command.)

``evaluate`` measures a folder (judge adherence of samples, Fréchet distance) and
``sweep`` tries guidance / top-k / temperature settings::

    python -m decodekit.pipelines.zoo.train_shapes_var evaluate shapes-var-d6 --cfg 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from decodekit.pipelines.var import VARPipeline, VARTransformer
from decodekit.pipelines.var_vq import MultiScaleVQConfig, MultiScaleVQVAE
from decodekit.pipelines.zoo.shapes_data import COLOUR_NAMES, SHAPES, sample_shapes
from decodekit.pipelines.zoo.training import link_folder, write_training_record
from tqdm import tqdm

PATCH_NUMS = (1, 2, 3, 4, 6, 8)
CLASS_NAMES = [f"{colour} {shape}" for shape in SHAPES for colour in COLOUR_NAMES]
"""Class ``SHAPES.index(shape) * 6 + COLOUR_NAMES.index(colour)``: ``"red circle"`` is 0."""
LABEL_DROPOUT = 0.1
VQ_EVAL_SEED = 40_000  # held-out renders for the VQ-VAE's reconstructions (as shapes-vq)
VAR_EVAL_SEED = 50_000  # sample i of an evaluation uses generator seed VAR_EVAL_SEED + i
VAR_SELECT_SEED = 60_000  # the sweep's samples, that choose the operating point
REAL_EVAL_SEED = 20_000  # the renders the samples' Fréchet distance is measured against
WIDTH_PER_BLOCK = 16
"""A VAR's width is ``WIDTH_PER_BLOCK * depth`` (VAR's rule is 64 * depth)."""
OPERATING_POINT = {"cfg": 1.0, "top_k": None, "temperature": 0.6}
"""The sampling settings of the gates (chosen with ``sweep``; docs/zoo.md)."""


def class_of(shape: str, colour: str) -> int:
    """The class id of a shape and colour."""
    return SHAPES.index(shape) * len(COLOUR_NAMES) + COLOUR_NAMES.index(colour)


def class_data(num_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shape renders (N, 3, 32, 32) in [-1, 1] and their class ids (N,)."""
    images, scenes = sample_shapes(num_images, seed=seed, two_shape_fraction=0.0)
    labels = torch.tensor([class_of(s.objects[0].shape, s.objects[0].colour) for s in scenes])
    return images.float() / 127.5 - 1.0, labels


def vq_config(vocab_size: int = 128, z_channels: int = 16) -> MultiScaleVQConfig:
    """The shapes-msvq layout: widths 32/32/64 (downsampling 4), one residual block a level."""
    return MultiScaleVQConfig(
        vocab_size=vocab_size,
        z_channels=z_channels,
        ch=32,
        ch_mult=(1, 1, 2),
        num_res_blocks=1,
        v_patch_nums=PATCH_NUMS,
        share_quant_resi=4,
        quant_resi=0.5,
        test_mode=False,
    )


# --------------------------------------------------------------------------- stage 1: VQ-VAE
def quantise_for_training(
    vq: MultiScaleVQVAE, f: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """VAR's training pass of the quantiser over features ``f`` (B, C, pn_K, pn_K).

    Returns the straight-through ``f_hat`` (its gradient goes to ``f``), the VQ loss
    (codebook + ``beta`` x commitment, averaged over the scales), the token maps, and the
    vectors that were quantised (for re-seeding dead codes).
    """
    beta = vq.config.beta
    f_ng = f.detach()
    rest, f_hat = f_ng, torch.zeros_like(f_ng)
    last = len(vq.patch_nums) - 1
    loss = f.new_zeros(())
    idx, seen = [], []
    for si, pn in enumerate(vq.patch_nums):
        z = rest if si == last else F.interpolate(rest, size=(pn, pn), mode="area")
        flat = z.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        with torch.no_grad():
            ids = vq.quantize.nearest(flat).view(f.shape[0], pn * pn)
        h = vq._scale_contribution(si, vq._token_map(ids, pn))
        f_hat = f_hat + h
        rest = rest - h.detach()
        loss = loss + F.mse_loss(f_hat, f_ng) + beta * F.mse_loss(f_hat.detach(), f)
        idx.append(ids)
        seen.append(flat)
    return (f_hat.detach() - f_ng) + f, loss / len(vq.patch_nums), idx, torch.cat(seen)


def train_vq(
    vq: MultiScaleVQVAE,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    lr: float = 2e-3,
) -> dict[str, list[float]]:
    """Fit the VQ-VAE; returns the reconstruction and VQ losses every 100 steps."""
    vq.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vq.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=max(steps, 1), pct_start=0.05
    )
    codebook = vq.quantize.embedding.weight
    usage = torch.zeros(len(codebook))
    record: dict[str, list[float]] = {"recon_mse": [], "vq_loss": [], "codes_used": []}
    bar = tqdm(range(steps), desc="msvq", mininterval=10)
    for step in bar:
        x = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        f = vq.quant_conv(vq.encoder(x))
        f_hat, vq_loss, idx, seen = quantise_for_training(vq, f)
        recon = vq.decoder(vq.post_quant_conv(f_hat))
        mse = F.mse_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        (mse + vq_loss).backward()
        optimizer.step()
        schedule.step()
        usage += torch.bincount(torch.cat(idx, 1).flatten(), minlength=len(codebook))
        if (step + 1) % 100 == 0 or step + 1 == steps:
            record["recon_mse"].append(round(mse.item(), 5))
            record["vq_loss"].append(round(vq_loss.item(), 5))
            record["codes_used"].append(int((usage > 0).sum()))
            dead = (usage == 0).nonzero().flatten()
            if step < steps // 2 and len(dead):
                pick = torch.randint(0, len(seen), (len(dead),), generator=generator)
                with torch.no_grad():
                    codebook[dead] = seen[pick].detach()
            usage.zero_()
        bar.set_postfix(mse=f"{mse.item():.4f}", vq=f"{vq_loss.item():.4f}")
    vq.eval().requires_grad_(False)
    return record


@torch.no_grad()
def encode_token_maps(
    vq: MultiScaleVQVAE, images: torch.Tensor, batch_size: int = 500
) -> list[torch.Tensor]:
    """The K token maps (N, pn_k^2) of images in [-1, 1]."""
    chunks = [vq.img_to_idx(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return [torch.cat(maps) for maps in zip(*chunks)]


def cached_token_maps(
    vq_folder: Path, num_images: int, seed: int, cache: Path | None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The token maps and labels of `class_data(num_images, seed)` under the VQ in `vq_folder`.

    With `cache` (a ``.safetensors`` file), they are read from it when it was written for
    the same VQ weights, image count and seed, and written to it otherwise.
    """
    import hashlib

    from safetensors.torch import load_file, save_file

    weights = vq_folder / "model.safetensors"
    key = {
        "vq_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "num_images": str(num_images),
        "seed": str(seed),
    }
    if cache is not None and cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            found = f.metadata() or {}
        if all(found.get(k) == v for k, v in key.items()):
            tensors = load_file(str(cache))
            return [tensors[f"scale{k}"] for k in range(len(PATCH_NUMS))], tensors["labels"]
    vq = MultiScaleVQVAE.from_pretrained(vq_folder)
    images, labels = class_data(num_images, seed)
    maps = encode_token_maps(vq, images)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"scale{k}": m.contiguous() for k, m in enumerate(maps)}
        save_file({**tensors, "labels": labels}, str(cache), metadata=key)
    return maps, labels


def train_msvq(
    out: Path,
    steps: int = 450,
    num_images: int = 20000,
    batch_size: int = 32,
    seed: int = 0,
    vocab_size: int = 128,
    measure: bool = True,
    command: str | None = None,
) -> Path:
    """Train the VQ-VAE and save it to `out` (``config.json``, ``model.safetensors``)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    images, _ = class_data(num_images, seed)
    vq = MultiScaleVQVAE(vq_config(vocab_size))
    losses = train_vq(vq, images, steps, batch_size, generator)
    vq.config.test_mode = True  # the saved config builds an inference model
    vq.save_pretrained(out)
    gates = evaluate_msvq(out) if measure else {}
    write_training_record(
        out,
        started,
        command=command or f"python -m decodekit.pipelines.zoo.train_shapes_var vq --out {out}",
        seed=seed,
        steps=steps,
        num_images=num_images,
        batch_size=batch_size,
        vocab_size=vocab_size,
        loss="pixel MSE + mean over scales of |f_hat - sg(f)|^2 + 0.25 |sg(f_hat) - f|^2",
        parameters=sum(p.numel() for p in vq.parameters()),
        losses=losses,
        gates=gates,
    )
    return out


# --------------------------------------------------------------------------- stage 3: VAR
def var_init(
    model: VARTransformer, init_head: float = 0.02, init_adaln_gamma: float = 1e-5
) -> None:
    """VAR's initialisation, tiny: linear layers trunc-normal ``sqrt(1 / 3C)``, small head,
    the adaptive-LN shift/scale at half size and the residual gates near zero."""
    C = model.config.embed_dim
    std = math.sqrt(1 / C / 3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    module.bias.zero_()
        model.head.weight.mul_(init_head)
        for block in model.blocks:
            lin = block.ada_lin[-1]
            lin.weight.mul_(0.5)
            lin.weight[: 2 * C].mul_(init_adaln_gamma)  # gamma1, gamma2: the gates


def build_var(
    vq: MultiScaleVQVAE, depth: int, seed: int, embed_dim: int | None = None
) -> VARPipeline:
    """A fresh class-conditional VAR of `depth` blocks, width `embed_dim` (default
    ``WIDTH_PER_BLOCK * depth``), heads 16 wide."""
    embed_dim = embed_dim or WIDTH_PER_BLOCK * depth
    pipe = VARPipeline.from_transformer(
        vq,
        num_classes=len(CLASS_NAMES),
        depth=depth,
        embed_dim=embed_dim,
        num_heads=max(1, embed_dim // 16),
        class_names=CLASS_NAMES,
        seed=seed,
        cond_drop_rate=LABEL_DROPOUT,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        var_init(pipe.transformer)
    return pipe


def _grow(t: torch.Tensor, dim: int, chunks: int, halve: bool) -> torch.Tensor:
    """Each of `chunks` equal parts of `t` along `dim` twice in a row (halved when `halve`)."""
    parts = t.chunk(chunks, dim)
    if halve:
        parts = tuple(p / 2 for p in parts)
    return torch.cat([q for p in parts for q in (p, p)], dim)


@torch.no_grad()
def widen_var(model: VARTransformer, noise: float = 0.01, seed: int = 0) -> VARTransformer:
    """`model` at twice the width and heads, computing the same logits (Net2WiderNet).

    Every width-``C`` vector becomes ``[x, x]``: embeddings and biases are doubled, a layer
    reading such a vector has its input columns halved and doubled (``[W/2, W/2]``), its
    output rows doubled within each part (q/k/v, the six modulations, the MLP's hidden
    layer); each head is repeated, so attention (per head, 16 wide) is unchanged, and so
    are layer norms over ``[x, x]``. With ``noise = 0`` the logits are equal; training
    needs the copies to differ, so every grown tensor gets Gaussian noise of ``noise``
    times its own standard deviation (generator seeded `seed`).
    """
    config = dict(model.config)
    C = config["embed_dim"]
    wide = VARTransformer(
        **{**config, "embed_dim": 2 * C, "num_heads": 2 * config["num_heads"]}
    ).to(model.dtype)
    generator = torch.Generator().manual_seed(seed)
    old = model.state_dict()
    out_parts = {"mat_qkv": 3, "ada_lin.1": 6}  # rows in parts (q, k, v; the modulations)
    for name, target in wide.state_dict().items():
        t = old[name]
        module = name.rsplit(".", 1)[0]
        if name == "head_nm.ada_lin.1.weight" or name == "head_nm.ada_lin.1.bias":
            parts = 2
        else:
            parts = next((n for key, n in out_parts.items() if module.endswith(key)), 1)
        if name.startswith("head."):  # logits: only the input doubles
            grown = _grow(t, 1, 1, halve=True) if t.dim() == 2 else t
        elif name.endswith("scale_mul_1H11"):
            grown = _grow(t, 1, 1, halve=False)
        elif name.startswith("word_embed"):  # reads the VQ's vectors: only the output doubles
            grown = _grow(t, 0, 1, halve=False)
        elif name in ("class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight"):
            grown = _grow(t, t.dim() - 1, 1, halve=False)
        elif t.dim() == 2:  # a linear layer inside: rows doubled in parts, columns halved
            grown = _grow(_grow(t, 0, parts, halve=False), 1, 1, halve=True)
        else:  # a bias or a per-channel vector
            grown = _grow(t, 0, parts, halve=False)
        if grown.shape != target.shape:
            raise ValueError(f"cannot widen {name}: {tuple(t.shape)} -> {tuple(target.shape)}")
        if noise and grown.numel() > 1:
            grown = grown + noise * grown.std() * torch.randn(
                grown.shape, generator=generator, dtype=grown.dtype
            )
        target.copy_(grown)
    return wide.eval()


def train_var_model(
    pipe: VARPipeline,
    token_maps: list[torch.Tensor],
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    lr: float = 3e-3,
    loss_from_scale: int = 0,
) -> list[float]:
    """Teacher-forced cross-entropy, labels dropped for guidance; the loss every 100 steps.

    The loss covers the tokens of scales ``loss_from_scale`` .. K-1 (0: every token); the
    earlier scales are still the model's (teacher-forced) context. CoDe's refiner is trained
    so, from the first scale it makes: its "specialised" training.
    """
    model = pipe.transformer.train()
    first = model.begin_ends[loss_from_scale][0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=max(steps, 1), pct_start=0.05
    )
    losses = []
    bar = tqdm(range(steps), desc=f"var-d{model.config.depth}", mininterval=10)
    for step in bar:
        rows = torch.randint(0, len(labels), (batch_size,), generator=generator)
        maps = [t[rows] for t in token_maps]
        with torch.no_grad():
            inputs = pipe.vq.teacher_inputs(maps)
        logits = model(model.drop_labels(labels[rows], generator), inputs)[:, first:]
        loss = F.cross_entropy(logits.flatten(0, 1), torch.cat(maps, 1)[:, first:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            losses.append(round(loss.item(), 4))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    return losses


def link_vq(out: Path, vq_folder: Path) -> None:
    """Make ``out/vq`` a relative link to `vq_folder` (one copy of the VQ-VAE's weights)."""
    link_folder(out / "vq", vq_folder)


def train_var(
    out: Path,
    vq_folder: Path,
    depth: int,
    *,
    steps: int = 1300,
    batch_size: int = 32,
    lr: float = 3e-3,
    init_from: Path | None = None,
    num_images: int = 20000,
    seed: int = 0,
    embed_dim: int | None = None,
    loss_from_scale: int = 0,
    token_cache: Path | None = None,
    widen_from: Path | None = None,
    measure: bool = True,
    command: str | None = None,
) -> Path:
    """Train a VAR of `depth` over `vq_folder`'s token maps and save the pipeline folder to `out`.

    With `init_from` (a var folder), training continues from that folder's transformer;
    `loss_from_scale` limits the loss to the later scales (`train_var_model`);
    `token_cache` keeps the encoded token maps between runs (`cached_token_maps`);
    `widen_from` (a var folder) starts from that folder's transformer at twice its width
    (`widen_var`).
    """
    if not 0 <= loss_from_scale < len(PATCH_NUMS):
        raise ValueError(
            f"loss_from_scale must be in 0..{len(PATCH_NUMS) - 1}, got {loss_from_scale}."
        )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    started = time.time()
    vq = MultiScaleVQVAE.from_pretrained(vq_folder)
    token_maps, labels = cached_token_maps(vq_folder, num_images, seed, token_cache)
    encode_seconds = round(time.time() - started, 1)
    pipe = build_var(vq, depth, seed, embed_dim)
    if init_from is not None and widen_from is not None:
        raise ValueError("give init_from or widen_from, not both.")
    if init_from is not None:
        pipe = VARPipeline(
            VARTransformer.from_pretrained(init_from / "transformer"), vq, CLASS_NAMES
        )
    if widen_from is not None:
        narrow = VARTransformer.from_pretrained(widen_from / "transformer")
        pipe = VARPipeline(widen_var(narrow, seed=seed), vq, CLASS_NAMES)
    losses = train_var_model(
        pipe, token_maps, labels, steps, batch_size, generator, lr, loss_from_scale
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.transformer.save_pretrained(out / "transformer")
    (out / "var.json").write_text(json.dumps({"class_names": CLASS_NAMES}, indent=1))
    link_vq(out, vq_folder)
    gates = evaluate_var(out) if measure else {}
    write_training_record(
        out,
        started,
        command=command
        or (
            f"python -m decodekit.pipelines.zoo.train_shapes_var var --depth {depth} "
            f"--vq {vq_folder} --out {out}"
        ),
        seed=seed,
        depth=depth,
        embed_dim=pipe.transformer.config.embed_dim,
        num_heads=pipe.transformer.config.num_heads,
        parameters=sum(p.numel() for p in pipe.transformer.parameters()),
        steps=steps,
        num_images=num_images,
        batch_size=batch_size,
        lr=lr,
        init_from=str(init_from) if init_from is not None else None,
        widen_from=str(widen_from) if widen_from is not None else None,
        loss_from_scale=loss_from_scale,
        label_dropout=LABEL_DROPOUT,
        tokens_per_image=sum(p * p for p in PATCH_NUMS),
        encode_seconds=encode_seconds,
        losses=losses,
        gates=gates,
    )
    return out


# --------------------------------------------------------------------------- evaluation
def _folder(name_or_folder: str | Path) -> Path:
    from decodekit.pipelines.zoo import CATALOGUE, zoo_path

    return (
        zoo_path(str(name_or_folder)) if str(name_or_folder) in CATALOGUE else Path(name_or_folder)
    )


@torch.no_grad()
def evaluate_msvq(folder: str | Path = "shapes-msvq", num_images: int = 500) -> dict[str, Any]:
    """Judge adherence (all four attributes) of reconstructions of held-out renders (seed 40000)."""
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    vq = MultiScaleVQVAE.from_pretrained(_folder(folder))
    images, scenes = sample_shapes(num_images, seed=VQ_EVAL_SEED, two_shape_fraction=0.0)
    x = images.float() / 127.5 - 1
    maps = encode_token_maps(vq, x)
    recon = torch.cat(
        [vq.idx_to_img([m[i : i + 250] for m in maps]) for i in range(0, num_images, 250)]
    )
    recon = (recon + 1) / 2
    scores = ShapesJudge.load().adherence(recon, [s.caption for s in scenes])
    return {
        "num_images": num_images,
        **{f"adherence_{k}": round(v, 4) for k, v in scores.items() if k != "counted"},
        "pixel_mse": round(float(F.mse_loss(recon, images.float() / 255)), 5),
        "codes_used": int(torch.cat(maps, 1).unique().numel()),
    }


@torch.no_grad()
def sample_classes(
    pipe: VARPipeline,
    num_images: int,
    batch_size: int = 200,
    seed: int = VAR_EVAL_SEED,
    **sampling: Any,
) -> tuple[list[Any], list[int]]:
    """``num_images`` samples, classes in turn (sample i is class i mod 24, generator seeded ``seed + i``)."""
    classes = [i % len(CLASS_NAMES) for i in range(num_images)]
    images = []
    for first in range(0, num_images, batch_size):
        rows = range(first, min(first + batch_size, num_images))
        generators = [torch.Generator().manual_seed(seed + i) for i in rows]
        out = pipe([classes[i] for i in rows], generator=generators, **sampling)
        images += out.images
    return images, classes


def class_adherence(judge: Any, images: list[Any], classes: list[int]) -> dict[str, float]:
    """Fractions of images whose judged shape, colour, and both, are their class's."""
    predicted = judge.predict(images)
    shape = [p["shape"] == SHAPES[c // len(COLOUR_NAMES)] for p, c in zip(predicted, classes)]
    colour = [
        p["colour"] == COLOUR_NAMES[c % len(COLOUR_NAMES)] for p, c in zip(predicted, classes)
    ]
    n = len(classes)
    return {
        "adherence_shape": round(sum(shape) / n, 4),
        "adherence_colour": round(sum(colour) / n, 4),
        "adherence_class": round(sum(a and b for a, b in zip(shape, colour)) / n, 4),
    }


def judge_and_renders(num_images: int) -> tuple[Any, torch.Tensor]:
    """The shapes judge and ``num_images`` one-shape renders in [0, 1] (the gates' `REAL_EVAL_SEED`)."""
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    real, _ = sample_shapes(num_images, seed=REAL_EVAL_SEED, two_shape_fraction=0.0)
    return ShapesJudge.load(), real.float() / 255


def arm_scores(judge: Any, images: list[Any], classes: list[int], real: torch.Tensor) -> dict:
    """`class_adherence` of an arm's images and their Fréchet distance to the renders ``real``."""
    return {
        **class_adherence(judge, images, classes),
        "frechet_to_real": round(judge.frechet(images, real), 3),
    }


def against_first_arm(judge: Any, arms: list[dict], name: str) -> list[dict]:
    """Rows of a benchmark's arms (``images``, ``seconds``), the first as the reference.

    Adds each arm's judge Fréchet distance to the first arm's images (``frechet_to_<name>``)
    and its wall-clock speed-up over it (``wall_speedup``); the rows leave the images out.
    """
    base = arms[0]
    for a in arms:
        fd = 0.0 if a is base else judge.frechet(a["images"], base["images"])
        a[f"frechet_to_{name}"] = round(fd, 3)
        a["wall_speedup"] = round(base["seconds"] / a["seconds"], 3)
    return [{k: v for k, v in a.items() if k != "images"} for a in arms]


def write_arm_rows(
    out: Path, script: str, argv: list[str], rows: list[dict], **fields: Any
) -> None:
    """Print a benchmark's arm rows as a table and write them to ``out`` as JSON.

    The JSON holds the command (``script`` and its ``argv``), the machine, the load
    average, ``fields`` (the run's settings) and the rows.
    """
    import os

    columns = [("adherence_shape", "shape"), ("adherence_colour", "colour"),
               ("adherence_class", "class"), ("frechet_to_real", "FD real")]  # fmt: skip
    others = [k for k in rows[0] if k.startswith("frechet_to_") and k != "frechet_to_real"]
    columns += [(k, k.replace("frechet_to_", "FD ")) for k in others]
    optional = ("ideal_speedup", "acceptance_rate", "wall_speedup")
    columns += [(k, k) for k in optional if any(k in r for r in rows)]
    print(f"{'arm':40}" + "".join(f" {label:>14}" for _, label in columns))
    for r in rows:
        cells = [r.get(k, "") for k, _ in columns]
        print(f"{r['arm']:40}" + "".join(f" {c:>14}" for c in cells))
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join([script, *argv]),
        "machine": "cpu-2core",
        "load_average": os.getloadavg(),
        **fields,
        "arms": rows,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


def evaluate_var(
    folder: str | Path = "shapes-var-d6",
    num_images: int = 240,
    judge: Any = None,
    pipe: VARPipeline | None = None,
    seed: int = VAR_EVAL_SEED,
    **sampling: Any,
) -> dict[str, Any]:
    """Class adherence of `num_images` samples (10 a class) and their Fréchet distance to renders.

    ``sampling`` (cfg, top_k, top_p, temperature) defaults to `OPERATING_POINT`; sample i
    uses generator seed ``seed + i``.
    """
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    judge = judge or ShapesJudge.load()
    pipe = pipe or VARPipeline.from_pretrained(_folder(folder))
    return class_sample_report(pipe, judge, num_images, seed, **{**OPERATING_POINT, **sampling})


def class_sample_report(
    pipe: Any, judge: Any, num_images: int, seed: int, batch_size: int = 200, **sampling: Any
) -> dict[str, Any]:
    """A class-conditional pipeline's `sample_classes` scored: adherence, Fréchet distance, seconds."""
    started = time.time()
    images, classes = sample_classes(pipe, num_images, batch_size, seed=seed, **sampling)
    seconds = time.time() - started
    real, _ = sample_shapes(num_images, seed=REAL_EVAL_SEED, two_shape_fraction=0.0)
    return {
        "num_images": num_images,
        "seed": seed,
        **sampling,
        **class_adherence(judge, images, classes),
        "frechet_generated_vs_real": round(judge.frechet(images, real.float() / 255), 3),
        "generation_seconds": round(seconds, 1),
    }


def selection_runner(evaluate: Any, judge: Any, pipe: Any, num_images: int) -> Any:
    """``run(**sampling)``: `evaluate` on the selection samples (seeds from 60000), printed as it goes."""

    def run(**sampling: Any) -> dict[str, Any]:
        row = evaluate(
            num_images=num_images, judge=judge, pipe=pipe, seed=VAR_SELECT_SEED, **sampling
        )
        tqdm.write(json.dumps(row), file=sys.stderr)
        return row

    return run


def sweep(folder: str | Path, num_images: int = 240) -> list[dict[str, Any]]:
    """Guidance 0..6 (all tokens, temperature 1), then top-k and temperature at the best guidance.

    Measured on the selection samples (generator seeds from 60000), not the gate's.
    """
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    judge, pipe = ShapesJudge.load(), VARPipeline.from_pretrained(_folder(folder))
    run = selection_runner(evaluate_var, judge, pipe, num_images)
    rows = [run(cfg=cfg, top_k=None, temperature=1.0) for cfg in (0.0, 1.0, 2.0, 3.0, 4.0, 6.0)]
    best = max(rows, key=lambda r: r["adherence_class"])["cfg"]
    for top_k, temperature in ((10, 1.0), (30, 1.0), (None, 0.6), (None, 0.8), (None, 1.2)):
        rows.append(run(cfg=best, top_k=top_k, temperature=temperature))
    return rows


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    """Command line: ``vq``, ``var``, ``evaluate`` or ``sweep``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    vq = sub.add_parser("vq", help="train shapes-msvq")
    vq.add_argument("--out", type=Path, required=True)
    vq.add_argument("--steps", type=int, default=450)
    vq.add_argument("--batch-size", type=int, default=32)
    vq.add_argument("--vocab-size", type=int, default=128)
    var = sub.add_parser("var", help="train a class-conditional VAR over a shapes-msvq folder")
    var.add_argument("--out", type=Path, required=True)
    var.add_argument("--vq", type=Path, required=True)
    var.add_argument("--depth", type=int, required=True)
    var.add_argument("--steps", type=int, default=1300)
    var.add_argument("--batch-size", type=int, default=32)
    var.add_argument("--lr", type=float, default=3e-3)
    var.add_argument("--init-from", type=Path, default=None, help="continue from a var folder")
    var.add_argument(
        "--widen-from", type=Path, default=None, help="start from a var folder at twice its width"
    )
    var.add_argument(
        "--width", type=int, default=None, help=f"embed dim (default {WIDTH_PER_BLOCK} x depth)"
    )
    var.add_argument(
        "--loss-from-scale",
        type=int,
        default=0,
        help="loss on the tokens of this scale and later only (a CoDe refiner: its draft_steps)",
    )
    var.add_argument(
        "--token-cache",
        type=Path,
        default=None,
        help="a .safetensors file that keeps the encoded token maps between runs",
    )
    for p in (vq, var):
        p.add_argument("--num-images", type=int, default=20000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-measure", action="store_true", help="skip the gates at the end")
    for name in ("evaluate", "sweep"):
        p = sub.add_parser(name, help=f"{name} a VAR folder or zoo name; prints JSON")
        p.add_argument("model", help="zoo name (shapes-var-d6) or folder; shapes-msvq for the VQ")
        p.add_argument("--num-images", type=int, default=240)
        if name == "evaluate":
            p.add_argument("--cfg", type=float, default=OPERATING_POINT["cfg"])
            p.add_argument("--top-k", type=int, default=OPERATING_POINT["top_k"])
            p.add_argument("--temperature", type=float, default=OPERATING_POINT["temperature"])
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(
        ["python -m decodekit.pipelines.zoo.train_shapes_var", *(argv or sys.argv[1:])]
    )
    if args.stage == "vq":
        train_msvq(
            args.out,
            args.steps,
            args.num_images,
            args.batch_size,
            args.seed,
            args.vocab_size,
            measure=not args.no_measure,
            command=command,
        )
    elif args.stage == "var":
        given = ("steps", "batch_size", "lr", "init_from", "num_images", "seed")
        given += ("loss_from_scale", "token_cache", "widen_from")
        settings = {k: getattr(args, k) for k in given}
        settings["embed_dim"] = args.width
        train_var(
            args.out, args.vq, args.depth, measure=not args.no_measure, command=command, **settings
        )
    elif args.stage == "sweep":
        print(json.dumps(sweep(args.model, args.num_images), indent=1))
    elif str(args.model).endswith("msvq"):
        print(json.dumps(evaluate_msvq(args.model, args.num_images), indent=1))
    else:
        sampling = {"cfg": args.cfg, "top_k": args.top_k, "temperature": args.temperature}
        print(json.dumps(evaluate_var(args.model, args.num_images, **sampling), indent=1))


if __name__ == "__main__":
    main()
