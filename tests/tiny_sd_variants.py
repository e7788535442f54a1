"""Tiny random SDXL, ControlNet and img2img pipelines built from configs (32x32 images, 8x8 latents)."""

from __future__ import annotations

import torch

from tests.tiny import tiny_sd_pipeline, tiny_text_encoder, tiny_unet, tiny_vae


def tiny_sd_img2img_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """A StableDiffusionImg2ImgPipeline over the parts of `tiny_sd_pipeline`."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline(seed, scheduler).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet_pipeline(seed: int = 0):
    """A StableDiffusionControlNetPipeline whose ControlNet mirrors the tiny UNet's encoder."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = tiny_sd_pipeline(seed)
    torch.manual_seed(seed + 1)
    # Three conditioning channels: two stride-2 convs take the 32x32 image to the 8x8 latents.
    controlnet = ControlNetModel.from_unet(
        base.unet, conditioning_embedding_out_channels=(8, 16, 16)
    )
    # from_unet zero-initialises the output convs; random values make the residuals matter.
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in base.components.items() if k != "image_encoder"},
        controlnet=controlnet,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline: two text encoders, a UNet with SDXL's ``text_time`` added conditioning."""
    import diffusers
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = tiny_unet(
        cross_attention_dim=64,  # the two encoders' hidden states concatenated: 32 + 32
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text (32) + 6 time ids × 8
        use_linear_projection=True,
    )
    vae = tiny_vae()
    text_encoder, tokenizer = tiny_text_encoder()
    cfg = text_encoder.config.to_dict()
    cfg["projection_dim"] = 32
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(num_train_timesteps=1000),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
