"""Adapter `vlm`: vision-language models (transformers' ``LlavaForConditionalGeneration`` and
relatives) through ``generate``: images and text in, text out.

The loop is the causal-lm one (transformers owns it; ``generate`` is wrapped
the same way, with the same hooks), with an image prefix: the processor expands
each image into the model's image tokens, which the vision tower's features
replace in the language model's input. Strategies that prune the image context
(``fastv``) hook the language model's layers (`decodekit.token_pruning`).

YAML: ``pipeline: {type: vlm, model: <folder>}`` where the folder holds the model
and its processor (``save_pretrained`` of both), ``inputs: {images: [...], prompt: [...]}``
with one image path per prompt (or one image for every prompt).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from decodekit.errors import ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.pipeline import check_prompts
from decodekit.seeds import row_seeds
from pydantic import Field, field_validator

from .causal_lm import CausalLMAdapter, CausalLMInputs, _stop_ids, _until_stop


@dataclass(eq=False)
class VLMPipeline:
    """A vision-language model and its processor (what `VLMAdapter.load` returns)."""

    model: Any
    processor: Any


def _vlm_of(obj: Any) -> Any:
    from transformers import PreTrainedModel

    if isinstance(obj, VLMPipeline):
        obj = obj.model
    if (
        isinstance(obj, PreTrainedModel)
        and hasattr(obj, "generate")
        and getattr(obj.config, "vision_config", None) is not None
        and getattr(obj.config, "image_token_id", getattr(obj.config, "image_token_index", None))
        is not None
    ):
        return obj
    return None


class VLMInputs(CausalLMInputs):
    """YAML ``inputs`` of a vlm pipeline: image paths and prompts (plus ``generate`` keywords).

    Each prompt gets the image at the same index; a single image goes with every
    prompt. A prompt without the processor's image token gets it in front.
    """

    images: str | list[str] = Field(description="an image path or a list of them (one per prompt)")

    @field_validator("images")
    @classmethod
    def _images(cls, v: str | list[str]) -> str | list[str]:
        rows = [v] if isinstance(v, str) else v
        if not rows:
            raise ValueError("the image list is empty; give one image per prompt")
        if any(not isinstance(p, str) or not p for p in rows):
            raise ValueError("each image is a non-empty file path")
        return check_prompts(v)

    def rows(self) -> tuple[list[str], list[str]]:
        """(image paths, prompts), one of each per row."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        images = [self.images] if isinstance(self.images, str) else list(self.images)
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        if len(images) != len(prompts):
            raise ConfigError(
                "inputs.images",
                f"{len(images)} images for {len(prompts)} prompts; give one image per prompt "
                "(or a single image for all of them)",
            )
        return images, prompts


def _open_image(path: str, where: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ConfigError(where, f"no image file at {path!r}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ConfigError(where, f"{path!r} is not a readable image ({e})") from None


class VLMAdapter(CausalLMAdapter):
    """Attach to a vision-language model's ``generate`` (LLaVA and relatives)."""

    name = "vlm"
    Inputs = VLMInputs
    description = "transformers vision-language models (LLaVA and relatives) through generate"

    def __init__(self, target: Any, run):
        super().__init__(target, run)
        self.model = _vlm_of(target)

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return _vlm_of(obj) is not None

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: str,
        dtype: str,
        options: dict[str, Any],
        trust_remote_code: bool = False,
    ) -> VLMPipeline:
        from decodekit.config import check_options
        from transformers import AutoModelForImageTextToText, AutoProcessor

        opts = check_options(cls, options).model_dump(exclude_none=True)
        remote = {"trust_remote_code": True} if trust_remote_code else {}
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=getattr(torch, dtype), local_files_only=True, **opts, **remote
        )
        processor = AutoProcessor.from_pretrained(source, local_files_only=True, **remote)
        if _vlm_of(model) is None:
            raise ConfigError(
                "pipeline.model",
                f"{type(model).__name__} is not a vision-language model with image tokens",
            )
        if "device_map" not in opts:
            model = model.to(device)
        return VLMPipeline(model.eval(), processor)

    @classmethod
    def generate(
        cls, target: Any, inputs: VLMInputs, progress: bool = False
    ) -> list[dict[str, Any]]:
        if not isinstance(target, VLMPipeline):
            raise ConfigError(
                "pipeline", "the vlm adapter runs a VLMPipeline (model and processor)"
            )
        model, processor = target.model, target.processor
        tokenizer = processor.tokenizer
        paths, prompts = inputs.rows()
        images = [_open_image(p, f"inputs.images.{i}") for i, p in enumerate(paths)]
        token = getattr(processor, "image_token", "<image>")
        texts = [p if token in p else f"{token} {p}" for p in prompts]
        kwargs = {
            "max_new_tokens": inputs.max_new_tokens,
            "do_sample": inputs.do_sample,
            "pad_token_id": tokenizer.pad_token_id,
            **inputs.extra,
        }
        rows = list(range(len(prompts)))
        if kwargs["do_sample"]:  # one row at a time, seeded from the prompt (as causal-lm)
            groups = [([i], s) for i, s in zip(rows, row_seeds(inputs.seed, prompts))]
        else:
            groups = [(rows, inputs.seed)]
        stops = _stop_ids(model, kwargs)
        results = []
        for group, seed in groups:
            tokenizer.padding_side = "left"
            enc = processor(
                images=[images[i] for i in group],
                text=[texts[i] for i in group],
                return_tensors="pt",
                padding=True,
            ).to(model.device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
            torch.manual_seed(seed)
            out = model.generate(**enc, **kwargs)
            sequences = out.sequences if hasattr(out, "sequences") else out
            new = sequences[:, enc["input_ids"].shape[1] :]
            if len(new) != len(group):
                raise ConfigError(
                    "inputs.extra",
                    f"vlm returns one row per prompt; generate gave {len(new)} rows for "
                    f"{len(group)} prompts (num_return_sequences > 1 is not supported)",
                )
            for i, row in zip(group, new.tolist()):
                tokens = _until_stop(row, stops)
                results.append(
                    {
                        "prompt": prompts[i],
                        "image": paths[i],
                        "text": tokenizer.decode(tokens, skip_special_tokens=True),
                        "tokens": tokens,
                    }
                )
        return results


@hookimpl
def decodekit_register_pipelines(register):
    register(VLMAdapter)
