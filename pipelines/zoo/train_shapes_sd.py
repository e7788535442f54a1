"""Train `shapes-sd`: a tiny latent text-to-image diffusion pipeline on the `shapes` data.

Two stages, both seeded: an AutoencoderKL (32x32 RGB <-> 4x8x8 latents), then a
UNet2DConditionModel with a CLIPTextModel trained jointly from scratch (epsilon prediction,
captions dropped 10% of the time for classifier-free guidance, EMA weights saved).
The result is a folder that ``StableDiffusionPipeline.from_pretrained(folder,
safety_checker=None)`` loads.

    python -m decodekit.pipelines.zoo.train_shapes_sd --out pipelines/zoo/models/shapes-sd
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from decodekit.pipelines.zoo.clip_vocab import write_clip_tokenizer_files
from decodekit.pipelines.zoo.shapes_data import IMAGE_SIZE, caption_words, sample_shapes
from decodekit.pipelines.zoo.training import write_training_record
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER_MAX_LENGTH = 12
CAPTION_DROPOUT = 0.1
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_vae() -> AutoencoderKL:
    """A three-level AutoencoderKL: 32x32x3 images to 8x8x4 latents (downsample 4)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
    )


def build_text_encoder(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextModel:
    """A two-layer CLIP text encoder of width 64."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=64,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return CLIPTextModel(config)


def build_unet() -> UNet2DConditionModel:
    """An SD-shaped UNet on 8x8 latents: cross-attention down blocks, a mid block, up blocks."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Fit the autoencoder: MSE reconstruction plus a small KL term (SD's weight, 1e-6)."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 2e-3, total_steps=max(steps, 1), pct_start=0.05
    )
    vae.train()
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        x = images[idx].float() / 127.5 - 1.0  # (B, 3, 32, 32) in [-1, 1]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean()
        loss = F.mse_loss(recon, x) + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of all images, unscaled: (N, 4, 8, 8)."""
    chunks = [
        vae.encode(images[i : i + 512].float() / 127.5 - 1.0).latent_dist.mean
        for i in range(0, len(images), 512)
    ]
    return torch.cat(chunks)


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    ema_decay: float = 0.995,
) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Train the UNet and text encoder on noise prediction; return their EMA copies."""
    noise_scheduler = DDPMScheduler(
        **{
            k: v
            for k, v in SCHEDULER_CONFIG.items()
            if k not in ("set_alpha_to_one", "steps_offset")
        }
    )
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 1e-3, total_steps=max(steps, 1), pct_start=0.03
    )
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train()
    text_encoder.train()
    bar = tqdm(range(steps), desc="unet")
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
        x0 = latents[idx]  # (B, 4, 8, 8), already scaled
        ids = token_ids[idx].clone()  # (B, L)
        drop = torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch_size,), generator=generator)
        xt = noise_scheduler.add_noise(x0, noise, t)
        context = text_encoder(ids).last_hidden_state  # (B, L, 64)
        pred = unet(xt, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, ema in ((unet, ema_unet), (text_encoder, ema_text)):
                for p, q in zip(model.parameters(), ema.parameters()):
                    q.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema_unet, ema_text


def train(
    out: Path,
    steps: int,
    vae_steps: int,
    num_images: int,
    batch_size: int,
    seed: int,
    vae_batch_size: int = 32,
) -> Path:
    """Train every component and save the pipeline folder; returns `out`."""
    torch.manual_seed(seed)
    random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    images, scenes = sample_shapes(num_images, seed=seed)  # (N, 3, 32, 32) uint8

    tokenizer_dir = out / "tokenizer"
    write_clip_tokenizer_files(tokenizer_dir, caption_words(), TOKENIZER_MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    def tokenize(captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions,
            padding="max_length",
            max_length=TOKENIZER_MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    token_ids = tokenize([s.caption for s in scenes])  # (N, L)
    empty_ids = tokenize([""])[0]

    vae = build_vae()
    train_vae(vae, images, vae_steps, vae_batch_size, generator)
    raw = encode_latents(vae, images)
    scaling_factor = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = raw * scaling_factor

    text_encoder = build_text_encoder(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    unet, text_encoder = train_denoiser(
        build_unet(), text_encoder, latents, token_ids, empty_ids, steps, batch_size, generator
    )

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out, safe_serialization=True)
    write_training_record(
        out,
        started,
        seed=seed,
        steps=steps,
        vae_steps=vae_steps,
        num_images=num_images,
        batch_size=batch_size,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: train shapes-sd into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000, help="UNet training steps")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--num-images", type=int, default=30000)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train(args.out, args.steps, args.vae_steps, args.num_images, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
