"""The shared sampler interfaces: every token choice in decodekit goes through this module.

Four parts, each usable alone:

* **Processors** on ``(..., V)`` logits — :class:`Temperature`, :class:`TopK`,
  :class:`TopP`, chained by :class:`ProcessorChain` — and
  :func:`classifier_free_guidance`, which combines conditional and unconditional
  logits in either of the two conventions in use.
* **Sampling** — :class:`Sampler` (and the shortcut :func:`sample`) turns logits
  into tokens and the probabilities they were drawn from; :func:`sample_categorical`
  draws from probabilities. Randomness always comes from an explicit
  ``torch.Generator``, never from torch's global RNG.
* **Speculative verification** — :func:`accept_or_resample` accepts draft tokens
  left to right while ``u < min(1, p(x)/q(x))`` and, at the first rejection,
  resamples from the normalised residual ``(p - q)+`` (Leviathan et al.,
  "Fast Inference from Transformers via Speculative Decoding", arXiv:2211.17192;
  the same rule drives Speculative Jacobi Decoding, arXiv:2410.01699). The output
  is distributed exactly as ``p``.
* **Remasking policies** for masked diffusion with LLaDA semantics (Nie et al.,
  "Large Language Diffusion Models", arXiv:2502.09992; Fast-dLLM threshold rule,
  arXiv:2505.22618): a :class:`RemaskingPolicy` predicts tokens for the masked
  positions (Gumbel-max in float64) and chooses which of them commit this step.
  Policies are registered by name (``low-confidence``, ``random``, ``margin``,
  ``entropy``, ``threshold``); :func:`get_remasking_policy` builds one.
  :func:`transfer_count_schedule` is LLaDA's per-step commit count.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import ConfigError, UnknownNameError

__all__ = [
    "LogitsProcessor",
    "Temperature",
    "TopK",
    "TopP",
    "ProcessorChain",
    "CFG_CONVENTIONS",
    "classifier_free_guidance",
    "Sampled",
    "Sampler",
    "sample",
    "sample_categorical",
    "acceptance_probability",
    "residual_distribution",
    "SpeculativeVerdict",
    "accept_or_resample",
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


# ---------------------------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class LogitsProcessor(Protocol):
    """Anything that maps logits ``(..., V)`` to processed logits of the same shape."""

    def __call__(self, logits: Tensor) -> Tensor:
        """Return processed logits ``(..., V)``; the input is not modified."""
        ...


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
        keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
        return logits.masked_fill(~keep, -math.inf)


class ProcessorChain:
    """Apply processors in order; itself a :class:`LogitsProcessor`."""

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
"""Names accepted by :func:`classifier_free_guidance`'s ``convention``."""


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
    return uncond_logits + weight * (cond_logits - uncond_logits)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _check_generator(generator: torch.Generator | None, like: Tensor, what: str) -> None:
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
    _check_generator(generator, probs, "sample_categorical")
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
    """Logits to tokens: temperature, then top-k, then top-p, then a draw.

    The order matches transformers' sampling warpers. ``temperature = 0`` is
    greedy: the argmax of the logits, with a one-hot distribution, so a
    speculative verifier sees greedy decoding as a deterministic draft/target.

    Attributes:
        temperature: float >= 0, default 1.0. 0 means greedy.
        top_k: int >= 1 or None (default: no top-k filtering).
        top_p: float in (0, 1] or None (default: no nucleus filtering).
        processors: extra logits processors applied after top-p, in order.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    processors: tuple[Callable[[Tensor], Tensor], ...] = field(default=())

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
        if self.temperature not in (0, 1):
            processors.append(Temperature(self.temperature))
        if self.top_k is not None:
            processors.append(TopK(self.top_k))
        if self.top_p is not None:
            processors.append(TopP(self.top_p))
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
        return self.chain()(logits).softmax(dim=-1)

    def __call__(self, logits: Tensor, generator: torch.Generator | None) -> Sampled:
        """Choose one token per row of ``logits`` ``(..., V)``.

        ``generator`` may be None only when greedy.
        """
        probs = self.probs(logits)  # (..., V)
        if self.greedy:
            tokens = probs.argmax(dim=-1)
        else:
            tokens = sample_categorical(probs, generator)  # (...)
        token_probs = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return Sampled(tokens, token_probs, probs)


def sample(
    logits: Tensor,
    generator: torch.Generator | None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Sampled:
    """Sample one token per row of ``logits`` ``(..., V)``.

    A shortcut for ``Sampler(temperature, top_k, top_p)(logits, generator)``.
    """
    return Sampler(temperature=temperature, top_k=top_k, top_p=top_p)(logits, generator)


# ---------------------------------------------------------------------------------------------
# Speculative verification
# ---------------------------------------------------------------------------------------------


def _check_probs(name: str, probs: Tensor) -> None:
    if not probs.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of probabilities, got {probs.dtype}."
        )
    if not bool((probs >= 0).all()):
        raise ValueError(f"{name} must be probabilities (>= 0, no NaN); pass softmax(logits).")


def acceptance_probability(target_probs: Tensor, draft_probs: Tensor, tokens: Tensor) -> Tensor:
    """The probability ``min(1, p(x) / q(x))`` of accepting draft token ``x``.

    Args:
        target_probs: ``p``, ``(..., V)``.
        draft_probs: ``q``, ``(..., V)``.
        tokens: the draft tokens ``x``, long, ``(...)``.

    Returns:
        ``(...)``, in ``p``'s dtype. Where ``q(x) = 0`` (a token the draft could not
        have produced) the answer is 1 if ``p(x) > 0`` and 0 if ``p(x) = 0``: a token
        the target gives no mass is never accepted.
    """
    index = tokens.unsqueeze(-1)
    p_x = target_probs.gather(-1, index).squeeze(-1)  # (...)
    q_x = draft_probs.gather(-1, index).squeeze(-1).to(p_x.dtype)
    ratio = p_x / torch.where(q_x > 0, q_x, torch.ones_like(q_x))
    off_draft_support = (p_x > 0).to(p_x.dtype)
    return torch.where(q_x > 0, ratio.clamp(max=1.0), off_draft_support)


def residual_distribution(target_probs: Tensor, draft_probs: Tensor) -> Tensor:
    """The residual ``(p - q)+`` normalised, ``(..., V)``, to resample from after a rejection.

    Where the residual has no mass (``p <= q`` everywhere, i.e. ``p == q`` for
    normalised rows) a rejection can only come from a token outside ``q``'s
    support, and the right distribution is then ``p`` itself; those rows return
    ``p`` normalised.
    """
    residual = (target_probs - draft_probs.to(target_probs.dtype)).clamp(min=0)  # (..., V)
    mass = residual.sum(dim=-1, keepdim=True)  # (..., 1)
    tiny = torch.finfo(residual.dtype).tiny
    fallback = target_probs / target_probs.sum(dim=-1, keepdim=True).clamp(min=tiny)
    return torch.where(mass > 0, residual / mass.clamp(min=tiny), fallback)


class SpeculativeVerdict(NamedTuple):
    """The outcome of verifying a window of draft tokens (see :func:`accept_or_resample`)."""

    accepted: Tensor
    """Bool ``(..., N)``: True on the accepted prefix, False from the first rejection on."""
    num_accepted: Tensor
    """Long ``(...)``: the accepted prefix length = the index of the first rejection (N if none)."""
    next_token: Tensor
    """Long ``(...)``: the token for position ``num_accepted`` — drawn from the residual
    after a rejection, from ``bonus_probs`` when the whole window was accepted, or -1
    when the whole window was accepted and no ``bonus_probs`` was given."""


def accept_or_resample(
    target_probs: Tensor,
    draft_probs: Tensor,
    draft_tokens: Tensor,
    generator: torch.Generator,
    *,
    bonus_probs: Tensor | None = None,
) -> SpeculativeVerdict:
    """Verify a window of draft tokens against the target distribution, exactly.

    Left to right along the window axis (dim -2 of the probabilities), draft token
    ``x_i`` is accepted while ``u_i < min(1, p_i(x_i) / q_i(x_i))`` with fresh
    uniforms ``u_i``; at the first rejection the token is resampled from the
    normalised residual ``(p_i - q_i)+`` and verification stops. Accepted tokens
    plus the resampled one are distributed exactly as ``p`` (arXiv:2211.17192,
    Theorem 1), provided each ``x_i`` was drawn from ``q_i``. With ``p == q`` a
    draft token is never rejected; a deterministic draft (SJD's initialisation)
    is ``q`` one-hot at the draft token.

    Args:
        target_probs: ``p``, ``(..., N, V)``; row ``i`` is the target's distribution
            for window position ``i`` given the drafted prefix before it.
        draft_probs: ``q``, ``(..., N, V)``, the distribution each draft token was drawn from.
        draft_tokens: ``(..., N)`` long.
        generator: the source of every random number used.
        bonus_probs: optional ``(..., V)`` target distribution for the position after the
            window, sampled when all ``N`` drafts are accepted (speculative decoding's
            extra token). Without it those rows get ``next_token = -1``.

    Returns:
        A :class:`SpeculativeVerdict`.
    """
    _check_probs("target_probs", target_probs)
    _check_probs("draft_probs", draft_probs)
    if target_probs.dim() < 2:
        raise ValueError(
            "target_probs must be (..., N, V) with a window axis N, got "
            f"{tuple(target_probs.shape)}."
        )
    if draft_probs.shape != target_probs.shape:
        raise ValueError(
            f"draft_probs {tuple(draft_probs.shape)} must have the shape of target_probs "
            f"{tuple(target_probs.shape)}: one distribution per window position."
        )
    if draft_tokens.shape != target_probs.shape[:-1]:
        raise ValueError(
            f"draft_tokens {tuple(draft_tokens.shape)} must be target_probs' shape without the "
            f"vocabulary axis, {tuple(target_probs.shape[:-1])}."
        )
    if draft_tokens.dtype not in (torch.long, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"draft_tokens must be integer token ids, got {draft_tokens.dtype}.")
    vocab = target_probs.shape[-1]
    if draft_tokens.numel() and (draft_tokens.min() < 0 or draft_tokens.max() >= vocab):
        raise ValueError(f"draft_tokens must lie in [0, {vocab}); got ids outside it.")
    if bonus_probs is not None:
        _check_probs("bonus_probs", bonus_probs)
        expected = target_probs.shape[:-2] + target_probs.shape[-1:]
        if bonus_probs.shape != expected:
            raise ValueError(
                f"bonus_probs must be (..., V) = {tuple(expected)}, got {tuple(bonus_probs.shape)}."
            )
    _check_generator(generator, target_probs, "accept_or_resample")

    draft_tokens = draft_tokens.long()
    window = target_probs.shape[-2]
    accept_prob = acceptance_probability(target_probs, draft_probs, draft_tokens)  # (..., N)
    uniforms = torch.rand(
        accept_prob.shape, generator=generator, dtype=accept_prob.dtype, device=accept_prob.device
    )
    passes = uniforms < accept_prob  # (..., N)
    accepted = passes.long().cumprod(dim=-1).bool()  # (..., N) prefix of passes
    num_accepted = accepted.sum(dim=-1)  # (...)

    # Resample every row at its rejection index (rows with no rejection are drawn and
    # discarded) so the generator advances the same way whatever the outcome.
    at = num_accepted.clamp(max=window - 1)[..., None, None]  # (..., 1, 1)
    at = at.expand(*at.shape[:-1], vocab)  # (..., 1, V)
    p_at = target_probs.gather(-2, at).squeeze(-2)  # (..., V)
    q_at = draft_probs.gather(-2, at).squeeze(-2)  # (..., V)
    resampled = sample_categorical(residual_distribution(p_at, q_at), generator)  # (...)

    all_accepted = num_accepted == window
    if bonus_probs is not None:
        bonus = sample_categorical(bonus_probs, generator)  # (...)
    else:
        bonus = torch.full_like(resampled, -1)
    next_token = torch.where(all_accepted, bonus, resampled)
    return SpeculativeVerdict(accepted, num_accepted, next_token)


# ---------------------------------------------------------------------------------------------
# Remasking policies for masked diffusion
# ---------------------------------------------------------------------------------------------


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
        return logits.argmax(dim=-1)
    _check_generator(generator, logits, "gumbel_max_tokens at temperature > 0")
    logits64 = logits.to(torch.float64)
    logits64 = logits64 - logits64.amax(dim=-1, keepdim=True)  # (..., V)
    uniforms = torch.rand(
        logits64.shape, generator=generator, dtype=torch.float64, device=logits.device
    )
    gumbel_scale = (-torch.log(uniforms)) ** temperature  # (..., V)
    return (logits64.exp() / gumbel_scale).argmax(dim=-1)


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
    """Class decorator: register a :class:`RemaskingPolicy` subclass under ``cls.name``."""
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
            ``"entropy"``, ``"threshold"``) or a :class:`RemaskingPolicy` instance.
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
    :func:`gumbel_max_tokens`), scores the eligible positions — masked and inside
    ``allowed`` — with :meth:`confidence`, and commits the ones :meth:`select`
    picks. Positions outside ``allowed`` are never chosen and committed tokens
    never change. The prediction may be the mask token itself if its logit wins:
    suppress it in ``logits`` (set it to ``-inf``) when the model can predict it.

    Subclasses set ``name`` and override :meth:`confidence` (and :meth:`select`
    for rules other than "the ``num_transfer`` best"), then register with
    :func:`register_remasking_policy`.
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
                tensor ``(B,)`` (see :func:`transfer_count_schedule`). Ignored by
                the threshold policy.
            temperature: Gumbel-max temperature for the predicted tokens; 0 is argmax.
            generator: needed when ``temperature > 0`` and by the random policy.
            allowed: optional bool ``(L,)`` or ``(B, L)``; only masked positions
                inside it may commit (e.g. the current block).

        Returns:
            A :class:`RemaskStep`; ``x`` is not modified.
        """
        eligible, counts = self._check_inputs(logits, x, mask_index, num_transfer, allowed)
        predicted = gumbel_max_tokens(logits, temperature, generator)  # (B, L)
        predicted = torch.where(mask_index, predicted, x)
        probs = logits.to(torch.float64).softmax(dim=-1)  # (B, L, V)
        confidence = self.confidence(probs, predicted, generator)  # (B, L)
        confidence = confidence.masked_fill(~eligible, -math.inf)
        committed = self.select(confidence, eligible, counts) & eligible
        new_x = torch.where(committed, predicted, x)
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
        _check_generator(generator, probs, "the random remasking policy")
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
        ones = torch.ones(batch, dtype=torch.long, device=confidence.device)
        top_one = _top_k_per_row(confidence, eligible, ones.clamp(max=eligible.sum(dim=-1)))
        return top_one | ((confidence >= self.threshold) & eligible)

    def __repr__(self) -> str:
        return f"ThresholdRemasking(threshold={self.threshold})"


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
