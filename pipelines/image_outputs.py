"""Outputs of decodekit's own image pipelines (ar-image, var), handled as stable-diffusion's are.

`ImageOutputs` gives an adapter stable-diffusion's ``save`` (one PNG per image,
``000-<prompt slug>.png``, written atomically), ``records`` (file, prompt, row
seed), ``quality`` (PSNR and identity) and ``picture`` (the labelled side-by-side
grid). An adapter whose prompts are not captions overrides `ImageOutputs.labelled`
to name them (ar-image's class ids become ``"class 3"``); `generate_in_batches` runs
a YAML ``inputs`` section in batches with one generator per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
