"""Adapter `mar`: decodekit's `MARPipeline` (masked autoregression over continuous tokens).

The pipeline (``decodekit.pipelines.mar_pipeline``) owns its loop: at every
call it looks up the run attached to it, runs the whole call inside
``run.guarded_call`` and asks ``decodekit_mar_step(run, decoder)`` before each
step whether a strategy advances the loop itself, so attaching only checks that
it has a model. The adapter's other work is loading a mar folder (``model/``,
``vae/``, optional ``mar.json`` with class names), running a YAML ``inputs``
section with one generator per row (`decodekit.seeds`), and saving and
comparing images.
"""

from __future__ import annotations

from typing import Any, Literal

from decodekit.errors import AttachError
from decodekit.hookspecs import hookimpl
from decodekit.loops import MaskedAutoregressionAdapter
from decodekit.pipeline import MAX_PROMPTS, Options
from decodekit.pipelines.image_outputs import (
    ClassInputs,
    ImageOutputs,
    generate_classes,
    load_pipeline_folder,
)
from decodekit.pipelines.mar import MARModel
from decodekit.pipelines.mar_pipeline import MARPipeline
from pydantic import Field

__all__ = ["MARAdapter", "MARInputs", "MAROptions"]


class MARInputs(ClassInputs):
    """YAML ``inputs`` of a mar pipeline (the arguments of its ``__call__``)."""

    num_iter: int = Field(64, ge=1, le=65536, description="MAR steps, 1 .. the number of tokens")
    cfg: float = Field(1.0, ge=0.0, le=100.0, description="guidance scale; 1 is unguided")
    cfg_schedule: Literal["linear", "constant"] = Field(
        "linear", description="MAR's linear guidance ramp, or constant"
    )
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="factor on the head's noise")
    batch_size: int | None = Field(None, ge=1, le=MAX_PROMPTS)
    """Run the prompts in batches of this many rows (None: all at once)."""


class MAROptions(Options):
    """``pipeline.options`` of mar: nothing beyond ``pipeline.dtype`` is taken from a config."""


class MARAdapter(ImageOutputs, MaskedAutoregressionAdapter):
    """Attach to a `MARPipeline`: its loop calls the runtime hooks itself."""

    name = "mar"
    loop = "masked-autoregression"
    Inputs = MARInputs
    Options = MAROptions
    description = "decodekit's MAR: class-conditional masked autoregression over continuous tokens"

    def __init__(self, target: Any, run):
        super().__init__(target, run)
        self.pipe = target
        self.model = getattr(target, "model", None)
        self.vae = getattr(target, "vae", None)

    @property
    def decoder(self) -> Any:
        return self.pipe.decoder

    @property
    def step(self) -> int:
        decoder = self.pipe.decoder
        return decoder.forwards if decoder is not None else 0

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return isinstance(obj, MARPipeline)

    def touched(self) -> list[Any]:
        return [self.target, self.model]

    def attach(self) -> None:
        if not isinstance(self.model, MARModel):
            raise AttachError("the pipeline has no model (pipe.model must be a MARModel).")

    def detach(self) -> None:
        """Nothing to undo: the pipeline looks up its run at every call."""

    # -- YAML runs and bench -----------------------------------------------------------------
    @classmethod
    def load(cls, source: str, *, device: str, dtype: str, options: dict[str, Any]) -> Any:
        from decodekit.config import check_options

        check_options(cls, options)
        return load_pipeline_folder(MARPipeline, source, device, dtype)

    @classmethod
    def generate(cls, target: Any, inputs: MARInputs, progress: bool = False) -> list:
        return generate_classes(
            target,
            inputs,
            num_iter=inputs.num_iter,
            cfg=inputs.cfg,
            cfg_schedule=inputs.cfg_schedule,
            temperature=inputs.temperature,
        )


@hookimpl
def decodekit_register_pipelines(register):
    register(MARAdapter)
