"""Adapter `ar-image`: decodekit's `ARImagePipeline` in YAML runs and sessions.

The pipeline (``decodekit.pipelines.ar_image``) owns its loop: at every call it
looks up the run attached to it, runs the whole call inside
``run.guarded_call`` and hands the image span to the strategies through
``decodekit_image_tokens(run, decoder)``, so attaching only checks that it has
a language model. The adapter's other work is loading an ar-image folder
(``ar_image.json``, ``lm/``, ``vq/``, ``tokenizer/``), running a YAML
``inputs`` section with one generator per row (`decodekit.seeds`), and saving
and comparing images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from decodekit.errors import AttachError, ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.loops import TokenAutoregressionAdapter
from decodekit.pipeline import MAX_PROMPTS, Inputs, Options, check_prompts
from decodekit.pipelines.ar_image import CONFIG_NAME, ARImagePipeline
from decodekit.pipelines.ar_image_families import SUPPORTED, from_transformers
from decodekit.pipelines.image_outputs import ImageOutputs, generate_in_batches
from pydantic import Field, field_validator

__all__ = ["ARImageAdapter", "ARImageInputs", "ARImageOptions"]


class ARImageInputs(Inputs):
    """YAML ``inputs`` of an ar-image pipeline (the arguments of its ``__call__``)."""

    prompt: str | int | list[str] | list[int] = Field(
        description="a caption or a non-empty list of captions; for a class-conditional model "
        "(a converted LlamaGen c2i checkpoint) a class id or a list of them"
    )
    guidance_scale: float = Field(
        1.0, ge=1.0, le=100.0, description="classifier-free guidance, 1 (off) .. 100"
    )
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 is greedy (argmax)")
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="keep the k likeliest codes")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus filtering, (0, 1]")
    batch_size: int | None = Field(None, ge=1, le=MAX_PROMPTS)
    """Run the prompts in batches of this many rows (None: all at once)."""

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_booleans(cls, v: Any) -> Any:
        rows = v if isinstance(v, list) else [v]
        if any(isinstance(r, bool) for r in rows):
            raise ValueError("a prompt is a caption or an int class id, not a boolean")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | int | list[str] | list[int]) -> str | int | list[str] | list[int]:
        check_prompts([v] if isinstance(v, int) else v)  # an empty caption is allowed
        return v


class ARImageOptions(Options):
    """``pipeline.options`` of ar-image (the transformers families' load settings)."""

    image_area: int | None = Field(
        None,
        ge=64,
        le=4096 * 4096,
        description="Emu3 only: the image's area in pixels, as Emu3Processor takes it "
        "(e.g. 262144 for 512x512); required for an Emu3 folder",
    )
    max_prompt_tokens: int = Field(
        64, ge=1, le=4096, description="Emu3 and Janus: the longest prompt in tokens"
    )


class ARImageAdapter(ImageOutputs, TokenAutoregressionAdapter):
    """Attach to an `ARImagePipeline`: its loop calls the runtime hooks itself.

    ``model`` is the pipeline's language model; ``step`` the LM forwards of the
    current (or last) call, the prefill included.
    """

    name = "ar-image"
    loop = "token-autoregression"
    Inputs = ARImageInputs
    Options = ARImageOptions
    description = "decodekit's autoregressive text-to-image over VQ codes (LlamaGen-style, CFG)"

    def __init__(self, target: Any, run):
        super().__init__(target, run)
        self.pipe = target
        self.model = getattr(target, "lm", None)

    @property
    def step(self) -> int:
        decoder = getattr(self.pipe, "decoder", None)
        return decoder.forwards if decoder is not None else 0

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return isinstance(obj, ARImagePipeline)

    def touched(self) -> list[Any]:
        return [self.target, self.model]

    def attach(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise AttachError(
                "the pipeline has no language model (pipe.lm must be a torch module)."
            )

    def detach(self) -> None:
        """Nothing to undo: the pipeline looks up its run at every call."""

    # -- YAML runs and bench -----------------------------------------------------------------
    @classmethod
    def load(cls, source: str, *, device: str, dtype: str, options: dict[str, Any]) -> Any:
        from decodekit.config import check_options

        opts = check_options(cls, options)
        if not (Path(source) / CONFIG_NAME).is_file():
            family = _transformers_family(Path(source))
            if family is not None:
                return _load_transformers(source, family, opts, dtype).to(device)
            raise ConfigError(
                "pipeline.model",
                f"{source} is neither an ar-image folder ({CONFIG_NAME}, lm/, vq/, tokenizer/) "
                "nor an Emu3 or Janus transformers folder (config.json with model_type "
                f"{' or '.join(repr(k) for k in SUPPORTED)}, and its processor). LlamaGen c2i "
                "checkpoints convert with `decodekit convert-llamagen`; other checkpoints are "
                "not supported yet.",
            )
        if opts.image_area is not None:
            raise ConfigError(
                "pipeline.options.image_area",
                "applies to Emu3 folders only; an ar-image folder's image size is its config's",
            )
        try:
            pipe = ARImagePipeline.from_pretrained(
                source, torch_dtype=getattr(torch, dtype), local_files_only=True
            )
        except ValueError as e:
            raise ConfigError("pipeline.model", str(e)) from None
        return pipe.to(device)

    @classmethod
    def generate(cls, target: Any, inputs: ARImageInputs, progress: bool = False) -> list:
        prompts = [inputs.prompt] if isinstance(inputs.prompt, (str, int)) else list(inputs.prompt)
        return generate_in_batches(
            target,
            prompts,
            _labels(prompts),
            inputs.seed,
            inputs.batch_size,
            guidance_scale=inputs.guidance_scale,
            temperature=inputs.temperature,
            top_k=inputs.top_k,
            top_p=inputs.top_p,
        )

    @classmethod
    def labelled(cls, inputs: Any) -> Any:
        """Class-id prompts named ``"class 3"`` for file names and records."""
        return _named(inputs)


def _labels(prompts: list) -> list[str]:
    """Captions as they are; class ids as ``"class 3"`` (row seeds and file names)."""
    return [p if isinstance(p, str) else f"class {p}" for p in prompts]


def _named(inputs: Any) -> Any:
    """``inputs`` with class-id prompts as their labels, for the names and records of outputs."""
    prompt = getattr(inputs, "prompt", None)
    if prompt is None or isinstance(prompt, str):
        return inputs
    rows = [prompt] if isinstance(prompt, int) else list(prompt)
    return inputs.model_copy(update={"prompt": _labels(rows)})


def _transformers_family(folder: Path) -> str | None:
    """``model_type`` of a transformers folder whose class `from_transformers` runs, else None."""
    import json

    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in SUPPORTED else None


def _load_transformers(source: str, kind: str, opts: ARImageOptions, dtype: str) -> Any:
    """An Emu3 or Janus folder (model and processor, as ``save_pretrained`` writes them) as a pipeline."""
    import transformers

    if kind == "emu3" and opts.image_area is None:
        raise ConfigError(
            "pipeline.options.image_area",
            "an Emu3 folder needs the image's area in pixels (Emu3Processor's image_area), "
            "e.g. `options: {image_area: 262144}` for 512x512",
        )
    if kind != "emu3" and opts.image_area is not None:
        raise ConfigError(
            "pipeline.options.image_area",
            f"applies to Emu3 folders only; a {SUPPORTED[kind]}'s image size is its VQ's",
        )
    model_cls = getattr(transformers, SUPPORTED[kind])
    try:
        model = model_cls.from_pretrained(
            source, dtype=getattr(torch, dtype), local_files_only=True
        ).eval()
        processor = transformers.AutoProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            "pipeline.model",
            f"could not load {SUPPORTED[kind]} and its processor from {source}: {e}",
        ) from None
    kwargs = {"max_prompt_tokens": opts.max_prompt_tokens}
    if kind == "emu3":
        kwargs["image_area"] = opts.image_area
    return from_transformers(model, processor, **kwargs)


@hookimpl
def decodekit_register_pipelines(register):
    register(ARImageAdapter)
