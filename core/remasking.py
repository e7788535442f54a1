"""Remasking policies for masked diffusion: which masked positions commit at each step.

LLaDA semantics (Nie et al., "Large Language Diffusion Models", arXiv:2502.09992):
a `RemaskingPolicy` predicts a token for every masked position
(Gumbel-max in float64, `gumbel_max_tokens`) and commits the positions it
ranks best. Policies are registered by name (``low-confidence``, ``random``,
``margin``, ``entropy``, and Fast-dLLM's ``threshold``, arXiv:2505.22618);
`get_remasking_policy` builds one. `transfer_count_schedule` is
LLaDA's per-step commit count.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

from .errors import ConfigError, UnknownNameError
from .sampler import check_generator

__all__ = [
    "gumbel_max_tokens",
    "RemaskStep",
    "RemaskingPolicy",
    "LowConfidenceRemasking",
    "RandomRemasking",
    "MarginRemasking",
    "EntropyRemasking",
    "ThresholdRemasking",
    "REMASKING_POLICIES",
    "register_remasking_policy",
    "get_remasking_policy",
    "transfer_count_schedule",
]


def gumbel_max_tokens(
    logits: Tensor, temperature: float, generator: torch.Generator | None
) -> Tensor:
    """Pick tokens from logits ``(..., V)`` by LLaDA's Gumbel-max rule.

    At temperature 0 the argmax of the logits. Otherwise, in float64,
    ``argmax(exp(logits) / (-log u) ** temperature)`` with ``u`` uniform, which
    samples from ``softmax(logits / temperature)``. Logits are shifted by their
    row maximum first: the argmax is unchanged and ``exp`` cannot overflow.

    Returns:
        Long tensor ``(...)``.
    """
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}.")
    if temperature == 0:
        return logits.argmax(dim=-1)  # (...)
    check_generator(generator, logits, "gumbel_max_tokens at temperature > 0")
    logits64 = logits.to(torch.float64)
    logits64 = logits64 - logits64.amax(dim=-1, keepdim=True)  # (..., V)
    uniforms = torch.rand(
        logits64.shape, generator=generator, dtype=torch.float64, device=logits.device
    )
    gumbel_scale = (-torch.log(uniforms)) ** temperature  # (..., V)
    return (logits64.exp() / gumbel_scale).argmax(dim=-1)  # (...)


class RemaskStep(NamedTuple):
    """One step of a remasking policy."""

    x: Tensor
    """The new tokens ``(B, L)``: the input with the committed positions filled in."""
    committed: Tensor
    """Bool ``(B, L)``: the positions committed at this step."""
    predicted: Tensor
    """Long ``(B, L)``: the predicted token at every masked position (the input token elsewhere)."""
    confidence: Tensor
    """Float64 ``(B, L)``: the policy's score, higher commits first; ``-inf`` where not eligible."""


REMASKING_POLICIES: dict[str, type[RemaskingPolicy]] = {}
"""The registry of remasking policies, by name."""


def register_remasking_policy(cls: type[RemaskingPolicy]) -> type[RemaskingPolicy]:
    """Class decorator: register a `RemaskingPolicy` subclass under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, RemaskingPolicy)):
        raise TypeError(f"register_remasking_policy takes a RemaskingPolicy subclass, got {cls!r}.")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name` to register.")
    registered = REMASKING_POLICIES.get(cls.name)
    if registered is not None and registered is not cls:
        raise ValueError(
            f"remasking policy name {cls.name!r} is taken by {registered.__qualname__}; "
            "choose another name."
        )
    REMASKING_POLICIES[cls.name] = cls
    return cls


def get_remasking_policy(
    policy: str | RemaskingPolicy, *, path: str = "remasking", **params
) -> RemaskingPolicy:
    """Build a registered remasking policy by name (an instance is returned as is).

    Args:
        policy: a registered name (``"low-confidence"``, ``"random"``, ``"margin"``,
            ``"entropy"``, ``"threshold"``, ``"factor"``) or a `RemaskingPolicy` instance.
        path: the config key path named in errors.
        **params: the policy's parameters (``threshold=0.9`` for ``"threshold"``).

    Raises:
        UnknownNameError: for a name that is not registered (lists the known ones).
        ConfigError: for parameters the policy does not take.
    """
    if isinstance(policy, RemaskingPolicy):
        if params:
            raise ConfigError(
                path, "parameters can only be given with a policy name, not an instance."
            )
        return policy
    if not isinstance(policy, str):
        raise ConfigError(path, f"expected a remasking policy name, got {policy!r}.")
    cls = REMASKING_POLICIES.get(policy)
    if cls is None:
        raise UnknownNameError(path, "remasking policy", policy, list(REMASKING_POLICIES))
    accepted = [
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name != "self"
        and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        takes = f"takes {', '.join(accepted)}" if accepted else "takes no parameters"
        raise ConfigError(
            path,
            f"remasking policy {policy!r} {takes}; unknown parameter(s): {', '.join(unknown)}.",
        )
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(path, f"remasking policy {policy!r}: {exc}") from None


def _top_k_per_row(scores: Tensor, eligible: Tensor, counts: Tensor) -> Tensor:
    """Bool ``(B, L)``: in each row the ``counts[b]`` eligible positions with the highest scores."""
    length = scores.shape[-1]
    masked_scores = scores.masked_fill(~eligible, -math.inf)  # (B, L)
    order = masked_scores.argsort(dim=-1, descending=True, stable=True)  # (B, L)
    ranks = torch.arange(length, device=scores.device).expand_as(order)
    rank_of = torch.empty_like(order).scatter_(-1, order, ranks)  # (B, L)
    return (rank_of < counts[:, None]) & eligible


class RemaskingPolicy:
    """Base of remasking policies for masked diffusion (LLaDA semantics).

    A call predicts a token for every masked position (Gumbel-max, see
    `gumbel_max_tokens`), scores the eligible positions — masked and inside
    ``allowed`` — with `confidence`, and commits the ones `select`
    picks. Positions outside ``allowed`` are never chosen and committed tokens
    never change. The prediction may be the mask token itself if its logit wins:
    suppress it in ``logits`` (set it to ``-inf``) when the model can predict it.

    Subclasses set ``name`` and override `confidence` (and `select`
    for rules other than "the ``num_transfer`` best"), then register with
    `register_remasking_policy`.
    """

    name: ClassVar[str] = ""
    needs_num_transfer: ClassVar[bool] = True

    def confidence(
        self, probs: Tensor, predicted: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """Score every position, float64 ``(B, L)``; higher commits first.

        ``probs`` ``(B, L, V)`` is the float64 softmax of the raw logits (no
        temperature, as in LLaDA); ``predicted`` ``(B, L)`` the chosen tokens.
        """
        raise NotImplementedError

    def select(self, confidence: Tensor, eligible: Tensor, num_transfer: Tensor | None) -> Tensor:
        """Bool ``(B, L)``: the eligible positions to commit.

        By default the ``num_transfer[b]`` most confident eligible positions of row ``b``.
        """
        return _top_k_per_row(confidence, eligible, num_transfer)

    def __call__(
        self,
        logits: Tensor,
        x: Tensor,
        mask_index: Tensor,
        num_transfer: int | Tensor | None = None,
        *,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        allowed: Tensor | None = None,
    ) -> RemaskStep:
        """Run one remasking step.

        Args:
            logits: model logits ``(B, L, V)``.
            x: the current tokens ``(B, L)``.
            mask_index: bool ``(B, L)``, True where ``x`` is still masked.
            num_transfer: how many positions each row commits: an int or a long
                tensor ``(B,)`` (see `transfer_count_schedule`). Ignored by
                the threshold policy.
            temperature: Gumbel-max temperature for the predicted tokens; 0 is argmax.
            generator: needed when ``temperature > 0`` and by the random policy.
            allowed: optional bool ``(L,)`` or ``(B, L)``; only masked positions
                inside it may commit (e.g. the current block).

        Returns:
            A `RemaskStep`; ``x`` is not modified.
        """
        eligible, counts = self._check_inputs(logits, x, mask_index, num_transfer, allowed)
        predicted = gumbel_max_tokens(logits, temperature, generator)  # (B, L)
        predicted = torch.where(mask_index, predicted, x)
        probs = logits.to(torch.float64).softmax(dim=-1)  # (B, L, V)
        confidence = self.confidence(probs, predicted, generator)  # (B, L)
        confidence = confidence.masked_fill(~eligible, -math.inf)
        committed = self.select(confidence, eligible, counts) & eligible
        new_x = torch.where(committed, predicted, x)  # (B, L)
        return RemaskStep(new_x, committed, predicted, confidence)

    def _check_inputs(
        self,
        logits: Tensor,
        x: Tensor,
        mask_index: Tensor,
        num_transfer: int | Tensor | None,
        allowed: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Validate a call's inputs; return the eligible mask ``(B, L)`` and counts ``(B,)``."""
        where = f"remasking policy {self.name!r}"
        if logits.dim() != 3:
            raise ValueError(f"{where}: logits must be (B, L, V), got {tuple(logits.shape)}.")
        if x.shape != logits.shape[:2]:
            raise ValueError(
                f"{where}: x must be (B, L) = {tuple(logits.shape[:2])} to match the logits, "
                f"got {tuple(x.shape)}."
            )
        if mask_index.dtype != torch.bool or mask_index.shape != x.shape:
            raise ValueError(
                f"{where}: mask_index must be a bool tensor of shape {tuple(x.shape)} "
                f"(True where x is masked), got {mask_index.dtype} {tuple(mask_index.shape)}."
            )
        eligible = mask_index
        if allowed is not None:
            if allowed.dtype != torch.bool or allowed.shape not in (x.shape, x.shape[1:]):
                raise ValueError(
                    f"{where}: allowed must be a bool tensor of shape (L,) or (B, L) = "
                    f"{tuple(x.shape)}, got {allowed.dtype} {tuple(allowed.shape)}."
                )
            eligible = mask_index & allowed.to(mask_index.device)
        if num_transfer is None:
            if self.needs_num_transfer:
                raise ValueError(
                    f"{where} commits a given number of positions per row: pass num_transfer "
                    "(an int or a (B,) tensor, e.g. from transfer_count_schedule)."
                )
            return eligible, None
        batch = x.shape[0]
        if isinstance(num_transfer, int) and not isinstance(num_transfer, bool):
            counts = torch.full((batch,), num_transfer, dtype=torch.long, device=x.device)
        elif isinstance(num_transfer, Tensor) and not num_transfer.is_floating_point():
            counts = num_transfer.to(device=x.device, dtype=torch.long).reshape(-1)
            if counts.numel() == 1:
                counts = counts.expand(batch)
            if counts.shape != (batch,):
                raise ValueError(
                    f"{where}: num_transfer must hold one count per row, shape ({batch},), "
                    f"got {tuple(num_transfer.shape)}."
                )
        else:
            raise TypeError(
                f"{where}: num_transfer must be an int or an integer tensor (B,), "
                f"got {num_transfer!r}."
            )
        available = eligible.sum(dim=-1)  # (B,)
        too_many = counts > available
        # both checks in one read from the device (this runs at every step)
        negative, over = torch.stack([(counts < 0).any(), too_many.any()]).tolist()
        if negative:
            raise ValueError(f"{where}: num_transfer must be >= 0, got {counts.tolist()}.")
        if over:
            row = int(too_many.nonzero()[0, 0])
            raise ValueError(
                f"{where}: row {row} asks to commit {int(counts[row])} positions but only "
                f"{int(available[row])} are masked inside the allowed region; lower num_transfer "
                "(transfer_count_schedule over the block's masked count gives the right numbers)."
            )
        return eligible, counts

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@register_remasking_policy
class LowConfidenceRemasking(RemaskingPolicy):
    """Commit the positions whose predicted token is most probable (LLaDA ``low_confidence``)."""

    name = "low-confidence"

    def confidence(self, probs, predicted, generator):
        """The probability of the predicted token, ``(B, L)``."""
        return probs.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)


@register_remasking_policy
class RandomRemasking(RemaskingPolicy):
    """Commit uniformly random masked positions (LLaDA ``random``); needs a generator."""

    name = "random"

    def confidence(self, probs, predicted, generator):
        """Independent uniform scores, ``(B, L)``."""
        check_generator(generator, probs, "the random remasking policy")
        return torch.rand(
            predicted.shape, generator=generator, dtype=torch.float64, device=probs.device
        )


@register_remasking_policy
class MarginRemasking(RemaskingPolicy):
    """Commit the positions with the largest top-1 minus top-2 gap (Dream ``topk_margin``)."""

    name = "margin"

    def confidence(self, probs, predicted, generator):
        """``top1 - top2`` of each position's distribution, ``(B, L)``."""
        if probs.shape[-1] < 2:
            return probs[..., 0]
        top_two = probs.topk(2, dim=-1).values  # (B, L, 2)
        return top_two[..., 0] - top_two[..., 1]


@register_remasking_policy
class EntropyRemasking(RemaskingPolicy):
    """Commit the positions whose distribution has the lowest entropy (Dream ``entropy``)."""

    name = "entropy"

    def confidence(self, probs, predicted, generator):
        """Negative entropy of each position's distribution, ``(B, L)``."""
        return -torch.special.entr(probs).sum(dim=-1)


@register_remasking_policy
class ThresholdRemasking(RemaskingPolicy):
    """Confidence-threshold parallel decoding (Fast-dLLM, arXiv:2505.22618).

    Each row commits every eligible position whose predicted-token probability is
    ``>= threshold``, and always at least its single most confident one, so a
    threshold above 1 decodes exactly one token per step. ``num_transfer`` is ignored.

    Attributes:
        threshold: float >= 0, default 0.9 (the paper's setting).
    """

    name = "threshold"
    needs_num_transfer = False

    def __init__(self, threshold: float = 0.9):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}.")
        if not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}.")
        self.threshold = float(threshold)

    def confidence(self, probs, predicted, generator):
        """The probability of the predicted token, ``(B, L)``."""
        return probs.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)

    def select(self, confidence, eligible, num_transfer):
        """Every eligible position with confidence >= threshold, plus each row's most confident."""
        batch = confidence.shape[0]
        ones = torch.ones(batch, dtype=torch.long, device=confidence.device)  # (B,)
        top_one = _top_k_per_row(confidence, eligible, ones.clamp(max=eligible.sum(dim=-1)))
        return top_one | ((confidence >= self.threshold) & eligible)

    def __repr__(self) -> str:
        return f"ThresholdRemasking(threshold={self.threshold})"


@register_remasking_policy
class FactorRemasking(ThresholdRemasking):
    """Factor-based parallel decoding (Fast-dLLM, arXiv:2505.22618, its ``factor`` rule).

    Each row sorts its eligible positions by the predicted token's probability,
    ``c_1 >= c_2 >= ...``, and commits the first ``n`` of them, where ``n`` is
    how many lead the order with ``c_i >= 1 - factor / (i + 1)`` (the first
    always counts): a step commits more tokens the more confident they are.
    As in the reference code (``get_transfer_index_dynamic``), when only the
    last eligible position fails the rule it is committed too, so a row with
    two masks left commits both. ``num_transfer`` is ignored.

    Attributes:
        factor: float > 0 (the paper's runs use 1).
    """

    name = "factor"
    needs_num_transfer = False

    def __init__(self, factor: float = 1.0):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"factor must be a number > 0, got {factor!r}.")
        self.factor = float(factor)

    def select(self, confidence, eligible, num_transfer):
        """The leading positions of each row's confidence order that pass the factor rule."""
        scores = confidence.masked_fill(~eligible, -math.inf)
        values, order = scores.sort(dim=-1, descending=True, stable=True)  # (B, L)
        rank = torch.arange(1, scores.shape[-1] + 1, device=scores.device, dtype=values.dtype)
        passes = values >= 1 - self.factor / (rank + 1)  # (B, L)
        passes[:, 0] = True
        count = passes.long().cumprod(dim=-1).sum(dim=-1)  # (B,) leading passes
        masked = eligible.sum(dim=-1)  # (B,)
        count = torch.where(count == masked - 1, masked, torch.minimum(count, masked))
        chosen = rank[None, :] <= count[:, None]  # (B, L) in sorted order
        return torch.zeros_like(eligible).scatter(-1, order, chosen) & eligible

    def __repr__(self) -> str:
        return f"FactorRemasking(factor={self.factor})"


def transfer_count_schedule(num_masked: int | Sequence[int] | Tensor, steps: int) -> Tensor:
    """LLaDA's per-step commit counts: ``n // steps`` each, the first ``n % steps`` steps one more.

    Args:
        num_masked: the masked count ``n`` of the block — an int, or one per row
            (a sequence or a tensor ``(B,)``; rows may differ).
        steps: the number of steps to spread them over, >= 1.

    Returns:
        Long tensor ``(steps,)`` for an int, ``(B, steps)`` per row otherwise;
        each row sums to its ``n``. E.g. ``n = 10, steps = 4`` gives ``[3, 3, 2, 2]``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}.")
    scalar = isinstance(num_masked, int) and not isinstance(num_masked, bool)
    if isinstance(num_masked, Tensor):
        if num_masked.is_floating_point() or num_masked.dim() > 1:
            raise ValueError(
                "num_masked must be integer counts of shape (B,), got "
                f"{num_masked.dtype} {tuple(num_masked.shape)}."
            )
        counts = num_masked.long().reshape(-1)  # (B,)
    elif scalar:
        counts = torch.tensor([num_masked], dtype=torch.long)
    else:
        try:
            counts = torch.as_tensor(list(num_masked), dtype=torch.long)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"num_masked must be an int or a sequence of ints, got {num_masked!r}."
            ) from None
    if bool((counts < 0).any()):
        raise ValueError(f"num_masked must be >= 0, got {counts.tolist()}.")
    base = counts // steps  # (B,)
    extra = counts % steps  # (B,)
    step_index = torch.arange(steps, device=counts.device)  # (steps,)
    schedule = base[:, None] + (step_index[None, :] < extra[:, None]).long()  # (B, steps)
    return schedule[0] if scalar else schedule
