"""Outputs of decodekit's own image pipelines (ar-image, var), handled as stable-diffusion's are.

`ImageOutputs` gives an adapter stable-diffusion's ``save`` (one PNG per image,
``000-<prompt slug>.png``, written atomically), ``records`` (file, prompt, row
seed), ``quality`` (PSNR and identity) and ``picture`` (the labelled side-by-side
grid). An adapter whose prompts are not captions overrides `ImageOutputs.labelled`
to name them (ar-image's class ids become ``"class 3"``); `generate_in_batches` runs
a YAML ``inputs`` section in batches with one generator per row.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from decodekit.pipeline import Inputs, check_prompts
from pydantic import Field, field_validator

CLASS_ID = re.compile(r"class \d+")
"""How a class id given in YAML is labelled (row seeds, file names), as ar-image labels it."""


class ClassInputs(Inputs):
    """YAML ``inputs`` whose prompts are classes (var, mar): ids, or names of the folder's classes.

    Validated ids become ``"class N"`` labels (row seeds and file names read text);
    `class_rows` turns the labels back into what the pipeline takes.
    """

    prompt: int | str | list[int | str] = Field(
        description="class ids, or class names of a folder with class_names"
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        rows = [v] if not isinstance(v, list) else v
        if any(isinstance(r, bool) for r in rows):
            raise ValueError("a class is an int id or a class name, not a boolean")
        return v

    @field_validator("prompt")
    @classmethod
    def _labels(cls, v: Any) -> list[str]:
        rows = [v] if isinstance(v, (int, str)) else list(v)
        check_prompts(rows)
        return [r if isinstance(r, str) else f"class {r}" for r in rows]


def class_rows(labels: list[str], class_names: list[str] | None) -> list[int | str]:
    """`ClassInputs` labels as the pipeline's classes: ``"class N"`` is id N unless it is a class name."""
    names = class_names or []
    return [int(p[6:]) if p not in names and CLASS_ID.fullmatch(p) else p for p in labels]


def generate_in_batches(
    target: Any, rows: list, labels: list[str], seed: int, size: int | None, **call: Any
) -> list:
    """``target(rows, generator=..., **call).images`` in batches of ``size`` rows (None: one batch).

    One generator per row, seeded from ``seed`` and the row's label (`decodekit.seeds`),
    not from its index, so a row's image does not depend on the batching.
    """
    from decodekit.seeds import row_generators

    generators = row_generators(seed, labels, device=target.device.type)
    size = size or len(rows)
    images: list = []
    for first in range(0, len(rows), size):
        out = target(rows[first : first + size], generator=generators[first : first + size], **call)
        images += out.images
    return images


def generate_classes(target: Any, inputs: ClassInputs, **call: Any) -> list:
    """A `ClassInputs` run of a class-conditional pipeline: its labels as classes, in batches."""
    labels = list(inputs.prompt)
    rows = class_rows(labels, target.class_names)
    return generate_in_batches(target, rows, labels, inputs.seed, inputs.batch_size, **call)


def load_pipeline_folder(pipeline_cls: Any, source: str, device: str, dtype: str) -> Any:
    """``pipeline_cls.from_pretrained(source)`` on ``device``, a bad folder a `ConfigError` on ``pipeline.model``."""
    import torch
    from decodekit.errors import ConfigError, DecodekitError

    try:
        pipe = pipeline_cls.from_pretrained(source, torch_dtype=getattr(torch, dtype))
    except (ValueError, DecodekitError) as e:
        raise ConfigError("pipeline.model", str(e)) from None
    return pipe.to(device)


class ImageOutputs:
    """Mixin of an image adapter: save, record and compare images as stable-diffusion does."""

    @classmethod
    def labelled(cls, inputs: Any) -> Any:
        """``inputs`` with prompts as the captions that name files and records (as they are here)."""
        return inputs

    @classmethod
    def save(cls, outputs: list, out_dir: Path, inputs: Any = None) -> list[Path]:
        """One PNG per image (``000-<prompt slug>.png`` ...), written atomically."""
        from decodekit.pipelines import stable_diffusion

        return stable_diffusion.StableDiffusionAdapter.save(
            outputs, out_dir, inputs=cls.labelled(inputs)
        )

    @classmethod
    def records(cls, outputs: list, inputs: Any) -> list[dict[str, Any]]:
        """Per image: ``file``, ``prompt`` and its row ``seed``."""
        from decodekit.pipelines import stable_diffusion

        return stable_diffusion.StableDiffusionAdapter.records(outputs, cls.labelled(inputs))

    @classmethod
    def quality(cls, baseline: list, outputs: list) -> dict[str, float]:
        """PSNR and exact identity of the images."""
        from decodekit.pipelines import stable_diffusion

        return stable_diffusion.StableDiffusionAdapter.quality(baseline, outputs)

    @classmethod
    def picture(cls, baseline: list, outputs: list, path: Path) -> bool:
        """The labelled side-by-side grid of baseline and strategy images."""
        from decodekit.pipelines import stable_diffusion

        return stable_diffusion.StableDiffusionAdapter.picture(baseline, outputs, path)
