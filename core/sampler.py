"""Logits to tokens: `Sampler` and `sample_categorical`.

`Sampler` applies temperature, top-k and top-p (in transformers' order)
and draws one token per row, returning the tokens together with the
distribution they were drawn from, which a speculative verifier needs
(`decodekit.speculative`). Randomness always comes from an explicit
``torch.Generator``, never from torch's global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .logits_processors import ProcessorChain, Temperature, TopK, TopP

__all__ = [
    "Sampled",
    "Sampler",
    "sample_categorical",
    "check_generator",
]


def check_generator(generator: torch.Generator | None, like: Tensor, what: str) -> None:
    """Raise a clear error when a generator is missing or on another device than ``like``."""
    if generator is None:
        raise ValueError(
            f"{what} draws random numbers and needs an explicit generator, e.g. "
            f"generator=torch.Generator({like.device.type!r}).manual_seed(0); "
            "decodekit never uses torch's global RNG."
        )
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{what}: generator must be a torch.Generator, got {type(generator)}.")
    if generator.device.type != like.device.type:
        raise ValueError(
            f"{what}: the generator is on {generator.device.type} but the tensors are on "
            f"{like.device}; create it with torch.Generator(device={str(like.device)!r})."
        )


def sample_categorical(probs: Tensor, generator: torch.Generator) -> Tensor:
    """Draw one index from each categorical distribution in ``probs`` ``(..., V)``.

    Rows need not be normalised, but must be non-negative with positive mass.

    Returns:
        Long tensor of indices, ``(...)``.
    """
    check_generator(generator, probs, "sample_categorical")
    if probs.dim() == 0:
        raise ValueError("sample_categorical needs probabilities of shape (..., V), got a scalar.")
    if not bool((probs >= 0).all()):
        raise ValueError("sample_categorical: probabilities must be >= 0 and not NaN.")
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    if flat.shape[0] == 0:
        return torch.empty(probs.shape[:-1], dtype=torch.long, device=probs.device)
    if not bool((flat.sum(dim=-1) > 0).all()):
        raise ValueError("sample_categorical: every row of probabilities needs positive mass.")
    tokens = torch.multinomial(flat, 1, generator=generator)  # (N, 1)
    return tokens.reshape(probs.shape[:-1])


class Sampled(NamedTuple):
    """What a sampler returns: the tokens and the distribution they were drawn from."""

    tokens: Tensor
    """Chosen tokens, long, ``(...)``."""
    token_probs: Tensor
    """Probability of each chosen token under ``probs``, ``(...)``."""
    probs: Tensor
    """The full distribution after processing, ``(..., V)`` (one-hot when greedy)."""


@dataclass(frozen=True)
class Sampler:
    """Logits to tokens: temperature, then top-k, then top-p (or temperature last), then a draw.

    The order matches transformers' sampling warpers. ``temperature = 0`` is
    greedy: the argmax of the logits, with a one-hot distribution, so a
    speculative verifier sees greedy decoding as a deterministic draft/target.

    Attributes:
        temperature: float >= 0, default 1.0. 0 means greedy.
        top_k: int >= 1 or None (default: no top-k filtering).
        top_p: float in (0, 1] or None (default: no nucleus filtering).
        processors: extra logits processors applied after top-p, in order.
        temperature_last: bool, default False. True applies the temperature after
            top-k and top-p instead of before them, so the nucleus is taken on the
            untempered distribution (as VAR's sampler, which has no temperature, takes it).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    processors: tuple[Callable[[Tensor], Tensor], ...] = field(default=())
    temperature_last: bool = False

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(
                f"Sampler temperature must be a number >= 0, got {self.temperature!r}."
            )
        # Build once to validate top_k/top_p with their own messages.
        self.chain()

    @property
    def greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature 0)."""
        return self.temperature == 0

    def chain(self) -> ProcessorChain:
        """The processors this sampler applies to logits, in order, as one chain."""
        processors: list[Callable[[Tensor], Tensor]] = []
        if self.top_k is not None:
            processors.append(TopK(self.top_k))
        if self.top_p is not None:
            processors.append(TopP(self.top_p))
        if self.temperature not in (0, 1):
            at = len(processors) if self.temperature_last else 0
            processors.insert(at, Temperature(self.temperature))
        processors.extend(self.processors)
        return ProcessorChain(processors)

    def probs(self, logits: Tensor) -> Tensor:
        """The distribution tokens are drawn from, ``(..., V)``.

        The softmax of the processed logits, or one-hot at the argmax when greedy.
        """
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.greedy:
            best = logits.argmax(dim=-1, keepdim=True)  # (..., 1)
            return torch.zeros_like(logits).scatter_(-1, best, 1.0)
        return self.chain()(logits).softmax(dim=-1)  # (..., V)

    def __call__(self, logits: Tensor, generator: torch.Generator | None) -> Sampled:
        """Choose one token per row of ``logits`` ``(..., V)``.

        ``generator`` may be None only when greedy.
        """
        probs = self.probs(logits)  # (..., V)
        if self.greedy:
            tokens = probs.argmax(dim=-1)  # (...)
        else:
            tokens = sample_categorical(probs, generator)  # (...)
        token_probs = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (...)
        return Sampled(tokens, token_probs, probs)
