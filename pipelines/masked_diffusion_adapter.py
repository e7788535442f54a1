"""Adapter `masked-diffusion-lm`: decodekit's `MaskedDiffusionLMPipeline` in YAML runs and sessions.

The pipeline (``decodekit.pipelines.masked_diffusion``) owns its loop and calls
the runtime hooks itself, so attaching only checks that it has a model; the
adapter's other work is loading a checkpoint (`load_bidirectional_lm`) and
running a YAML ``inputs`` section (`MaskedDiffusionInputs`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from decodekit.errors import AttachError, ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.loops import MaskedDiffusionAdapter
from decodekit.pipeline import MAX_PROMPTS, Inputs, Options, check_prompts
from decodekit.pipelines.bidirectional_lm import load_bidirectional_lm
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline, check_lengths
from decodekit.seeds import row_generators
from pydantic import Field, field_validator

MAX_GEN_LENGTH = 16384
"""Most tokens one config may generate per prompt."""

__all__ = ["MaskedDiffusionInputs", "MaskedDiffusionLMAdapter"]


class MaskedDiffusionInputs(Inputs):
    """YAML ``inputs`` of a masked-diffusion-lm pipeline (the arguments of its ``__call__``).

    The pipeline's length rules (`check_lengths`) are checked here, before the
    model loads: ``gen_length`` a multiple of ``block_length``, ``steps`` a
    multiple of the number of blocks and at most ``gen_length``.
    """

    prompt: str | list[str] = Field(description="a non-empty prompt or list of prompts")
    gen_length: int = Field(
        64, ge=1, le=MAX_GEN_LENGTH, description="tokens to generate; a multiple of block_length"
    )
    block_length: int = Field(
        32, ge=1, le=MAX_GEN_LENGTH, description="semi-autoregressive block size"
    )
    steps: int = Field(
        64, ge=1, le=MAX_GEN_LENGTH, description="model calls, a multiple of the number of blocks"
    )
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 is argmax")
    cfg_scale: float = Field(0.0, ge=0.0, le=100.0, description="LLaDA guidance, 0 is none")
    remasking: str = Field("low-confidence", description="a registered remasking policy name")
    threshold: float | None = Field(
        None, ge=0.0, le=100.0, description="threshold decoding's confidence threshold"
    )
    shift: bool = False
    schedule: Literal["llada", "dream"] = "llada"
    batch_size: int | None = Field(None, ge=1, le=MAX_PROMPTS)
    """Run the prompts in batches of this many rows (None: all at once)."""

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        return check_prompts(v, empty_ok=False)

    @field_validator("block_length")
    @classmethod
    def _block_length(cls, v: int, info) -> int:
        gen_length = info.data.get("gen_length")
        if gen_length is not None and gen_length % v:
            raise ValueError(
                f"gen_length ({gen_length}) must be a multiple of block_length ({v}); "
                f"e.g. block_length: {gen_length} for one block"
            )
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int, info) -> int:
        gen_length, block_length = info.data.get("gen_length"), info.data.get("block_length")
        if gen_length is not None and block_length is not None:
            try:
                check_lengths(gen_length, block_length, v)
            except ValueError as e:
                raise ValueError(str(e).rstrip(".")) from None
        return v

    @field_validator("remasking")
    @classmethod
    def _remasking(cls, v: str) -> str:
        from decodekit.remasking import REMASKING_POLICIES

        if v not in REMASKING_POLICIES:
            import difflib

            close = difflib.get_close_matches(v, list(REMASKING_POLICIES), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown remasking policy {v!r}.{hint} Known: {', '.join(sorted(REMASKING_POLICIES))}"
            )
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | None, info) -> float | None:
        remasking = info.data.get("remasking")
        if v is not None and remasking not in (None, "low-confidence", "threshold"):
            raise ValueError(
                f"threshold is only used by threshold decoding, not by remasking "
                f"{remasking!r}; drop threshold or set remasking: threshold"
            )
        return v


class MaskedDiffusionOptions(Options):
    """``pipeline.options`` of masked-diffusion-lm: what `load` accepts, nothing else."""

    mask_token_id: int | None = Field(
        None, ge=0, description="the mask token id (default: the tokenizer's or the config's)"
    )
    device_map: str | dict[str, int | str] | None = Field(
        None,
        description="spread a model too large for one device over several (transformers' "
        "device_map: auto, balanced, sequential, or module name -> device); the model is then "
        "placed by it, not moved to pipeline.device",
    )


class MaskedDiffusionLMAdapter(MaskedDiffusionAdapter):
    """Attach to a `MaskedDiffusionLMPipeline`: its loop calls the runtime hooks itself."""

    name = "masked-diffusion-lm"
    loop = "masked-diffusion"
    Inputs = MaskedDiffusionInputs
    Options = MaskedDiffusionOptions
    description = "decodekit's LLaDA/Dream-semantics masked diffusion over a bidirectional HF model"

    def __init__(self, target: Any, run):
        super().__init__(target, run)
        self.pipe = target
        self.model = getattr(target, "model", None)

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return isinstance(obj, MaskedDiffusionLMPipeline)

    def touched(self) -> list[Any]:
        return [self.target, self.model]

    def attach(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise AttachError("the pipeline has no model (pipe.model must be a torch module).")

    def detach(self) -> None:
        """Nothing to undo: the pipeline looks up its run at every call."""

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: str,
        dtype: str,
        options: dict[str, Any],
        trust_remote_code: bool = False,
    ) -> Any:
        from decodekit.config import check_options
        from transformers import AutoTokenizer

        opts = check_options(cls, options)
        mask_token_id = opts.mask_token_id
        remote = {"trust_remote_code": True} if trust_remote_code else {}
        placed = {} if opts.device_map is None else {"device_map": opts.device_map}
        try:
            model = load_bidirectional_lm(
                source, dtype=getattr(torch, dtype), local_files_only=True, **remote, **placed
            )
        except ValueError as e:
            raise ConfigError("pipeline.model", str(e)) from None
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if mask_token_id is not None and isinstance(vocab, int) and mask_token_id >= vocab:
            raise ConfigError(
                "pipeline.options.mask_token_id",
                f"{mask_token_id} is not a token of this model (vocab_size {vocab}); "
                "give the id of the mask token the model was trained with",
            )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, **remote)
        if not placed:  # a device_map placed the layers already
            model = model.to(device)
        return MaskedDiffusionLMPipeline(model.eval(), tokenizer, mask_token_id=mask_token_id)

    @classmethod
    def generate(
        cls, target: Any, inputs: MaskedDiffusionInputs, progress: bool = False
    ) -> list[dict[str, Any]]:
        prompts = [inputs.prompt] if isinstance(inputs.prompt, str) else list(inputs.prompt)
        size = inputs.batch_size or len(prompts)
        # one generator per row, seeded from its prompt (decodekit.seeds), not from its index
        generators = row_generators(inputs.seed, prompts)
        results = []
        for first in range(0, len(prompts), size):
            chunk = prompts[first : first + size]
            gens = generators[first : first + size]
            out = target(
                prompt=chunk,
                gen_length=inputs.gen_length,
                block_length=inputs.block_length,
                steps=inputs.steps,
                temperature=inputs.temperature,
                cfg_scale=inputs.cfg_scale,
                remasking=inputs.remasking,
                threshold=inputs.threshold,
                shift=inputs.shift,
                schedule=inputs.schedule,
                generator=gens,
            )
            for i, row in enumerate(out.sequences.tolist()):
                results.append(
                    {"prompt": chunk[i], "text": (out.texts or [""] * len(chunk))[i], "tokens": row}
                )
        return results


@hookimpl
def decodekit_register_pipelines(register):
    register(MaskedDiffusionLMAdapter)
