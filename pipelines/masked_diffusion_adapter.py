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
from decodekit.pipeline import Inputs
from decodekit.pipelines.bidirectional_lm import load_bidirectional_lm
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline
from decodekit.seeds import row_generators

__all__ = ["MaskedDiffusionInputs", "MaskedDiffusionLMAdapter"]


class MaskedDiffusionInputs(Inputs):
    """YAML ``inputs`` of a masked-diffusion-lm pipeline (the arguments of its ``__call__``)."""

    prompt: str | list[str]
    gen_length: int = 64
    block_length: int = 32
    steps: int = 64
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low-confidence"
    threshold: float | None = None
    shift: bool = False
    schedule: Literal["llada", "dream"] = "llada"
    batch_size: int | None = None
    """Run the prompts in batches of this many rows (None: all at once)."""


class MaskedDiffusionLMAdapter(MaskedDiffusionAdapter):
    """Attach to a `MaskedDiffusionLMPipeline`: its loop calls the runtime hooks itself."""

    name = "masked-diffusion-lm"
    loop = "masked-diffusion"
    Inputs = MaskedDiffusionInputs
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
    def load(cls, source: str, *, device: str, dtype: str, options: dict[str, Any]) -> Any:
        from transformers import AutoTokenizer

        options = dict(options)
        mask_token_id = options.pop("mask_token_id", None)
        try:
            model = load_bidirectional_lm(
                source, dtype=getattr(torch, dtype), local_files_only=True, **options
            )
        except ValueError as e:
            raise ConfigError("pipeline.model", str(e)) from None
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        return MaskedDiffusionLMPipeline(
            model.to(device).eval(), tokenizer, mask_token_id=mask_token_id
        )

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
