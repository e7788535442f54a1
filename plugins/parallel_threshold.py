"""Confidence-threshold parallel decoding, from "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding" (arXiv:2505.22618).

At each step of a masked-diffusion loop, commit the single most confident
masked position of the current block and every other one whose predicted-token
probability is at least ``threshold`` (the paper: 0.9); a block ends when it
holds no mask, so easy blocks take fewer model calls. The rule is the core
sampler's ``threshold`` remasking policy; this strategy installs it through
``decodekit_mdm_select`` (slot ``selector``) so that it composes with a cache
strategy such as ``dkv-cache`` in one strategies list. The same rule is
available without a strategy as the pipeline's ``remasking="threshold"``.

``factor`` switches to the paper's factor-based rule (`decodekit.remasking.FactorRemasking`,
also the pipeline's ``remasking="factor"``): the more confident the leading
positions, the more of them commit in one step.

Measured results: docs/benchmarks.md (section dkv-cache, "dkv-cache + threshold").
"""

from __future__ import annotations

from typing import Any

from decodekit.hookspecs import hookimpl
from decodekit.remasking import FactorRemasking, ThresholdRemasking
from decodekit.strategy import Params, Strategy
from pydantic import Field


class ParallelThresholdParams(Params):
    """Parameters of `parallel-threshold`."""

    threshold: float = Field(
        0.9,
        ge=0.0,
        description="Commit every masked position of the current block whose predicted-token "
        "probability is >= threshold, and always the most confident one (Fast-dLLM: 0.9); "
        "above 1 commits exactly one token per step.",
    )
    factor: float | None = Field(
        None,
        gt=0.0,
        le=1000.0,
        description="Use Fast-dLLM's factor rule instead of the threshold: commit the n most "
        "confident masked positions of the block, n the longest lead of the confidence order "
        "with c_i >= 1 - factor / (i + 1) (the paper's runs: 1). None: the threshold rule.",
    )


class ParallelThreshold(Strategy):
    """Replace the pipeline's remasking policy with the confidence-threshold rule."""

    name = "parallel-threshold"
    loops = ("masked-diffusion",)
    Params = ParallelThresholdParams
    slot = "selector"
    paper = (
        "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and "
        "Parallel Decoding, arXiv:2505.22618"
    )

    def __init__(self, params=None, *, path: str = "params", **kwargs):
        super().__init__(params, path=path, **kwargs)
        p = self.params
        self.policy = (
            ThresholdRemasking(p.threshold) if p.factor is None else FactorRemasking(p.factor)
        )
        self.reset(None)

    def reset(self, run) -> None:
        self.steps = 0

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps}

    @hookimpl
    def decodekit_mdm_select(self, run, step, policy):
        self.steps += 1
        return self.policy


@hookimpl
def decodekit_register_strategies(register):
    register(ParallelThreshold)
