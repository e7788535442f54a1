"""Train `shapes-dit`: a tiny Flux-shaped diffusion transformer on the `shapes` data.

The autoencoder and the CLIP text encoder (with its tokenizer) are shapes-sd's, reused
frozen: the VAE's latents (4x8x8, packed by Flux into 16 tokens of 16 channels) and the
CLIP pooled embedding. New here, trained jointly from scratch: a two-layer T5 encoder
over a word-level T5 tokenizer (the token sequence Flux attends to) and a
``FluxTransformer2DModel`` (2 double-stream and 3 single-stream blocks, width 64) trained
by rectified flow (velocity ``noise - x0`` at logit-normal sigmas), captions dropped 10%
of the time for classifier-free guidance (``true_cfg_scale`` with ``negative_prompt=""``),
EMA weights saved. The result is a folder that ``FluxPipeline.from_pretrained(folder)``
loads; generate at ``height=width=32``.

    python -m decodekit.pipelines.zoo.train_shapes_dit --out pipelines/zoo/models/shapes-dit
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decodekit.pipelines.zoo import zoo_path
from decodekit.pipelines.zoo.shapes_data import caption_words, sample_shapes
from decodekit.pipelines.zoo.train_shapes_sd import TOKENIZER_MAX_LENGTH, encode_latents
from decodekit.pipelines.zoo.training import optimiser_step, write_training_record
from decodekit.tiny_models import flux_transformer, t5_encoder, t5_word_tokenizer
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from tqdm import tqdm
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel

CAPTION_DROPOUT = 0.1
LATENT_SIDE = 8  # 32x32 images, VAE downsample 4
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


def build_t5(vocab_size: int) -> T5EncoderModel:
    """A two-layer T5 encoder of width 64 (dropout 0.1 while training)."""
    return t5_encoder(vocab_size, 64, layers=2, heads=4, relative_attention_max_distance=16)


def build_transformer(text_width: int = 64) -> FluxTransformer2DModel:
    """A Flux transformer on 16 packed latent tokens: 2 double + 3 single blocks, width 64."""
    return flux_transformer(4, 2, 3, text_width)


def train_transformer(
    transformer: FluxTransformer2DModel,
    t5: T5EncoderModel,
    latents: torch.Tensor,
    pooled: torch.Tensor,
    t5_ids: torch.Tensor,
    empty: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    ema_decay: float = 0.995,
) -> tuple[FluxTransformer2DModel, T5EncoderModel]:
    """Rectified-flow training of the transformer and the T5 encoder; returns their EMA copies.

    ``latents`` (N, 4, 8, 8) scaled; ``pooled`` (N, 64) CLIP pooled embeddings; ``t5_ids``
    (N, L); ``empty`` the pooled embedding and T5 ids of the empty caption.
    """
    models = (transformer, t5)
    emas = [copy.deepcopy(m).eval() for m in models]
    params = [p for m in models for p in m.train().parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    total = max(steps, 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total, pct_start=0.03)
    half = LATENT_SIDE // 2
    img_ids = FluxPipeline._prepare_latent_image_ids(batch_size, half, half, "cpu", torch.float32)
    txt_ids = torch.zeros(t5_ids.shape[1], 3)
    bar = tqdm(range(steps), desc="transformer", mininterval=30)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
        x0 = FluxPipeline._pack_latents(latents[idx], batch_size, 4, LATENT_SIDE, LATENT_SIDE)
        ids, pool = t5_ids[idx].clone(), pooled[idx].clone()
        drop = torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT
        ids[drop], pool[drop] = empty[1], empty[0]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=generator))  # logit-normal
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        pred = transformer(
            hidden_states=xt,
            timestep=sigma,
            pooled_projections=pool,
            encoder_hidden_states=t5(ids).last_hidden_state,
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample
        loss = F.mse_loss(pred, noise - x0)
        optimiser_step(loss, optimizer, schedule, bar, clip_params=params)
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, ema in zip(models, emas):
                for p, q in zip(model.parameters(), ema.parameters()):
                    q.lerp_(p, 1 - decay)
    return emas[0], emas[1]


def padded_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids padded (or cut) to the tokenizer's ``model_max_length``, as the pipeline pads them."""
    kw = {"padding": "max_length", "truncation": True, "return_tensors": "pt"}
    return tokenizer(texts, max_length=tokenizer.model_max_length, **kw).input_ids


@torch.no_grad()
def clip_pooled(text_encoder: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    """CLIP pooled embeddings of token ids, in chunks: (N, hidden)."""
    return torch.cat(
        [text_encoder(ids[i : i + 1024]).pooler_output for i in range(0, len(ids), 1024)]
    )


def train(
    out: Path,
    steps: int,
    num_images: int,
    batch_size: int,
    seed: int,
    base: Path | None = None,
) -> Path:
    """Train the transformer and T5 on shapes-sd's VAE and CLIP; save the pipeline to `out`."""
    torch.manual_seed(seed)
    random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    base = base or zoo_path("shapes-sd")
    images, scenes = sample_shapes(num_images, seed=seed)  # (N, 3, 32, 32) uint8
    captions = [s.caption for s in scenes]

    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    vae.register_to_config(shift_factor=0.0)  # Flux's decode adds it
    latents = encode_latents(vae, images) * vae.config.scaling_factor
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").eval()

    tokenizer_2 = t5_word_tokenizer(caption_words(), TOKENIZER_MAX_LENGTH)

    def clip_ids(texts: list[str]) -> torch.Tensor:  # both tokenizers pad to 12 tokens
        return padded_ids(tokenizer, texts)

    def t5_tokens(texts: list[str]) -> torch.Tensor:
        return padded_ids(tokenizer_2, texts)

    pooled = clip_pooled(text_encoder, clip_ids(captions))
    empty = (clip_pooled(text_encoder, clip_ids([""]))[0], t5_tokens([""])[0])
    t5 = build_t5(len(tokenizer_2))
    transformer = build_transformer(t5.config.d_model)  # = the CLIP width, 64
    transformer, t5 = train_transformer(
        transformer, t5, latents, pooled, t5_tokens(captions), empty, steps, batch_size, generator
    )
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    share_frozen_parts(Path(out), Path(base))
    write_training_record(
        out, started, seed=seed, steps=steps, num_images=num_images, batch_size=batch_size
    )
    return out


def share_frozen_parts(out: Path, base: Path) -> None:
    """Link ``out``'s frozen CLIP text encoder and VAE weights to ``base``'s (one copy each).

    The VAE's config stays ``out``'s own (Flux reads a numeric ``shift_factor``).
    """
    import shutil

    for part, target in (
        (out / "text_encoder", base / "text_encoder"),
        (out / "vae" / "diffusion_pytorch_model.safetensors",
         base / "vae" / "diffusion_pytorch_model.safetensors"),
    ):  # fmt: skip
        if part.is_dir() and not part.is_symlink():
            shutil.rmtree(part)
        else:
            part.unlink()
        rel = os.path.relpath(target.resolve(), part.parent.resolve())
        part.symlink_to(rel, target_is_directory=target.is_dir())


DEFAULTS = {"steps": 3000, "num_images": 30000, "batch_size": 48, "seed": 0}
"""The committed model's settings (``--steps`` are transformer training steps)."""


def main(argv: list[str] | None = None) -> None:
    """Command line: train shapes-dit into --out (``--threads``, default 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    for name, default in {**DEFAULTS, "threads": 1}.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    train(**args)


if __name__ == "__main__":
    main()
