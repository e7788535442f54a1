"""Adapter `llada2`: diffusers' ``LLaDA2Pipeline`` with its ``BlockRefinementScheduler``.

diffusers owns this loop: per block it calls ``model(block_x, attention_mask=,
position_ids=)`` on the whole prefix up to the current block at every
refinement step and reads the block's logits. decodekit registers a diffusers
``ModelHook`` on ``pipe.model`` whose forward asks ``decodekit_mdm_forward``
first (so a cache such as ``dkv-cache`` serves the call with a partial
forward), and gives the pipeline a one-off subclass whose ``__call__`` marks
where a call starts and ends; detach restores both.

Within a call, ``step`` counts model calls and ``block_step`` restarts when the
window grows to a new block. The hook asks for valid logits on the whole
current block (the scheduler's editing pass reads committed positions too).
Commit choice stays with the ``BlockRefinementScheduler`` (pass ``threshold``
to the pipeline call): strategies that implement ``decodekit_mdm_select`` are
refused, and ``decodekit_mdm_committed`` is not called by this adapter.
"""

from __future__ import annotations

from typing import Any

import torch
from decodekit.diffusers_hooks import PipelineHooks
from decodekit.errors import AttachError
from decodekit.hookspecs import hookimpl
from decodekit.loops import MaskedDiffusionAdapter
from diffusers.hooks import ModelHook

HOOK_NAME = "decodekit-llada2"


class _ModelHook(ModelHook):
    """Routes every model call of the pipeline through ``decodekit_mdm_forward``."""

    def __init__(self, adapter: LLaDA2Adapter):
        super().__init__()
        self.adapter = adapter

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.adapter.forward(module, args, kwargs, self.fn_ref.original_forward)


def _is_llada2(obj: Any) -> bool:
    try:
        from diffusers import LLaDA2Pipeline
    except ImportError:  # older diffusers
        return False
    return isinstance(obj, LLaDA2Pipeline)


class LLaDA2Adapter(MaskedDiffusionAdapter):
    """Attach to a diffusers ``LLaDA2Pipeline``: serve its model calls from decodekit strategies."""

    name = "llada2"
    loop = "masked-diffusion"
    description = "diffusers LLaDA2Pipeline with BlockRefinementScheduler (block-wise refinement)"

    def __init__(self, target: Any, run):
        super().__init__(target, run)
        self.pipe = target
        self.model = getattr(target, "model", None)
        self._hooks = PipelineHooks(target, HOOK_NAME)
        self.step = 0
        self.block_step = 0
        self._window = 0
        self._inside = False
        self.mask_token_id: int | None = None
        self.block_length: int | None = None

    @classmethod
    def matches(cls, obj: Any) -> bool:
        return _is_llada2(obj)

    def touched(self) -> list[Any]:
        return [self.pipe, self.model]

    def attach(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise AttachError("LLaDA2Pipeline.model must be a torch module to attach to.")
        selectors = [s.name for s in self.run.strategies if hasattr(s, "decodekit_mdm_select")]
        if selectors:
            raise AttachError(
                f"{', '.join(selectors)} choose commits through decodekit_mdm_select, but "
                "LLaDA2Pipeline commits with its BlockRefinementScheduler; pass threshold=... "
                "to the pipeline call instead, or use the masked-diffusion-lm pipeline."
            )
        adapter = self

        def __call__(pipe_self, *args: Any, **kwargs: Any) -> Any:
            return adapter.call_pipeline(pipe_self, args, kwargs)

        self._hooks.attach([(self.model, _ModelHook(self))], {"__call__": __call__})

    def detach(self) -> None:
        self._hooks.restore()

    # -- the loop ---------------------------------------------------------------------------
    def call_pipeline(self, pipe: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
        """The wrapped ``__call__``: per-call reset and a guarded run."""
        run = self.run
        self.step = self.block_step = self._window = 0
        mask_id = kwargs.get("mask_token_id")
        self.mask_token_id = (
            mask_id if mask_id is not None else getattr(pipe, "mask_token_id", None)
        )
        block_length = kwargs.get("block_length")
        self.block_length = block_length or pipe.scheduler.config.block_length
        original_call = self._hooks.original_class.__call__
        return run.guarded_call(kwargs, lambda: original_call(pipe, *args, **kwargs))

    def forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], original):
        """One model call of the pipeline: served by a strategy when one answers."""
        run = self.run
        x = args[0] if args else kwargs.get("input_ids")
        if self._inside or not run.in_call or x is None or self.mask_token_id is None:
            # A strategy's own (partial) forward, or a call outside the pipeline loop.
            return original(*args, **kwargs)
        batch, length = x.shape
        if length != self._window:
            self._window, self.block_step = length, 0
        attention_mask = kwargs.get("attention_mask")
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device).expand(batch, length)
        if attention_mask is None:
            attention_mask = torch.ones_like(x)
        mask_index = x == self.mask_token_id  # (B, L)
        need = torch.zeros_like(mask_index)
        need[:, -self.block_length :] = True  # the scheduler reads the whole block
        run.nfe += 1
        self._inside = True
        try:
            served = run.call(
                "decodekit_mdm_forward",
                run=run,
                step=self.step,
                block_step=self.block_step,
                model=module,
                x=x,
                attention_mask=attention_mask,
                position_ids=position_ids.expand(batch, length),
                mask_index=mask_index,
                need_logits=need,
                logits_window=(0, length),
            )
        finally:
            self._inside = False
        self.step += 1
        self.block_step += 1
        if served is None:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import MaskedLMOutput

        logits = served[0] if isinstance(served, tuple) else served
        run.served += 1
        return MaskedLMOutput(logits=logits)


@hookimpl
def decodekit_register_pipelines(register):
    register(LLaDA2Adapter)
