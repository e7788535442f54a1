"""Tests of decodekit.speculative: draft-then-verify is exact in distribution.

The verifier is checked against an exact joint distribution over length-3
sequences of a 5-token vocabulary: tens of thousands of speculative samples, a
chi-square test and a total-variation bound, with ancestral sampling through the
same harness as a control that must pass, and wrong acceptance rules that must fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from decodekit.sampler import sample_categorical
from decodekit.speculative import (
    accept_or_resample,
    accept_or_resample_rows,
    acceptance_probability,
    residual_distribution,
)

torch.set_num_threads(1)

VOCAB = 5
LENGTH = 3
NUM_SAMPLES = 60_000


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Exact-distribution oracle
# ---------------------------------------------------------------------------------------------


def random_markov_chain(seed: int, sharpness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random Markov chain in float64: initial probs (V,) and transition matrix (V, V)."""
    gen = seeded(seed)
    initial = (torch.randn(VOCAB, generator=gen, dtype=torch.float64) * sharpness).softmax(-1)
    transition = (
        torch.randn(VOCAB, VOCAB, generator=gen, dtype=torch.float64) * sharpness
    ).softmax(-1)
    return initial, transition


def exact_joint(initial: torch.Tensor, transition: torch.Tensor) -> torch.Tensor:
    """The exact joint distribution of length-3 sequences, flattened to (V**3,)."""
    joint = initial[:, None, None] * transition[:, :, None] * transition[None, :, :]  # (V, V, V)
    return joint.reshape(-1)


def chi_square_p_value(samples: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Chi-square p-value and total-variation distance of samples (S, 3) against exact (V**3,)."""
    num = samples.shape[0]
    cells = samples[:, 0] * VOCAB**2 + samples[:, 1] * VOCAB + samples[:, 2]  # (S,)
    observed = torch.bincount(cells, minlength=VOCAB**LENGTH).to(torch.float64)
    expected = exact * num
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = exact.numel() - 1
    # Upper tail of chi-square(dof) = regularised upper incomplete gamma Q(dof/2, stat/2).
    p_value = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2)
    tv = 0.5 * (observed / num - exact).abs().sum()
    return float(p_value), float(tv)


def tv_bound(num_samples: int, num_cells: int, delta: float = 1e-6) -> float:
    """TV distance the empirical distribution stays under with probability >= 1 - delta.

    From P(||p_hat - p||_1 >= eps) <= 2^K exp(-S eps^2 / 2) (Weissman et al. 2003).
    """
    return math.sqrt((num_cells * math.log(2) + math.log(1 / delta)) / (2 * num_samples))


def passes_oracle(samples: torch.Tensor, exact: torch.Tensor) -> tuple[bool, float, float]:
    """Whether samples are consistent with the exact distribution (chi-square and TV)."""
    p_value, tv = chi_square_p_value(samples, exact)
    ok = p_value > 1e-3 and tv < tv_bound(samples.shape[0], exact.numel())
    return ok, p_value, tv


def ancestral_samples(initial, transition, num, gen) -> torch.Tensor:
    """Plain ancestral sampling of the target chain: (S, 3)."""
    tokens = torch.empty(num, LENGTH, dtype=torch.long)
    tokens[:, 0] = sample_categorical(initial.expand(num, VOCAB), gen)
    for i in range(1, LENGTH):
        tokens[:, i] = sample_categorical(transition[tokens[:, i - 1]], gen)
    return tokens


def wrong_verifier(target_probs, draft_probs, draft_tokens, generator):
    """A deliberately wrong rule: min(1, p/q) acceptance, then resample from p, not the residual."""
    accept_prob = acceptance_probability(target_probs, draft_probs, draft_tokens)  # (S, N)
    uniforms = torch.rand(accept_prob.shape, generator=generator, dtype=accept_prob.dtype)
    accepted = (uniforms < accept_prob).long().cumprod(-1).bool()
    num_accepted = accepted.sum(-1)
    at = num_accepted.clamp(max=LENGTH - 1)
    p_at = target_probs[torch.arange(len(at)), at]  # (S, V)
    next_token = sample_categorical(p_at, generator)
    return accepted, num_accepted, next_token


def speculative_samples(initial, transition, draft, num, gen, verify=accept_or_resample):
    """Draft-then-verify decoding of the target chain, vectorised over num rows: (S, 3).

    Each round drafts the whole window; positions already committed are passed with
    p = q = one-hot (certain acceptance), the rest are drafted from ``draft`` and
    verified against the target's conditionals given the drafted prefix.
    """
    draft_initial, draft_transition, one_hot_drafts = draft
    tokens = torch.zeros(num, LENGTH, dtype=torch.long)
    committed = torch.zeros(num, dtype=torch.long)
    positions = torch.arange(LENGTH)
    rounds = 0
    while bool((committed < LENGTH).any()):
        rounds += 1
        draft_tokens = torch.empty(num, LENGTH, dtype=torch.long)
        target_probs = torch.empty(num, LENGTH, VOCAB, dtype=torch.float64)
        draft_probs = torch.empty(num, LENGTH, VOCAB, dtype=torch.float64)
        for i in range(LENGTH):
            fixed = i < committed  # (S,)
            if i == 0:
                p_i = initial.expand(num, VOCAB)
                q_i = draft_initial.expand(num, VOCAB)
            else:
                p_i = transition[draft_tokens[:, i - 1]]  # (S, V)
                q_i = draft_transition[draft_tokens[:, i - 1]]
            x_i = torch.where(fixed, tokens[:, i], sample_categorical(q_i, gen))
            one_hot = torch.nn.functional.one_hot(x_i, VOCAB).to(torch.float64)
            if one_hot_drafts:  # a deterministic draft given its randomness, as SJD initialises
                q_i = one_hot
            draft_tokens[:, i] = x_i
            target_probs[:, i] = torch.where(fixed[:, None], one_hot, p_i)
            draft_probs[:, i] = torch.where(fixed[:, None], one_hot, q_i)
        _, num_accepted, next_token = verify(target_probs, draft_probs, draft_tokens, gen)
        assert bool((num_accepted >= committed).all()), "a committed position was rejected"
        tokens = torch.where(
            positions < num_accepted[:, None],
            draft_tokens,
            torch.where(positions == num_accepted[:, None], next_token[:, None], tokens),
        )
        committed = (num_accepted + 1).clamp(max=LENGTH)
        assert rounds <= LENGTH
    return tokens


@pytest.fixture(scope="module")
def target_chain():
    """The target chain and its exact joint; every cell expects >= 5 samples."""
    initial, transition = random_markov_chain(seed=1, sharpness=0.8)
    exact = exact_joint(initial, transition)
    assert float(exact.min()) * NUM_SAMPLES >= 5, "fixture too peaked for the chi-square test"
    return initial, transition, exact


DRAFTS = {
    "markov-draft": lambda: (*random_markov_chain(seed=2, sharpness=1.2), False),
    "one-hot-draft": lambda: (*random_markov_chain(seed=3, sharpness=0.0), True),
}


def test_oracle_control_ancestral_sampling_passes(target_chain):
    initial, transition, exact = target_chain
    samples = ancestral_samples(initial, transition, NUM_SAMPLES, seeded(10))
    ok, p_value, tv = passes_oracle(samples, exact)
    assert ok, f"control failed: p={p_value:.2e}, tv={tv:.4f}"


@pytest.mark.parametrize("draft_name", sorted(DRAFTS))
def test_oracle_speculative_decoding_preserves_target_distribution(target_chain, draft_name):
    initial, transition, exact = target_chain
    samples = speculative_samples(
        initial, transition, DRAFTS[draft_name](), NUM_SAMPLES, seeded(11)
    )
    ok, p_value, tv = passes_oracle(samples, exact)
    assert ok, f"{draft_name}: p={p_value:.2e}, tv={tv:.4f}"


def resample_excluding_rejected(target_probs, draft_probs, draft_tokens, generator):
    """A plausible bug: resample from p minus the rejected token (right only for one-hot drafts)."""
    accept_prob = acceptance_probability(target_probs, draft_probs, draft_tokens)  # (S, N)
    uniforms = torch.rand(accept_prob.shape, generator=generator, dtype=accept_prob.dtype)
    accepted = (uniforms < accept_prob).long().cumprod(-1).bool()
    num_accepted = accepted.sum(-1)
    rows = torch.arange(len(num_accepted))
    at = num_accepted.clamp(max=LENGTH - 1)
    p_at = target_probs[rows, at].clone()  # (S, V)
    p_at[rows, draft_tokens[rows, at]] = 0
    p_at[p_at.sum(-1) == 0] = 1.0  # rows that accepted everything: any valid distribution
    return accepted, num_accepted, sample_categorical(p_at, generator)


@pytest.mark.parametrize("wrong_rule", [wrong_verifier, resample_excluding_rejected])
def test_oracle_rejects_a_wrong_acceptance_rule(target_chain, wrong_rule):
    initial, transition, exact = target_chain
    draft = DRAFTS["markov-draft"]()
    samples = speculative_samples(
        initial, transition, draft, NUM_SAMPLES, seeded(12), verify=wrong_rule
    )
    ok, p_value, tv = passes_oracle(samples, exact)
    assert not ok and p_value < 1e-6, f"the oracle has no power: p={p_value:.2e}, tv={tv:.4f}"


def test_oracle_draft_differs_from_target(target_chain):
    """The oracle means something only if drafts are often rejected."""
    initial, transition, _ = target_chain
    draft_initial, _, _ = DRAFTS["markov-draft"]()
    overlap = torch.minimum(initial, draft_initial).sum()  # first-token acceptance rate
    assert 0.3 < float(overlap) < 0.9


# ---------------------------------------------------------------------------------------------
# Edge cases and errors
# ---------------------------------------------------------------------------------------------


def test_acceptance_probability_is_min_one_ratio_with_zero_draft_cases():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    q = torch.tensor([[0.25, 0.6, 0.0, 0.0]] * 1)
    tokens = torch.tensor([0, 1, 2, 3])
    probs = acceptance_probability(p.expand(4, 4), q.expand(4, 4), tokens)
    # p/q = 2 -> 1; 0.3/0.6 = 0.5; q(x)=0 < p(x) -> 1; p(x)=q(x)=0 -> 0.
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.5, 1.0, 0.0]))


def test_equal_target_and_draft_never_reject():
    gen = seeded(0)
    probs = torch.rand(4000, 6, 5, generator=gen).softmax(-1)
    tokens = sample_categorical(probs, gen)
    verdict = accept_or_resample(probs, probs.clone(), tokens, gen)
    assert bool(verdict.accepted.all())
    assert bool((verdict.num_accepted == 6).all())
    assert bool((verdict.next_token == -1).all())


def test_all_accepted_rows_draw_the_bonus_token():
    gen = seeded(0)
    probs = torch.full((3, 2, 4), 0.25)
    bonus = torch.tensor([[0.0, 0.0, 1.0, 0.0]]).expand(3, 4)
    verdict = accept_or_resample(
        probs, probs, torch.zeros(3, 2, dtype=torch.long), gen, bonus_probs=bonus
    )
    assert verdict.next_token.tolist() == [2, 2, 2]


def test_equal_distributions_off_support_draft_resamples_from_target():
    # p == q, so the residual is all zero; a draft token outside the support is rejected
    # and the replacement comes from p itself.
    gen = seeded(0)
    probs = torch.tensor([0.5, 0.5, 0.0]).expand(2000, 1, 3)
    tokens = torch.full((2000, 1), 2)
    verdict = accept_or_resample(probs, probs, tokens, gen)
    assert not bool(verdict.accepted.any())
    assert bool((verdict.num_accepted == 0).all())
    assert set(verdict.next_token.tolist()) == {0, 1}
    assert not torch.isnan(residual_distribution(probs, probs)).any()


def test_rejection_resamples_from_the_residual_only():
    # p = [0.5, 0.5, 0], q = one-hot at 0: accept token 0 w.p. 0.5, else the
    # residual (p - q)+ = [0, 0.5, 0] -> always token 1.
    gen = seeded(0)
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64).expand(10_000, 1, 3)
    q = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(10_000, 1, 3)
    verdict = accept_or_resample(p, q, torch.zeros(10_000, 1, dtype=torch.long), gen)
    rejected = verdict.num_accepted == 0
    assert bool((verdict.next_token[rejected] == 1).all())
    assert abs(float(rejected.double().mean()) - 0.5) < 0.03


def test_acceptance_stops_at_first_rejection():
    # Position 1 has p(x) = 0 so it is always rejected; position 2 would be accepted.
    gen = seeded(0)
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    verdict = accept_or_resample(p, q, torch.tensor([[0, 0, 0]]), gen)
    assert verdict.accepted.tolist() == [[True, False, False]]
    assert verdict.num_accepted.tolist() == [1]
    assert verdict.next_token.tolist() == [1]


def test_speculative_verification_is_reproducible():
    probs_gen = seeded(5)
    p = torch.rand(64, 4, 6, generator=probs_gen).softmax(-1)
    q = torch.rand(64, 4, 6, generator=probs_gen).softmax(-1)
    tokens = sample_categorical(q, probs_gen)
    first = accept_or_resample(p, q, tokens, seeded(9))
    second = accept_or_resample(p, q, tokens, seeded(9))
    assert torch.equal(first.accepted, second.accepted)
    assert torch.equal(first.next_token, second.next_token)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, q, t: (p, q[..., :3], t), "draft_probs"),
        (lambda p, q, t: (p, q, t[:, :1]), "draft_tokens"),
        (lambda p, q, t: (p, q, t + 10), r"\[0, 4\)"),
        (lambda p, q, t: (p - 1, q, t), "target_probs must be probabilities"),
        (lambda p, q, t: (p, q, t.float()), "integer token ids"),
    ],
)
def test_accept_or_resample_rejects_bad_input(change, message):
    p = torch.full((2, 3, 4), 0.25)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises((ValueError, TypeError), match=message):
        accept_or_resample(*change(p, p.clone(), tokens), seeded(0))


def test_accept_or_resample_needs_a_generator():
    p = torch.full((2, 3, 4), 0.25)
    with pytest.raises(ValueError, match="explicit generator"):
        accept_or_resample(p, p, torch.zeros(2, 3, dtype=torch.long), None)


def test_rows_helper_equals_accept_or_resample_row_by_row():
    # each row with its own generator and window length draws exactly what the one-row call draws
    B, N, V = 6, 5, 7
    g = torch.Generator().manual_seed(11)
    p = torch.rand(B, N, V, generator=g, dtype=torch.float64).pow(3).softmax(-1)
    q = torch.rand(B, N, V, generator=g, dtype=torch.float64).softmax(-1)
    q[0] = p[0]  # never rejects
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, N)
    bonus = torch.rand(B, V, generator=g, dtype=torch.float64).softmax(-1)
    lengths = torch.tensor([5, 3, 1, 0, 5, 2])
    has_bonus = torch.tensor([True, True, False, True, False, True])
    for seed in range(20):
        gens = [torch.Generator().manual_seed(seed * 100 + b) for b in range(B)]
        v = accept_or_resample_rows(
            p, q, drafts, gens, lengths, bonus_probs=bonus, has_bonus=has_bonus
        )
        for b in range(B):
            m = int(lengths[b])
            if m == 0:
                assert int(v.num_accepted[b]) == 0 and int(v.next_token[b]) == -1
                continue
            alone = torch.Generator().manual_seed(seed * 100 + b)
            one = accept_or_resample(
                p[b : b + 1, :m],
                q[b : b + 1, :m],
                drafts[b : b + 1, :m],
                alone,
                bonus_probs=bonus[b : b + 1] if has_bonus[b] else None,
            )
            assert int(v.num_accepted[b]) == int(one.num_accepted[0])
            assert int(v.next_token[b]) == int(one.next_token[0])
            assert torch.equal(v.accepted[b, :m], one.accepted[0]) and not v.accepted[b, m:].any()
            # the row's generator advanced exactly as the one-row call's did
            assert torch.equal(torch.rand(3, generator=gens[b]), torch.rand(3, generator=alone))


def test_rows_helper_with_host_lengths_reads_nothing_back_and_agrees():
    # lengths and has_bonus as lists: the same verdict as tensors, without a read to the host
    from decodekit.testing import HostReads

    B, N, V = 5, 4, 6
    g = torch.Generator().manual_seed(3)
    p = torch.rand(B, N, V, generator=g, dtype=torch.float64).pow(3).softmax(-1)
    q = torch.rand(B, N, V, generator=g, dtype=torch.float64).softmax(-1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, N)
    bonus = torch.rand(B, V, generator=g, dtype=torch.float64).softmax(-1)
    lengths, has_bonus = [4, 2, 0, 1, 4], [True, False, True, True, False]

    def verdict(as_lists):
        gens = [torch.Generator().manual_seed(b) for b in range(B)]
        lens = lengths if as_lists else torch.tensor(lengths)
        flags = has_bonus if as_lists else torch.tensor(has_bonus)
        return accept_or_resample_rows(
            p, q, drafts, gens, lens, bonus_probs=bonus, has_bonus=flags, validate=False
        )

    with HostReads() as reads:
        listed = verdict(True)
    assert reads.total == 0, dict(reads.counts)
    tensors = verdict(False)
    assert torch.equal(listed.next_token, tensors.next_token)
    assert torch.equal(listed.accepted, tensors.accepted)
    with pytest.raises(ValueError, match="lengths"):
        accept_or_resample_rows(p, q, drafts, [torch.Generator()] * B, [5, 0, 0, 0, 0])
