"""Speculative verification: accept draft tokens, resample the first rejection, exactly.

`accept_or_resample` accepts draft tokens left to right while
``u < min(1, p(x)/q(x))`` and, at the first rejection, resamples from the
normalised residual ``(p - q)+`` (Leviathan et al., "Fast Inference from
Transformers via Speculative Decoding", arXiv:2211.17192; the same rule drives
Speculative Jacobi Decoding, arXiv:2410.01699). The output is distributed
exactly as the target ``p``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .sampler import check_generator, sample_categorical

__all__ = [
    "acceptance_probability",
    "residual_distribution",
    "SpeculativeVerdict",
    "accept_or_resample",
    "accept_or_resample_rows",
]


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
    index = tokens.unsqueeze(-1)  # (..., 1)
    p_x = target_probs.gather(-1, index).squeeze(-1)  # (...)
    q_x = draft_probs.gather(-1, index).squeeze(-1).to(p_x.dtype)
    ratio = p_x / torch.where(q_x > 0, q_x, torch.ones_like(q_x))
    off_draft_support = (p_x > 0).to(p_x.dtype)
    return torch.where(q_x > 0, ratio.clamp(max=1.0), off_draft_support)  # (...)


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
    return torch.where(mass > 0, residual / mass.clamp(min=tiny), fallback)  # (..., V)


class SpeculativeVerdict(NamedTuple):
    """The outcome of verifying a window of draft tokens (see `accept_or_resample`)."""

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
        A `SpeculativeVerdict`.
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
    check_generator(generator, target_probs, "accept_or_resample")

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
    next_token = torch.where(all_accepted, bonus, resampled)  # (...)
    return SpeculativeVerdict(accepted, num_accepted, next_token)


def accept_or_resample_rows(
    target_probs: Tensor,
    draft_probs: Tensor,
    draft_tokens: Tensor,
    generators: list[torch.Generator],
    lengths: Tensor | Sequence[int],
    *,
    bonus_probs: Tensor | None = None,
    has_bonus: Tensor | Sequence[bool] | None = None,
    validate: bool = True,
) -> SpeculativeVerdict:
    """`accept_or_resample` for a batch whose rows each have their own generator and window length.

    Row ``b`` verifies its first ``lengths[b]`` window positions and draws from
    ``generators[b]`` exactly what ``accept_or_resample(target_probs[b:b+1, :m],
    draft_probs[b:b+1, :m], draft_tokens[b:b+1, :m], generators[b], bonus_probs=...)``
    would (uniforms, the residual draw, then the bonus draw where ``has_bonus[b]``),
    so a row's outcome does not depend on the other rows. The arithmetic runs once
    for the batch; only the draws loop over rows. A row of length 0 draws nothing
    and gets ``num_accepted = 0``, ``next_token = -1``.

    Args:
        target_probs: ``p``, ``(B, N, V)``.
        draft_probs: ``q``, ``(B, N, V)``.
        draft_tokens: ``(B, N)`` long.
        generators: ``B`` generators, one per row.
        lengths: ``(B,)`` long in ``[0, N]``, the window positions each row verifies; a
            list of ints costs no read from the device (a tensor is read once).
        bonus_probs: optional ``(B, V)``, the target after each row's window (position
            ``lengths[b]``), sampled when all its drafts pass and ``has_bonus[b]``.
        has_bonus: ``(B,)`` bool (tensor or list), default all True when ``bonus_probs`` is given.
        validate: check that the probabilities are non-negative and the tokens in range.
            Each check reads a value back from the device; a caller whose inputs are
            valid by construction (a per-step loop) passes False, and with lists for
            ``lengths`` and ``has_bonus`` the call reads nothing back.

    Returns:
        A `SpeculativeVerdict` with ``accepted`` ``(B, N)`` (False past a row's length).
    """
    if validate:
        _check_probs("target_probs", target_probs)
        _check_probs("draft_probs", draft_probs)
    if target_probs.dim() != 3 or draft_probs.shape != target_probs.shape:
        raise ValueError(
            "target_probs and draft_probs must both be (B, N, V), got "
            f"{tuple(target_probs.shape)} and {tuple(draft_probs.shape)}."
        )
    B, window, vocab = target_probs.shape
    if draft_tokens.shape != (B, window):
        raise ValueError(
            f"draft_tokens must be (B, N) = {(B, window)}, got {tuple(draft_tokens.shape)}."
        )
    if len(generators) != B:
        raise ValueError(f"need one generator per row: {B} rows, {len(generators)} generators.")
    for g in generators:
        check_generator(g, target_probs, "accept_or_resample_rows")
    lens = lengths.tolist() if isinstance(lengths, Tensor) else [int(m) for m in lengths]
    if len(lens) != B or any(m < 0 or m > window for m in lens):
        raise ValueError(f"lengths must be (B,) = ({B},) with values in [0, {window}].")
    lengths = torch.tensor(lens, dtype=torch.long, device=target_probs.device)
    if bonus_probs is not None:
        if validate:
            _check_probs("bonus_probs", bonus_probs)
        if bonus_probs.shape != (B, vocab):
            raise ValueError(
                f"bonus_probs must be (B, V) = {(B, vocab)}, got {tuple(bonus_probs.shape)}."
            )
    if bonus_probs is None:
        bonus_rows = [False] * B
    elif has_bonus is None:
        bonus_rows = [True] * B
    else:
        bonus_rows = has_bonus.tolist() if isinstance(has_bonus, Tensor) else list(has_bonus)
        if len(bonus_rows) != B:
            raise ValueError(f"has_bonus must have one flag per row ({B}).")
    draft_tokens = draft_tokens.long()
    if (
        validate
        and draft_tokens.numel()
        and (draft_tokens.min() < 0 or draft_tokens.max() >= vocab)
    ):
        raise ValueError(f"draft_tokens must lie in [0, {vocab}); got ids outside it.")

    accept_prob = acceptance_probability(target_probs, draft_probs, draft_tokens)  # (B, N)
    inside = torch.arange(window, device=lengths.device) < lengths[:, None]  # (B, N)
    uniforms = torch.ones_like(accept_prob)  # (B, N); 1 never passes
    for b, m in enumerate(lens):
        if m:
            uniforms[b, :m] = torch.rand(
                (1, m), generator=generators[b], dtype=accept_prob.dtype, device=accept_prob.device
            )[0]
    passes = (uniforms < accept_prob) & inside  # (B, N)
    accepted = passes.long().cumprod(dim=-1).bool()  # (B, N)
    num_accepted = accepted.sum(dim=-1)  # (B,)

    at = torch.minimum(num_accepted, (lengths - 1).clamp(min=0))[:, None, None]  # (B, 1, 1)
    at = at.expand(B, 1, vocab)
    p_at = target_probs.gather(1, at).squeeze(1)  # (B, V)
    q_at = draft_probs.gather(1, at).squeeze(1)  # (B, V)
    residual = residual_distribution(p_at, q_at)  # (B, V)
    if residual.dtype in (torch.float16, torch.bfloat16):
        residual = residual.float()
    bonus_draw = None
    if bonus_probs is not None:
        bonus_draw = (
            bonus_probs.float()
            if bonus_probs.dtype in (torch.float16, torch.bfloat16)
            else bonus_probs
        )
    # The draws do not depend on the outcome (a row draws its residual, then its bonus if
    # it has one), so the choice between them is made on the device: nothing is read back.
    resampled = torch.full((B,), -1, dtype=torch.long, device=target_probs.device)  # (B,)
    bonus = torch.full_like(resampled, -1)  # (B,)
    for b, m in enumerate(lens):
        if not m:
            continue
        resampled[b] = torch.multinomial(residual[b : b + 1], 1, generator=generators[b])[0, 0]
        if bonus_rows[b]:
            bonus[b] = torch.multinomial(bonus_draw[b : b + 1], 1, generator=generators[b])[0, 0]
    next_token = torch.where(num_accepted == lengths, bonus, resampled)
    next_token = torch.where(lengths > 0, next_token, -1)  # (B,)
    return SpeculativeVerdict(accepted, num_accepted, next_token)
