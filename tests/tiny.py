"""Tiny randomly initialised models built from configs, for tests that need no download."""

from __future__ import annotations

import torch


def tiny_unet(cross_attention_dim: int = 32, sample_size: int = 8, **overrides):
    """A UNet2DConditionModel with SD's block layout, a few thousand parameters wide."""
    from diffusers import UNet2DConditionModel

    cfg = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    cfg.update(overrides)
    return UNet2DConditionModel(**cfg)


def tiny_text_encoder(hidden: int = 32):
    """A CLIPTextModel and a CLIPTokenizer over a tiny word vocabulary written here."""
    import json
    import tempfile
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    words = "a an the red blue green circle square triangle small big on left right top bottom of".split()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    folder = Path(tempfile.mkdtemp(prefix="dk-tok-"))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(cfg), tok


def tiny_vae():
    """An AutoencoderKL with 4x downsampling (32x32 images, 8x8 latents)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_sd_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A StableDiffusionPipeline of random tiny parts (32x32 images)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    unet = tiny_unet()
    vae = tiny_vae()
    text_encoder, tokenizer = tiny_text_encoder()
    sched_cls = {
        "ddim": diffusers.DDIMScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "heun": diffusers.HeunDiscreteScheduler,
    }[scheduler]
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched_cls(
            num_train_timesteps=1000, **({"clip_sample": False} if scheduler == "ddim" else {})
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_llama(seed: int = 0, dtype=torch.float32, vocab_size: int = 64):
    """A LlamaForCausalLM with two layers and GQA, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()
