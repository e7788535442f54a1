"""Tiny models, pipelines and a toy plugin shared by the tests; nothing here downloads.

The tiny Stable Diffusion (SDXL, ControlNet, img2img) pipelines, Llamas and the
masked-diffusion pipeline are `decodekit.testing`'s (imported here for the tests);
this file adds a toy plugin (adapter, strategies, metrics) for the config, CLI and
bench tests, and a few fixed inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import decodekit
import torch
from decodekit.pipeline import Options
from decodekit.testing import MASK, VOCAB, tiny_text_encoder
from pydantic import Field, StrictInt


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
    counters = ("hits",)

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
MDM_PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]  # rows of different lengths

IDS = torch.tensor([[5, 6, 7, 4], [0, 8, 9, 3]])
ATTN = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])


def run_llada2(pipe, ids=IDS, attn=ATTN, **kw):
    """A greedy `tiny_llada2_pipeline` call on left-padded ``ids`` (16 new tokens, blocks of 8)."""
    args = dict(
        mask_token_id=MASK,
        eos_token_id=None,
        gen_length=16,
        block_length=8,
        num_inference_steps=8,
        output_type="seq",
        sampling_method="greedy",
        threshold=0.5,
        editing_threshold=None,
    )
    args.update(kw)
    return pipe(input_ids=ids, attention_mask=attn, **args).sequences


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


class ScriptedClock:
    """A clock whose successive intervals are given: each arm reads it twice (start, end)."""

    def __init__(self, durations: list[float]):
        self.durations = list(durations)
        self.now = 0.0
        self.started = False

    def __call__(self) -> float:
        if self.started:
            self.now += self.durations.pop(0)
        self.started = not self.started
        return self.now


# -- tiny_llava cases (fastv, dynamic-llava, token admission, vlm bench) -----------------------
VLM_IMAGE_ID = 4  # tiny_llava's image token id
VLM_PROMPTS = ["<image> what shape", "<image> which colour is it where", "<image> the left"]


def vlm_image(seed: int):
    """A 20x20 RGB noise image (PIL), the same for the same seed."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (20, 20, 3), dtype=np.uint8))


def vlm_enc(processor, rows):
    """tiny_llava's processor output for `VLM_PROMPTS` rows ``rows``, each with its own image."""
    return processor(
        images=[vlm_image(i) for i in rows],
        text=[VLM_PROMPTS[i] for i in rows],
        return_tensors="pt",
        padding=True,
    )


def vlm_generate(model, enc, n=5, *, sample=False, seed=None, with_cache=False):
    """``n`` new tokens (image tokens suppressed): (new tokens, their logits ``(B, n, V)``).

    Greedy, or sampled after ``torch.manual_seed(seed)``; ``with_cache`` appends the
    K/V cache generate returns.
    """
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        **enc,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=sample,
        suppress_tokens=[VLM_IMAGE_ID],
        return_dict_in_generate=True,
        output_logits=True,
    )
    got = out.sequences[:, enc["input_ids"].shape[1] :], torch.stack(out.logits, 1)
    return (*got, out.past_key_values) if with_cache else got
