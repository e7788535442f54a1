"""Tiny randomly initialised models and pipelines, built from configs (nothing downloads).

For strategy tests, decodekit's and third-party ones: a Stable Diffusion pipeline
(and its SDXL, img2img and ControlNet variants) with 32x32 images and 8x8 latents,
seeded initial latents and a seeded call (`sd_latents`, `run_sd`), a causal Llama
(`tiny_llama`), and a bidirectional Llama with a masked-diffusion pipeline over it
(`tiny_bidirectional_llama`, `tiny_mdm_pipeline`, and diffusers' LLaDA2Pipeline:
`tiny_llada2_pipeline`; mask token `MASK`, vocabulary `VOCAB`), and diffusion-transformer
pipelines of four families (`tiny_sd3_pipeline`, `tiny_flux_pipeline`,
`tiny_pixart_pipeline`, `tiny_sana_pipeline`, seeded calls `run_dit`). Each builds in
well under a second on a CPU. Import them from `decodekit.testing`.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    """A StableDiffusionPipeline of random tiny parts (32x32 images, 8x8 latents).

    ``scheduler``: ``"ddim"``, ``"dpm"``, ``"euler"`` or ``"heun"``. Safety checker off,
    progress bar off. Call it with ``latents=sd_latents(pipe, n, seed)`` for seeded rows.
    """
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


def sd_latents(pipe, n: int, seed: int, row_offset: int = 0) -> torch.Tensor:
    """Initial noise whose row i depends only on (seed, row_offset + i)."""
    rows = [
        torch.randn(
            1, 4, 8, 8, generator=torch.Generator().manual_seed(seed * 1000 + row_offset + i)
        )
        for i in range(n)
    ]
    return torch.cat(rows)  # (n, 4, 8, 8)


def run_sd(pipe, prompts, seed=0, row_offset=0, steps=6, **kw):
    """A seeded SD call on ``prompts`` (rows seeded by `sd_latents`); returns the final latents."""
    latents = sd_latents(pipe, len(prompts), seed, row_offset)
    return pipe(
        prompts, num_inference_steps=steps, latents=latents, output_type="latent", **kw
    ).images


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


VLM_WORDS = (
    "<pad> <s> </s> <unk> <image> what which shape colour is it where a the red blue green "
    "circle square triangle left right top bottom"
).split()
"""Vocabulary of `tiny_llava`'s word-level tokenizer (ids in this order; ``<image>`` is 4)."""


def tiny_llava_processor(
    image_size: int = 16, patch_size: int = 4, words: Sequence[str] = VLM_WORDS, bos: bool = False
):
    """A `LlavaProcessor`: CLIP image processing at ``image_size`` and a word-level tokenizer over
    ``words`` (ids in order; the first five are ``<pad> <s> </s> <unk> <image>``), built in memory
    (no download). Each image becomes ``(image_size / patch_size)**2`` image tokens; with ``bos``
    the tokenizer puts ``<s>`` before every text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    if list(words[:5]) != VLM_WORDS[:5]:
        raise ValueError(f"the words must start with {' '.join(VLM_WORDS[:5])}, got {words[:5]}")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def tiny_llava(seed: int = 0, layers: int = 4, image_size: int = 16, patch_size: int = 4):
    """A `LlavaForConditionalGeneration` (two-layer CLIP vision tower, ``layers``-layer Llama with
    GQA, eval mode) and its `tiny_llava_processor`."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(VLM_WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=VLM_WORDS.index("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model, tiny_llava_processor(image_size, patch_size)


# -- masked diffusion ------------------------------------------------------------------------
MASK = 31
"""Mask token id of `tiny_mdm_pipeline` (the last id of `VOCAB`)."""
VOCAB = 32
"""Vocabulary size of `tiny_bidirectional_llama`."""


def tiny_bidirectional_llama(seed: int = 0, layers: int = 2, dtype=torch.float64, **overrides):
    """A LlamaForCausalLM with ``is_causal=False`` (bidirectional), GQA, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        is_causal=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()


def tiny_mdm_pipeline(seed: int = 0, layers: int = 2, **overrides):
    """A MaskedDiffusionLMPipeline over `tiny_bidirectional_llama` (mask 31, EOS 2, pad 0)."""
    from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline

    model = tiny_bidirectional_llama(seed, layers, **overrides)
    return MaskedDiffusionLMPipeline(model, mask_token_id=MASK, eos_token_id=2, pad_token_id=0)


def tiny_llada2_pipeline(seed: int = 0, block_length: int = 8):
    """diffusers' LLaDA2Pipeline over `tiny_bidirectional_llama` (float64), no tokenizer."""
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    pipe = LLaDA2Pipeline(
        model=tiny_bidirectional_llama(seed),
        scheduler=BlockRefinementScheduler(block_length=block_length),
        tokenizer=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- diffusion transformers ------------------------------------------------------------------
_WORDS = "a an the red blue green circle square triangle small big on left right top bottom of"


def t5_word_tokenizer(words: list[str], max_length: int):
    """A T5 tokenizer (Unigram) with one piece per word of ``words``, letters as fallback.

    Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the words; built in memory, no download.
    """
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def t5_encoder(vocab_size: int, d_model: int, layers: int, heads: int, **overrides):
    """A T5EncoderModel of width ``d_model`` (heads of ``d_model / heads``, MLP ``2 d_model``)."""
    from transformers import T5Config, T5EncoderModel

    cfg = dict(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model)
    cfg.update(num_layers=layers, num_heads=heads, relative_attention_num_buckets=8)
    cfg.update(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **overrides)
    return T5EncoderModel(T5Config(**cfg))


def tiny_t5(d_model: int = 32, max_length: int = 16):
    """A one-layer T5EncoderModel (no dropout, eval mode) and a word-level `t5_word_tokenizer`."""
    tokenizer = t5_word_tokenizer(_WORDS.split(), max_length)
    model = t5_encoder(len(tokenizer), d_model, layers=1, heads=4, dropout_rate=0.0)
    return model.eval(), tokenizer


def flux_transformer(
    heads: int, double: int, single: int, text_width: int, guidance_embeds: bool = False
):
    """A FluxTransformer2DModel on 4-channel latents (16 channels packed), heads of width 16.

    ``double``/``single``: the numbers of double- and single-stream blocks; ``text_width``:
    the T5 width and the CLIP pooled width.
    """
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=16,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        pooled_projection_dim=text_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def _flow_vae():
    """`tiny_vae` with ``shift_factor`` 0 (SD3 and Flux decode ``latents / scale + shift``)."""
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.0)
    return vae


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline: CLIP (pooled) and T5 text encoders, one double and one single block.

    32x32 images are 8x8x4 latents packed into 16 tokens of 16 channels; call it with
    ``height=32, width=32`` (Flux's default is 512). ``guidance_embeds``: a FLUX.1-dev
    style guidance embedding (``guidance_scale``); classifier-free guidance is
    ``true_cfg_scale`` with a ``negative_prompt`` either way.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    text_encoder, tokenizer = tiny_text_encoder()
    text_encoder_2, tokenizer_2 = tiny_t5()
    transformer = flux_transformer(2, 1, 1, text_width=32, guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    parts = dict(scheduler=scheduler, vae=_flow_vae(), transformer=transformer)
    parts.update(text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    return _quiet(FluxPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2))


def _quiet(pipe):
    """``pipe`` with its progress bar off."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, scheduler: str = "euler"):
    """A StableDiffusion3Pipeline: two CLIP encoders with projections, a T5, one joint block.

    ``scheduler``: ``"euler"`` (FlowMatchEulerDiscreteScheduler, shift 3) or ``"heun"``
    (FlowMatchHeunDiscreteScheduler: two transformer calls per step). 32x32 images by
    default (transformer ``sample_size`` 8, patch 2: 16 image tokens).
    """
    import diffusers
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    clip, tokenizer = tiny_text_encoder()
    cfg = {**clip.config.to_dict(), "projection_dim": 32}
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    text_encoder_3, tokenizer_3 = tiny_t5(d_model=64)  # >= the two CLIP widths together
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two projections together
        out_channels=4,
        pos_embed_max_size=8,
    )
    sched_cls = {
        "euler": diffusers.FlowMatchEulerDiscreteScheduler,
        "heun": diffusers.FlowMatchHeunDiscreteScheduler,
    }[scheduler]
    parts = dict(transformer=transformer, scheduler=sched_cls(num_train_timesteps=1000, shift=3.0))
    parts.update(text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    parts.update(text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    return _quiet(
        StableDiffusion3Pipeline(
            **parts, vae=_flow_vae(), tokenizer=tokenizer, tokenizer_2=tokenizer
        )
    )


def tiny_pixart_pipeline(seed: int = 0, sigma: bool = False):
    """A PixArtAlphaPipeline (``sigma=True``: PixArtSigmaPipeline): T5, two adaLN-single blocks, DDIM.

    32x32 images (transformer ``sample_size`` 8, patch 2). PixArt resizes to its resolution
    bins by default, which a tiny ``sample_size`` has none of: call it with
    ``use_resolution_binning=False``.
    """
    import diffusers
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    text_encoder, tokenizer = tiny_t5()
    cfg = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, in_channels=4)
    cfg.update(num_attention_heads=3, caption_channels=32, cross_attention_dim=24)
    cfg.update(out_channels=8, attention_bias=True, activation_fn="gelu-approximate")  # + variance
    cfg.update(num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_eps=1e-6)
    transformer = PixArtTransformer2DModel(**cfg, norm_elementwise_affine=False)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    pipe_cls = diffusers.PixArtSigmaPipeline if sigma else diffusers.PixArtAlphaPipeline
    parts = dict(transformer=transformer, scheduler=scheduler, vae=tiny_vae())
    return _quiet(pipe_cls(**parts, text_encoder=text_encoder, tokenizer=tokenizer))


def tiny_sana_pipeline(seed: int = 0):
    """A SanaPipeline: a Gemma2 text encoder over letters, a DC-AE (downsample 4), one linear-attention block.

    32x32 images (8x8 latents, patch 1). Call it with ``use_resolution_binning=False``
    (no bins for a tiny ``sample_size``) and, to keep the prompt short,
    ``complex_human_instruction=None``.
    """
    from diffusers import (
        AutoencoderDC,
        FlowMatchEulerDiscreteScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    torch.manual_seed(seed)
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\u2581": 4}
    vocab.update({c: 5 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], model_max_length=32)
    gemma = Gemma2Config(vocab_size=len(vocab), hidden_size=8, intermediate_size=16)
    gemma.update(dict(head_dim=4, num_attention_heads=2, num_key_value_heads=2))
    gemma.update(dict(num_hidden_layers=1, max_position_embeddings=512))
    text_encoder = Gemma2Model(gemma).eval()
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")  # three levels: downsample 4
    dc = dict(in_channels=3, latent_channels=4, attention_head_dim=2, scaling_factor=0.41407)
    for side in ("encoder", "decoder"):
        dc.update({f"{side}_block_types": blocks, f"{side}_block_out_channels": (8, 8, 8)})
        dc.update({f"{side}_qkv_multiscales": ((), (), (5,)), f"{side}_layers_per_block": (1,) * 3})
    dc.update(downsample_block_type="conv", upsample_block_type="interpolate")
    vae = AutoencoderDC(**dc, decoder_norm_types="rms_norm", decoder_act_fns="silu")
    cfg = dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, sample_size=8)
    cfg.update(num_attention_heads=2, attention_head_dim=4, caption_channels=8)
    cfg.update(num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8)
    transformer = SanaTransformer2DModel(**cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    parts = dict(transformer=transformer, scheduler=scheduler, vae=vae)
    return _quiet(SanaPipeline(**parts, text_encoder=text_encoder, tokenizer=tokenizer))


def run_dit(pipe, prompts, seed=0, row_offset=0, steps=4, **kw):
    """A seeded DiT call on ``prompts`` at 32x32, row i's noise seeded by (seed, row_offset + i).

    Returns the final latents in the pipeline's layout (Flux: packed tokens).
    """
    generators = [
        torch.Generator().manual_seed(seed * 1000 + row_offset + i) for i in range(len(prompts))
    ]
    return pipe(
        prompts,
        num_inference_steps=steps,
        height=32,
        width=32,
        generator=generators,
        output_type="latent",
        **kw,
    ).images
