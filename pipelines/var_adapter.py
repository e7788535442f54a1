"""Adapter `var`: decodekit's `VARPipeline` (next-scale prediction) in YAML runs and sessions.

The pipeline (``decodekit.pipelines.var``) owns its loop: at every call it
looks up the run attached to it, runs the whole call inside
``run.guarded_call``, asks ``decodekit_scale_models(run, plan)`` which model
runs which scale and calls ``decodekit_scale_end`` after each scale, so
attaching only checks that it has a transformer. The adapter's other work is
loading a var folder (``transformer/``, ``vq/``, optional ``var.json`` with
class names), running a YAML ``inputs`` section with one generator per row
(`decodekit.seeds`), and saving and comparing images.
"""

from __future__ import annotations

from typing import Any

from decodekit.errors import AttachError
from decodekit.hookspecs import hookimpl
from decodekit.loops import ScaleAutoregressionAdapter
from decodekit.pipeline import MAX_PROMPTS, Options
from decodekit.pipelines.image_outputs import (
    ClassInputs,
    ImageOutputs,
    generate_classes,
    load_pipeline_folder,
)
from decodekit.pipelines.var import VARPipeline, VARTransformer
from pydantic import Field, field_validator

__all__ = ["VARAdapter", "VARInputs", "VAROptions"]

MAX_SCALES = 64
"""More per-scale values than this is surely a mistake."""


class VARInputs(ClassInputs):
    """YAML ``inputs`` of a var pipeline (the arguments of its ``__call__``)."""

    cfg: float = Field(1.5, ge=0.0, le=100.0, description="VAR's guidance ratio, 0 (off) .. 100")
    temperature: float | list[float] = Field(
        1.0, description="0 is greedy; one value or one per scale, each in [0, 100]"
    )
    top_k: int | None | list[int | None] = Field(
        None, description="keep the k likeliest tokens; one value or one per scale"
    )
    top_p: float | None | list[float | None] = Field(
        None, description="nucleus filtering in (0, 1]; one value or one per scale"
    )
    temperature_last: bool = Field(
        True, description="temperature after top-k/top-p (VAR's order) instead of before"
    )
    more_smooth: bool = Field(False, description="VAR's visualisation mode (Gumbel-softmax codes)")
    batch_size: int | None = Field(None, ge=1, le=MAX_PROMPTS)
    """Run the prompts in batches of this many rows (None: all at once)."""

    @field_validator("temperature", "top_k", "top_p")
    @classmethod
    def _per_scale(cls, v: Any, info) -> Any:
        values = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not 1 <= len(v) <= MAX_SCALES:
            raise ValueError(f"one value per scale: 1 .. {MAX_SCALES} values, got {len(v)}")
        for x in values:
            if x is None:
                if info.field_name == "temperature":
                    raise ValueError("temperature must be a number >= 0 (0 is greedy)")
                continue
            if info.field_name == "temperature" and not 0 <= x <= 100:
                raise ValueError(f"temperature must lie in [0, 100], got {x}")
            if info.field_name == "top_k" and not 1 <= x <= 1_000_000:
                raise ValueError(f"top_k must lie in [1, 1000000], got {x}")
            if info.field_name == "top_p" and not 0 < x <= 1:
                raise ValueError(f"top_p must lie in (0, 1], got {x}")
        return v


class VAROptions(Options):
    """``pipeline.options`` of var: nothing beyond ``pipeline.dtype`` is taken from a config."""


class VARAdapter(ImageOutputs, ScaleAutoregressionAdapter):
    """Attach to a `VARPipeline`: its loop calls the runtime hooks itself."""

    name = "var"
    loop = "scale-autoregression"
    Inputs = VARInputs
    Options = VAROptions
    description = "decodekit's VAR: class-conditional next-scale prediction over a multi-scale VQ"

    def __init__(self, target: Any, run):
        super().__init__(target, run)
        self.pipe = target
        self.transformer = getattr(target, "transformer", None)
        self.vq = getattr(target, "vq", None)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.pipe.patch_nums

    @property
    def num_scales(self) -> int:
        return len(self.pipe.patch_nums)

    @property
    def decoder(self) -> Any:
        return self.pipe.decoder

    @property
    def step(self) -> int:
        decoder = self.pipe.decoder
        return decoder.forwards if decoder is not None else 0

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return isinstance(obj, VARPipeline)

    def touched(self) -> list[Any]:
        return [self.target, self.transformer]

    def attach(self) -> None:
        if not isinstance(self.transformer, VARTransformer):
            raise AttachError(
                "the pipeline has no transformer (pipe.transformer must be a VARTransformer)."
            )

    def detach(self) -> None:
        """Nothing to undo: the pipeline looks up its run at every call."""

    # -- YAML runs and bench -----------------------------------------------------------------
    @classmethod
    def load(cls, source: str, *, device: str, dtype: str, options: dict[str, Any]) -> Any:
        from decodekit.config import check_options

        check_options(cls, options)
        return load_pipeline_folder(VARPipeline, source, device, dtype)

    @classmethod
    def generate(cls, target: Any, inputs: VARInputs, progress: bool = False) -> list:
        return generate_classes(
            target,
            inputs,
            cfg=inputs.cfg,
            top_k=inputs.top_k,
            top_p=inputs.top_p,
            temperature=inputs.temperature,
            temperature_last=inputs.temperature_last,
            more_smooth=inputs.more_smooth,
        )


@hookimpl
def decodekit_register_pipelines(register):
    register(VARAdapter)
