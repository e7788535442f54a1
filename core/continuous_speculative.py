"""Speculative verification for continuous tokens: accept by a density ratio, resample the residual.

From "Continuous Speculative Decoding for Autoregressive Image Generation"
(Wang et al., arXiv:2411.11925; reference code MarkXCloud/CSpD). A draft model
proposes continuous tokens, the target model gives each its density, and a
token ``x`` drawn from the draft's ``q`` is kept with probability
``min(1, p(x) / q(x))``; a rejected one is replaced by a draw from the residual
``(p - q)+`` normalised. With exact densities and exact residual draws the
result is distributed as ``p`` (the continuous form of arXiv:2211.17192,
Theorem 1). Two rules live here:

- `exact_verify`: densities are whatever the caller's `TokenDensity` objects
  compute exactly (for a diffusion head, the density of the whole sampling
  trajectory: a product of Gaussians); the residual is drawn by rejection
  sampling without a cap (draw ``y ~ p``, keep it with probability
  ``max(0, 1 - q(y) / p(y))``); positions are verified in speculative order and
  everything after the first group with a rejection is dropped for the caller
  to draft again. The output is distributed exactly as the target.
- `paper_verify`: the reference's rule, approximations included (see its
  docstring): densities flattened by a temperature of 42, the "density" of a
  head sample taken as its last Gaussian step times a ratio of summed
  log-standard deviations of the earlier steps, every token accepted on its own,
  and at most 100 residual tries after which the token is a zero vector.

Every random number comes from the explicit ``torch.Generator`` passed in.
Tested against closed-form targets (1-D, 16-D Gaussians, a mixture, a
two-token chain) in tests/test_cspd.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from .sampler import check_generator

__all__ = [
    "TokenDensity",
    "ContinuousVerdict",
    "speculative_cut",
    "exact_verify",
    "LastStepGaussian",
    "paper_log_acceptance_ratio",
    "paper_verify",
    "diagonal_gaussian_log_prob",
    "PAPER_FLATTEN",
    "PAPER_MAX_TRIES",
]

PAPER_FLATTEN = 42.0
"""The reference's ``inner_temperature`` (``SpecDecodeRunner.__init__``, ``DistributionProcessor``)."""

MAX_PROPOSALS_PER_ROUND = 64
"""`exact_verify` draws ``first_round``, twice that ... up to this many residual proposals per position and round."""

PAPER_MAX_TRIES = 100
"""The reference's cap on residual proposals (``DistributionProcessor.sample_distribution``)."""

_LOG_2PI = math.log(2 * math.pi)


class TokenDensity(Protocol):
    """One distribution per position over continuous samples, that can be drawn from and evaluated.

    A sample of position ``i`` is a tensor of shape ``event`` (a token ``(D,)``, or a
    whole sampling trajectory ``(S, D)``); ``index`` selects positions.
    """

    def sample(self, index: Tensor, generator: torch.Generator | list[torch.Generator]) -> Tensor:
        """One draw for each position in ``index`` (long ``(M,)``), ``(M, *event)``.

        ``generator`` is one generator, or a list of ``M``: position ``index[j]``'s draw
        from ``generator[j]`` (`exact_verify` with one generator per row).
        """
        ...

    def log_prob(self, x: Tensor, index: Tensor) -> Tensor:
        """The log-density of ``x`` ``(M, *event)`` at positions ``index``, ``(M,)``, exact."""
        ...

    # Optional: ``sample_with_log_prob(index, generator) -> (samples, log_prob)``, the draws of
    # `sample` with their log-densities, for a sampler that computes them while drawing
    # (`exact_verify` then does not evaluate the target's draws again).


class ContinuousVerdict(NamedTuple):
    """The outcome of verifying continuous draft samples (see `exact_verify`, `paper_verify`)."""

    samples: Tensor
    """``(N, *event)``: the draft sample where kept, the residual draw where resampled,
    zeros where `failed`, the draft sample (to be ignored) where `dropped`."""
    accepted: Tensor
    """Bool ``(N,)``: the draft sample is kept."""
    resampled: Tensor
    """Bool ``(N,)``: rejected and replaced by a residual draw (or zeros where `failed`)."""
    dropped: Tensor
    """Bool ``(N,)``: after the first group with a rejection; the caller drafts these again."""
    tries: Tensor
    """Long ``(N,)``: residual proposals drawn for each position."""
    failed: Tensor
    """Bool ``(N,)``: the paper's cap was reached without an accepted proposal; the sample is 0."""


def speculative_cut(
    passes: Tensor, order: Tensor | None, rows: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Split positions into kept, resampled and dropped by their group in speculative order.

    Positions of one group (``order`` equal) were drafted together and are judged
    together: the groups before the first one with a failed test are kept whole; in
    that group the passing positions are kept and the failing ones resampled; later
    groups are dropped, because their drafts (and the target's verdict on them)
    assumed draft samples that were replaced. ``order=None`` makes every position
    its own group in index order (classic speculative decoding). Positions of
    different ``rows`` (independent sequences) are cut separately.

    Args:
        passes: bool ``(N,)``, the acceptance test of each position.
        order: long ``(N,)``, the group of each position (a smaller group was drafted
            earlier), or None.
        rows: long ``(N,)`` in ``[0, R)``, the sequence of each position, or None (one).

    Returns:
        ``(kept, resample, dropped)``, three disjoint bool ``(N,)`` masks covering all positions.
    """
    N = passes.shape[0]
    if order is None:
        order = torch.arange(N, device=passes.device)
    if rows is None:
        rows = torch.zeros(N, dtype=torch.long, device=passes.device)
    if order.shape != passes.shape or rows.shape != passes.shape:
        raise ValueError(
            f"order {tuple(order.shape)} and rows {tuple(rows.shape)} must have one entry per "
            f"position {tuple(passes.shape)}"
        )
    order, rows = order.long(), rows.long()
    never = torch.iinfo(torch.long).max
    groups = torch.where(passes, never, order)  # (N,) the group of each failing position
    R = int(rows.max()) + 1 if N else 0
    cut = torch.full((R,), never, dtype=torch.long, device=passes.device)
    cut = cut.scatter_reduce(0, rows, groups, reduce="amin")  # (R,) first failing group per row
    cut = cut[rows]  # (N,)
    kept = passes & (order <= cut)
    resample = ~passes & (order == cut)
    dropped = order > cut
    return kept, resample, dropped


def exact_verify(
    draft_samples: Tensor,
    draft: TokenDensity,
    target: TokenDensity,
    generator: torch.Generator | Sequence[torch.Generator],
    *,
    order: Tensor | None = None,
    rows: Tensor | None = None,
    independent: bool = False,
    draft_log_prob: Tensor | None = None,
    target_log_prob: Tensor | None = None,
    max_tries: int | None = None,
    first_round: int = 1,
) -> ContinuousVerdict:
    """Verify continuous draft samples against the target exactly: ``min(1, p/q)``, residual ``(p - q)+``.

    Draws one uniform per position: sample ``x_i`` passes when
    ``u_i < min(1, p_i(x_i) / q_i(x_i))`` (computed from log-densities). Positions are
    then kept, resampled or dropped by `speculative_cut` (``independent=True`` resamples
    every failing position and drops nothing, which is exact only when the target's
    distribution of each position does not depend on the other drafted positions).
    Each position to resample draws ``y ~ p_i`` and keeps it with probability
    ``max(0, 1 - q_i(y) / p_i(y))``, again until one is kept: no cap, no zero
    samples. Since a position is rejected with probability ``TV(p_i, q_i)`` and a
    proposal kept with the same probability, the expected number of proposals per
    verified position is ``TV * 1/TV = 1`` (and 0 when ``p == q``). The proposals are
    drawn in rounds of ``first_round``, twice that, ... (at most
    `MAX_PROPOSALS_PER_ROUND`) per position, each round evaluated in one call; the
    first kept proposal is the draw, whatever the round sizes, and ``tries`` counts
    the proposals up to it.

    Args:
        draft_samples: ``(N, *event)``, each drawn from ``draft``'s distribution of its position.
        draft: ``q``, evaluated at the draft samples and at the residual proposals.
        target: ``p``, sampled for the residual proposals and evaluated.
        generator: the source of every random number used; or one generator per row
            (``rows`` then required): position ``i`` draws from ``generator[rows[i]]`` only,
            in position order, so a row's draws do not depend on the other rows while
            the densities are evaluated for all rows at once.
        order: long ``(N,)`` speculative order of the positions (see `speculative_cut`).
        rows: long ``(N,)`` independent sequences, each cut on its own (see `speculative_cut`).
        independent: judge every position on its own (nothing dropped).
        draft_log_prob / target_log_prob: ``(N,)`` log-densities of ``draft_samples``
            when the caller already has them (they are computed otherwise).
        max_tries: raise `RuntimeError` after this many proposals for one position
            (None: no limit). It never returns a capped sample.
        first_round: proposals per position in the first round. Where a round costs
            about the same for a few more proposals (a sampler of many small sequential
            calls), more of them in the first round save the rounds after it.

    Returns:
        A `ContinuousVerdict` (``failed`` all False).
    """
    if not 1 <= first_round <= MAX_PROPOSALS_PER_ROUND:
        raise ValueError(
            f"first_round must be in [1, {MAX_PROPOSALS_PER_ROUND}], got {first_round}"
        )
    N = draft_samples.shape[0]
    device = draft_samples.device
    draws = _Draws(generator, rows, N, draft_samples)
    every = torch.arange(N, device=device)
    log_q = draft.log_prob(draft_samples, every) if draft_log_prob is None else draft_log_prob
    log_p = target.log_prob(draft_samples, every) if target_log_prob is None else target_log_prob
    if log_q.shape != (N,) or log_p.shape != (N,):
        raise ValueError(
            f"log-densities must be (N,) = ({N},), got {tuple(log_q.shape)} and "
            f"{tuple(log_p.shape)}"
        )
    log_ratio = (log_p.double() - log_q.double()).clamp(max=0.0)  # (N,) log min(1, p/q)
    u = draws.uniform(torch.arange(N, device=device))
    passes = u < log_ratio.exp()  # u in [0, 1): p >= q always passes
    if independent:
        kept, resample, dropped = passes, ~passes, torch.zeros_like(passes)
    else:
        kept, resample, dropped = speculative_cut(passes, order, rows)

    samples = draft_samples.clone()
    tries = torch.zeros(N, dtype=torch.long, device=device)
    pending = resample.nonzero().flatten()  # (M,)
    rounds = 0
    while pending.numel():
        if max_tries is not None and int(tries[pending].max()) >= max_tries:
            raise RuntimeError(
                f"exact_verify: {max_tries} residual proposals for a position were all refused; "
                "the draft and target densities are (numerically) equal there"
            )
        # first_round, twice that ... proposals per pending position and round, evaluated in
        # one call: the first kept one is the draw (i.i.d. proposals), so a position that
        # needs many tries costs a few rounds, not one round per try
        m = min(first_round * 2**rounds, MAX_PROPOSALS_PER_ROUND)
        rounds += 1
        each = pending.repeat_interleave(m)  # (M * m,), a position's proposals together
        if hasattr(target, "sample_with_log_prob"):  # a sampler that has the density at hand
            y, log_p_y = target.sample_with_log_prob(each, draws.generators(each))
        else:
            y = target.sample(each, draws.generators(each))  # (M * m, *event)
            log_p_y = target.log_prob(y, each)
        log_p_y = log_p_y.double()  # (M * m,)
        log_q_y = draft.log_prob(y, each).double()
        # keep y with probability max(0, 1 - q/p) = -expm1(min(0, log q - log p))
        keep_prob = -torch.expm1((log_q_y - log_p_y).clamp(max=0.0))
        take = (draws.uniform(each) < keep_prob).reshape(-1, m)  # (M, m)
        found = take.any(dim=1)  # (M,)
        first = take.int().argmax(dim=1)  # (M,) the first kept proposal where found
        tries[pending] += torch.where(found, first + 1, m)
        chosen = torch.arange(pending.numel(), device=device) * m + first
        samples[pending[found]] = y[chosen[found]].to(samples.dtype)
        pending = pending[~found]
    none = torch.zeros_like(passes)
    return ContinuousVerdict(samples, kept, resample, dropped, tries, none)


class _Draws:
    """Uniforms and generators for positions: from one generator, or from their row's."""

    def __init__(self, generator, rows: Tensor | None, n: int, like: Tensor):
        self.single = isinstance(generator, torch.Generator)
        gens = [generator] if self.single else list(generator)
        for g in gens:
            check_generator(g, like, "exact_verify")
        if not self.single:
            if rows is None or rows.shape != (n,):
                raise ValueError("one generator per row needs rows (N,): each position's row")
            if n and (int(rows.min()) < 0 or int(rows.max()) >= len(gens)):
                raise ValueError(f"rows must lie in [0, {len(gens)}): one generator per row")
            self.rows = rows.tolist()
        self.gens, self.device = gens, like.device

    def uniform(self, index: Tensor) -> Tensor:
        """One uniform in [0, 1) per position of ``index`` (float64)."""
        if self.single:
            return torch.rand(
                index.numel(), generator=self.gens[0], dtype=torch.float64, device=self.device
            )
        out = torch.empty(index.numel(), dtype=torch.float64, device=self.device)
        by_row: dict[int, list[int]] = {}
        for j, i in enumerate(index.tolist()):
            by_row.setdefault(self.rows[i], []).append(j)
        for row, js in by_row.items():
            out[js] = torch.rand(
                len(js), generator=self.gens[row], dtype=torch.float64, device=self.device
            )
        return out

    def generators(self, index: Tensor) -> torch.Generator | list[torch.Generator]:
        """The generator to sample positions ``index`` with: the one, or one per position."""
        if self.single:
            return self.gens[0]
        return [self.gens[self.rows[i]] for i in index.tolist()]


# -- the reference's rule ----------------------------------------------------------------------
class LastStepGaussian(NamedTuple):
    """What the reference records of one diffusion-head run per token (its ``DistributionManager``).

    ``mean`` and ``std`` are the Gaussian of the head's last denoising step (the std
    scaled by the head temperature, as the step's noise is); ``log_std_sum`` is the
    sum over the earlier steps of each step's log standard deviation, unscaled.
    All ``(N, D)``. (The reference's names: ``mean``, ``variance`` for the std,
    ``log_var`` for the sum, gaussian_diffusion.py,
    ``p_sample_loop_progressive_with_noise``.)
    """

    mean: Tensor
    std: Tensor
    log_std_sum: Tensor


def diagonal_gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x; mean, diag(std**2))`` summed over the last axis, ``(...)``."""
    z = (x - mean) / std
    return -0.5 * (z * z).sum(-1) - std.log().sum(-1) - 0.5 * x.shape[-1] * _LOG_2PI


def paper_log_acceptance_ratio(
    x: Tensor, draft: LastStepGaussian, target: LastStepGaussian, flatten: float = PAPER_FLATTEN
) -> Tensor:
    """The log of the reference's acceptance ratio for draft tokens ``x`` ``(N, D)``, ``(N,)``.

    The reference (spec_decode/spec_decode_runner.py, ``DistributionProcessor.judge_accept``)
    computes ``p~(x) · F · prod(sigma_q) / (q~(x) · prod(sigma_p))`` where ``p~``, ``q~``
    are the last-step Gaussians' unnormalised densities with ``(x - mean) / std``
    divided by ``flatten`` (42), and ``F = exp(sum(log_std_sum_p - log_std_sum_q))``
    (``fixed_term``). Computed here in log space; the reference multiplies in linear
    space, where ``F`` can overflow float32 to ``inf`` (accepted) or ``inf * 0 = nan``
    (rejected) — the only places the two differ.
    """
    zp = (x - target.mean) / target.std / flatten
    zq = (x - draft.mean) / draft.std / flatten
    log_fixed = (target.log_std_sum - draft.log_std_sum).sum(-1)  # (N,)
    return (
        -0.5 * (zp * zp).sum(-1)
        + 0.5 * (zq * zq).sum(-1)
        + log_fixed
        + draft.std.log().sum(-1)
        - target.std.log().sum(-1)
    )


def paper_verify(
    x: Tensor,
    draft: LastStepGaussian,
    target: LastStepGaussian,
    generator: torch.Generator,
    *,
    flatten: float = PAPER_FLATTEN,
    max_tries: int = PAPER_MAX_TRIES,
) -> ContinuousVerdict:
    """Verify draft tokens ``x`` ``(N, D)`` by the reference's rule, approximations included.

    1. Each token is accepted on its own when ``u < ratio`` with the ratio of
       `paper_log_acceptance_ratio` (flattened last-step densities times the ratio of
       the earlier steps' standard deviations): no prefix, nothing dropped
       (``DistributionProcessor.speculative_sample``).
    2. A rejected token draws proposals ``y ~ N(mean_p, std_p)`` (the target's last
       step, unflattened) and keeps one with probability
       ``max(0, p(y) - q(y) / F) / p(y)`` with the normalised last-step densities
       (``subtracted_distribution_unormalize``), at most ``max_tries`` (100) times; a
       token with no proposal kept is left as a zero vector (``sample_distribution``
       starts from ``torch.zeros_like``).

    The reference draws the proposals of every token of the window on each try and
    stops when each has had one kept (a later kept proposal overwriting an earlier
    one); drawing only for the rejected tokens, as here, gives each the same
    distribution: a residual draw when one of its 100 proposals is kept, else zeros.

    Returns:
        A `ContinuousVerdict` (``dropped`` all False; ``failed`` marks the zero tokens).
    """
    check_generator(generator, x, "paper_verify")
    if x.dim() != 2:
        raise ValueError(f"paper_verify takes tokens (N, D), got {tuple(x.shape)}")
    N = x.shape[0]
    device = x.device
    log_ratio = paper_log_acceptance_ratio(x, draft, target, flatten)  # (N,)
    u = torch.rand(N, generator=generator, dtype=x.dtype, device=device)
    accepted = log_ratio.exp() > u  # the reference's `prob > guess`
    resample = ~accepted
    log_fixed = (target.log_std_sum - draft.log_std_sum).sum(-1)  # (N,)

    samples = x.clone()
    samples[resample] = 0.0
    tries = torch.zeros(N, dtype=torch.long, device=device)
    pending = resample.nonzero().flatten()  # (M,)
    for _ in range(max_tries):
        if not pending.numel():
            break
        tries[pending] += 1
        mean, std = target.mean[pending], target.std[pending]  # (M, D)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device)
        y = noise * std + mean  # (M, D)
        log_p_y = diagonal_gaussian_log_prob(y, mean, std)
        log_q_y = diagonal_gaussian_log_prob(y, draft.mean[pending], draft.std[pending])
        keep_prob = (-torch.expm1(log_q_y - log_fixed[pending] - log_p_y)).clamp(min=0.0)
        v = torch.rand(pending.shape[0], generator=generator, dtype=x.dtype, device=device)
        take = v < keep_prob
        samples[pending[take]] = y[take]
        pending = pending[~take]
    failed = torch.zeros_like(accepted)
    failed[pending] = True
    none = torch.zeros_like(accepted)
    return ContinuousVerdict(samples, accepted, resample, none, tries, failed)
