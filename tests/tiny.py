"""Tiny randomly initialised models and pipelines built from configs, shared by the tests.

Nothing here downloads: Stable Diffusion, SDXL, ControlNet and img2img pipelines
(32x32 images, 8x8 latents), Llamas (causal, and bidirectional for masked
diffusion) and the seeded inputs the tests run them on; and a toy plugin (adapter,
strategies, metrics) for the config, CLI and bench tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import decodekit
import torch
from decodekit.pipeline import Options
from pydantic import Field, StrictInt


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


# -- a toy plugin: a loop over a tiny Linear; a strategy that serves every other call ------
class ToyPipe:
    """A 'pipeline' whose denoiser is a tiny Linear applied once per step."""

    loads = 0

    def __init__(self, source: str, device: str, dtype: str, scale: float):
        torch.manual_seed(0)
        self.source, self.device, self.scale = source, device, scale
        self.dtype = getattr(torch, dtype)
        self.model = torch.nn.Linear(4, 4).to(self.dtype)
        self._run = None

    def __call__(self, prompts: list[str], steps: int, seed: int) -> torch.Tensor:
        run = self._run
        if run is not None:
            run.begin_call({"steps": steps})
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(len(prompts), 4, generator=g).to(self.dtype)  # (B, 4)
        for step in range(steps):
            out = None
            if run is not None:
                out = run.call(
                    "decodekit_denoiser_forward",
                    run=run,
                    step=step,
                    role="denoiser",
                    module=self.model,
                    args=(x,),
                    kwargs={},
                )
            if out is None:
                with torch.no_grad():
                    out = self.model(x) * self.scale
                if run is not None:
                    run.nfe += 1
                    run.call(
                        "decodekit_denoiser_output",
                        run=run,
                        step=step,
                        role="denoiser",
                        module=self.model,
                        args=(x,),
                        kwargs={},
                        output=out,
                    )
            elif run is not None:
                run.served += 1
            x = torch.tanh(x + 0.1 * out)
        if run is not None:
            run.end_call(x)
        return x


class ToyInputs(decodekit.Inputs):
    """Inputs of the toy pipeline."""

    prompt: list[str] = ["a", "b"]
    steps: StrictInt = Field(8, ge=1, description="loop steps")


class ToyOptions(Options):
    """``pipeline.options`` of the toy adapter."""

    scale: float = 1.0


class ToyAdapter(decodekit.PipelineAdapter):
    """Adapter of ToyPipe: attaches by setting its run; outputs are a (B, 4) tensor."""

    name = "toy"
    loop = "continuous-denoising"
    Inputs = ToyInputs
    Options = ToyOptions
    description = "a toy denoising loop for tests"
    draw_picture = False

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return isinstance(obj, ToyPipe)

    def attach(self) -> None:
        self.target._run = self.run

    def detach(self) -> None:
        self.target._run = None

    @classmethod
    def load(cls, source: str, *, device: str, dtype: str, options: dict[str, Any]) -> ToyPipe:
        ToyPipe.loads += 1
        return ToyPipe(source, device, dtype, float(options.get("scale", 1.0)))

    @classmethod
    def generate(cls, target: ToyPipe, inputs: ToyInputs, progress: bool = False) -> torch.Tensor:
        return target(inputs.prompt, inputs.steps, inputs.seed)

    @classmethod
    def save(cls, outputs: torch.Tensor, out_dir: Path) -> list[Path]:
        path = Path(out_dir) / "outputs.jsonl"
        with path.open("w") as f:
            for i, row in enumerate(outputs.tolist()):
                f.write(json.dumps({"index": i, "values": row}) + "\n")
        return [path]

    @classmethod
    def quality(cls, baseline: torch.Tensor, outputs: torch.Tensor) -> dict[str, float]:
        return {"max_abs_diff": float((baseline - outputs).abs().max())}

    @classmethod
    def picture(cls, baseline: Any, outputs: Any, path: Path) -> bool:
        if not cls.draw_picture:
            return False
        from PIL import Image

        Image.new("RGB", (8, 4), "red").save(path)
        return True


class HalveParams(decodekit.Params):
    every: int = Field(
        2, ge=1, description="run the model on every `every`-th step, reuse it between"
    )


class Halve(decodekit.Strategy):
    """Serves the steps between every `every`-th one from the last real output."""

    name = "halve"
    loops = ("continuous-denoising",)
    slot = "denoiser-cache"
    Params = HalveParams
    paper = "Toy (arXiv:0000.00000)"

    def on_attach(self, run) -> None:
        self.reset(run)

    def reset(self, run) -> None:
        self.cached = None
        self.hits = 0

    @decodekit.hookimpl
    def decodekit_denoiser_forward(self, run, step, module, args, kwargs):
        if step % self.params.every and self.cached is not None:
            self.hits += 1
            return self.cached
        return None

    @decodekit.hookimpl
    def decodekit_denoiser_output(self, run, step, module, args, kwargs, output):
        self.cached = output

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits}

    def ideal_speedup(self, run) -> float | None:
        return float(self.params.every)


class Rival(decodekit.Strategy):
    """Another denoiser cache: cannot run beside `halve`."""

    name = "rival"
    loops = ("continuous-denoising",)
    slot = "denoiser-cache"


def toy_metric(adapter_name, baseline, outputs, inputs):
    """A registered quality metric: agreement of the rows' signs."""
    if adapter_name != "toy":
        return None
    return {
        "sign_agreement": float((baseline.sign() == outputs.sign()).float().mean()),
        "rows": len(inputs.prompt),
    }


def make_toy_plugin() -> SimpleNamespace:
    """A module-like plugin registering the toy adapter, strategies and metrics."""

    @decodekit.hookimpl
    def decodekit_register_pipelines(register):
        register(ToyAdapter)

    @decodekit.hookimpl
    def decodekit_register_strategies(register):
        register(Halve)
        register(Rival)

    @decodekit.hookimpl
    def decodekit_register_quality_metrics(register):
        register("toy-signs", toy_metric)
        register("never", lambda adapter_name, baseline, outputs, inputs: None)

    return SimpleNamespace(
        decodekit_register_pipelines=decodekit_register_pipelines,
        decodekit_register_strategies=decodekit_register_strategies,
        decodekit_register_quality_metrics=decodekit_register_quality_metrics,
    )


def toy_config(model_dir: Path, **sections: Any) -> dict[str, Any]:
    """A valid config for the toy plugin; keyword sections replace the defaults."""
    cfg = {
        "pipeline": {
            "type": "toy",
            "model": str(model_dir),
            "device": "cpu",
            "dtype": "float32",
            "options": {"scale": 1.0},
        },
        "strategies": [{"name": "halve", "params": {"every": 2}}],
        "inputs": {"prompt": ["a", "b"], "steps": 8, "seed": 0},
        "output": {"dir": str(model_dir.parent / "out")},
        "bench": {"repeat": 2, "warmup": 0},
    }
    cfg.update(sections)
    return cfg


# -- masked diffusion ------------------------------------------------------------------------
MASK = 31
VOCAB = 32
MDM_PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]  # rows of different lengths


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


class EchoModel(torch.nn.Module):
    """Output at position j strongly predicts token x_j + 1 (a mask input predicts nothing)."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        logits = torch.zeros(*input_ids.shape, VOCAB, dtype=torch.float64)
        nxt = (input_ids + 1) % (VOCAB - 1)
        logits.scatter_(-1, nxt[..., None], 10.0)
        logits[input_ids == MASK] = 0.0
        return type("Out", (), {"logits": logits})()


# -- autoregressive image tokens (ar-image) ---------------------------------------------------
AR_CODES = 8
AR_IMAGE_TOKENS = (3, 4)  # H x W codes; not square, so that a swap shows


def tiny_vq(seed: int = 0, codes: int = AR_CODES):
    """A VQModel with 2x downsampling and ``codes`` codebook entries (3x4 codes -> 6x8 pixels)."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        num_vq_embeddings=codes,
        norm_num_groups=8,
        sample_size=8,
    ).eval()


def tiny_ar_image_pipeline(
    seed: int = 0,
    dtype=torch.float64,
    codes: int = AR_CODES,
    layers=2,
    image_tokens=AR_IMAGE_TOKENS,
):
    """An ARImagePipeline: a random float64 causal Llama over caption words, BOI and ``codes`` codes."""
    from decodekit.pipelines.ar_image import ARImagePipeline
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_text_encoder()[1]
    boi = len(tokenizer)
    config = dict(
        image_tokens=image_tokens,
        code_offset=boi + 1,
        codebook_size=codes,
        boi_token_id=boi,
        pad_token_id=tokenizer.pad_token_id,
        max_prompt_tokens=24,
        null_prompt="",
    )
    torch.manual_seed(seed)
    lm_cfg = LlamaConfig(
        vocab_size=boi + 1 + codes,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.5,  # wide weights: greedy codes vary along the image, not one repeated code
    )
    lm = LlamaForCausalLM(lm_cfg).to(dtype).eval()
    return ARImagePipeline(lm, tiny_vq(seed, codes).to(dtype), tokenizer, config)
