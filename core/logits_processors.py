"""Logits processors: temperature, top-k, top-p, their chain, and classifier-free guidance.

Each processor maps logits ``(..., V)`` to processed logits of the same shape and
leaves its input alone; `ProcessorChain` applies several in order.
`decodekit.sampler.Sampler` builds its chain from these.
`classifier_free_guidance` combines conditional and unconditional logits in
either of the two conventions in use (diffusers/transformers, LLaDA).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Temperature",
    "TopK",
    "TopP",
    "ProcessorChain",
    "CFG_CONVENTIONS",
    "classifier_free_guidance",
]


@dataclass(frozen=True)
class Temperature:
    """Divide logits by a temperature.

    Attributes:
        temperature: float > 0. Below 1 sharpens, above 1 flattens. Greedy decoding
            (temperature 0) is not a processor: use ``Sampler(temperature=0)``.
    """

    temperature: float

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(
                f"Temperature needs a number > 0, got {self.temperature!r}; "
                "for greedy decoding use Sampler(temperature=0) instead."
            )

    def __call__(self, logits: Tensor) -> Tensor:
        """Return ``logits / temperature``."""
        return logits / self.temperature


@dataclass(frozen=True)
class TopK:
    """Keep the ``k`` largest logits of each row; set the rest to ``-inf``.

    Attributes:
        k: int >= 1. Tokens tied with the k-th largest logit are kept too (as in
            transformers' ``TopKLogitsWarper``); ``k >= V`` keeps everything.
    """

    k: int

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"TopK needs an integer k >= 1, got {self.k!r}.")

    def __call__(self, logits: Tensor) -> Tensor:
        """Return logits with everything below the k-th largest value set to ``-inf``."""
        if self.k >= logits.shape[-1]:
            return logits
        kth_largest = logits.topk(self.k, dim=-1).values[..., -1:]  # (..., 1)
        return logits.masked_fill(logits < kth_largest, -math.inf)


@dataclass(frozen=True)
class TopP:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches ``p``.

    Attributes:
        p: float in (0, 1]. Tokens are taken in order of decreasing probability
            until their cumulative mass is >= ``p``; the token that crosses ``p`` is
            kept, every later one is set to ``-inf``. The most likely token is
            always kept. ``p = 1`` keeps everything.
    """

    p: float

    def __post_init__(self):
        if not (isinstance(self.p, (int, float)) and 0 < self.p <= 1):
            raise ValueError(f"TopP needs p in (0, 1], got {self.p!r}.")

    def __call__(self, logits: Tensor) -> Tensor:
        """Return logits with everything outside the nucleus set to ``-inf``."""
        if self.p >= 1:
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
        work_dtype = torch.promote_types(sorted_logits.dtype, torch.float32)
        sorted_probs = sorted_logits.to(work_dtype).softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (..., V)
        # A token is in the nucleus when the mass of the tokens ranked above it is still < p.
        keep_sorted = mass_before < self.p
        keep_sorted[..., 0] = True
        keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)  # (..., V), unsorted
        return logits.masked_fill(~keep, -math.inf)


class ProcessorChain:
    """Apply processors in order; itself a `LogitsProcessor`."""

    def __init__(self, processors: Iterable[Callable[[Tensor], Tensor]] = ()):
        self.processors = list(processors)
        for processor in self.processors:
            if not callable(processor):
                raise TypeError(
                    f"ProcessorChain takes callables mapping logits to logits, got {processor!r}."
                )

    def __call__(self, logits: Tensor) -> Tensor:
        """Return the logits after every processor, first to last."""
        for processor in self.processors:
            logits = processor(logits)
        return logits

    def __len__(self) -> int:
        return len(self.processors)

    def __repr__(self) -> str:
        return f"ProcessorChain({self.processors!r})"


CFG_CONVENTIONS = ("standard", "llada")
"""Names accepted by `classifier_free_guidance`'s ``convention``."""


def classifier_free_guidance(
    cond_logits: Tensor, uncond_logits: Tensor, scale: float, convention: str = "standard"
) -> Tensor:
    """Combine conditional and unconditional logits ``(..., V)`` with classifier-free guidance.

    Two conventions are in use and they differ by one in the scale:

    * ``"standard"`` (diffusers, transformers, SJD/LlamaGen):
      ``uncond + scale * (cond - uncond)``; ``scale = 1`` returns ``cond``,
      ``scale = 0`` returns ``uncond``.
    * ``"llada"`` (LLaDA's ``cfg_scale``):
      ``uncond + (scale + 1) * (cond - uncond)``; ``scale = 0`` returns ``cond``.

    Args:
        cond_logits: logits given the condition, ``(..., V)``.
        uncond_logits: logits without it, same shape.
        scale: the guidance scale, in the chosen convention.
        convention: ``"standard"`` or ``"llada"``.

    Returns:
        The guided logits, ``(..., V)``.
    """
    if convention not in CFG_CONVENTIONS:
        raise ValueError(
            f"unknown classifier-free guidance convention {convention!r}; use one of "
            f"{CFG_CONVENTIONS}: 'standard' is uncond + s*(cond - uncond), "
            "'llada' is uncond + (s+1)*(cond - uncond)."
        )
    if cond_logits.shape != uncond_logits.shape:
        raise ValueError(
            f"conditional logits {tuple(cond_logits.shape)} and unconditional logits "
            f"{tuple(uncond_logits.shape)} must have the same shape."
        )
    weight = scale + 1 if convention == "llada" else scale
    return uncond_logits + weight * (cond_logits - uncond_logits)  # (..., V)
