"""Adapter `vlm`: vision-language models (transformers' ``LlavaForConditionalGeneration`` and
relatives) through ``generate``: images and text in, text out.

The loop is the causal-lm one (transformers owns it; ``generate`` is wrapped
the same way, with the same hooks), with an image prefix: the processor expands
each image into the model's image tokens, which the vision tower's features
replace in the language model's input. Strategies that prune the image context
(``fastv``) hook the language model's layers (`decodekit.token_pruning`).

YAML: ``pipeline: {type: vlm, model: <folder>}`` where the folder holds the model
and its processor (``save_pretrained`` of both), ``inputs: {images: [...], prompt: [...]}``
with one image path per prompt (or one image for every prompt), optionally
``answers`` (one reference answer per prompt, scored by the ``vqa-accuracy``
metric) and ``batch_size`` (prompts per ``generate`` call).

While attached (in both arms of a bench) the adapter times each model forward
and splits the time into prefill (the first forward of a ``generate`` call,
vision tower included) and decode (the others), and measures the K/V cache
held at the end of each call: `VLMAdapter.stats`, under ``pipeline`` in the
run's stats.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from decodekit.errors import ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.pipeline import MAX_PROMPTS, check_prompts
from decodekit.seeds import row_seeds
from pydantic import Field, field_validator, model_validator

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
    answers: list[str] | None = Field(
        None,
        description="one reference answer per prompt (scored by the vqa-accuracy metric)",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=MAX_PROMPTS,
        description="prompts per generate call (default: all of them in one call)",
    )

    @field_validator("images")
    @classmethod
    def _images(cls, v: str | list[str]) -> str | list[str]:
        rows = [v] if isinstance(v, str) else v
        if not rows:
            raise ValueError("the image list is empty; give one image per prompt")
        if any(not isinstance(p, str) or not p for p in rows):
            raise ValueError("each image is a non-empty file path")
        return check_prompts(v)

    @field_validator("answers")
    @classmethod
    def _answers(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not isinstance(a, str) or not a.strip() for a in v):
            raise ValueError("each answer is a non-empty string (one reference answer per prompt)")
        return v

    @model_validator(mode="after")
    def _answers_per_prompt(self) -> VLMInputs:
        if self.answers is not None:
            prompts = 1 if isinstance(self.prompt, str) else len(self.prompt)
            if len(self.answers) != prompts:
                raise ValueError(
                    f"inputs.answers has {len(self.answers)} answers for {prompts} prompts; give "
                    "one reference answer per prompt"
                )
        return self

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


def _new_phases() -> dict[str, Any]:
    return {
        "prefill_s": 0.0,
        "decode_s": 0.0,
        "prefill_forwards": 0,
        "decode_forwards": 0,
        "generate_calls": 0,
        "kv_cache_bytes": 0,
        "kv_cache_rows": 0,
        "kv_cache_bytes_max": 0,
    }


def _sync(model: Any) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def cache_bytes(cache: Any) -> tuple[int, int]:
    """``(bytes, rows)``: the K/V tensors a transformers cache holds (every layer's keys and
    values, as stored) and its batch rows; ``(0, 0)`` for no cache."""
    if cache is None:
        return 0, 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [getattr(layer, name, None) for layer in layers for name in ("keys", "values")]
    else:  # a legacy tuple of (key, value) per layer
        tensors = [t for pair in cache for t in pair]
    tensors = [t for t in tensors if isinstance(t, torch.Tensor) and t.numel()]
    held = sum(t.numel() * t.element_size() for t in tensors)
    return held, (int(tensors[0].shape[0]) if tensors else 0)


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
        self._phases = _new_phases()
        self._t0 = 0.0
        self._cache: Any = None  # the cache the last forward of a generate call returned

    # -- prefill / decode time and the cache held, in both arms of a bench ------------------
    def attach(self) -> None:
        super().attach()
        self._phases = _new_phases()
        self._post = self.model.register_forward_hook(self._post_forward)

    def detach(self) -> None:
        if self._saved:
            self._post.remove()
        super().detach()
        self._cache = None

    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]):
        out = super()._pre_forward(module, args, kwargs)
        _sync(self.model)
        self._t0 = time.perf_counter()  # after the strategies' input hooks: the forward alone
        return out

    def _post_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        _sync(self.model)
        dt = time.perf_counter() - self._t0
        phase = "prefill" if self.step == 1 else "decode"
        self._phases[f"{phase}_s"] += dt
        self._phases[f"{phase}_forwards"] += 1
        # transformers 5 names it cache (past_key_values, deprecated, warns), 4.x past_key_values
        cache = output.get("cache") if hasattr(output, "get") else None
        self._cache = cache if cache is not None else getattr(output, "past_key_values", None)

    def call_generate(self, original_generate: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        self._cache = None
        try:
            return super().call_generate(original_generate, args, kwargs)
        finally:
            held, rows = cache_bytes(self._cache)
            self._cache = None
            p = self._phases
            p["generate_calls"] += 1
            p["kv_cache_bytes"] += held
            p["kv_cache_rows"] += rows
            p["kv_cache_bytes_max"] = max(p["kv_cache_bytes_max"], held)

    def stats(self) -> dict[str, Any]:
        """Since attach: prefill and decode seconds and forwards (every generate call), and the
        K/V cache held at the end of the calls: ``kv_cache_bytes`` summed over calls,
        ``kv_cache_bytes_max`` of the largest call, ``kv_cache_bytes_per_row``."""
        p = dict(self._phases)
        p["kv_cache_bytes_per_row"] = (
            p["kv_cache_bytes"] / p["kv_cache_rows"] if p["kv_cache_rows"] else None
        )
        return p

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
        else:  # greedy: batches of batch_size rows (all of them without one)
            size = inputs.batch_size or len(rows)
            groups = [(rows[i : i + size], inputs.seed) for i in range(0, len(rows), size)]
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
