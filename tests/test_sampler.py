"""Tests of the shared sampler interfaces (decodekit.sampler).

The speculative verifier is checked by the exact-distribution oracle of
DESIGN.md: an exact joint distribution over length-3 sequences of a 5-token
vocabulary, tens of thousands of speculative samples, a chi-square test and a
total-variation bound — with ancestral sampling through the same harness as a
control that must pass, and a wrong acceptance rule that must fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from decodekit.errors import ConfigError, UnknownNameError
from decodekit.sampler import (
    REMASKING_POLICIES,
    EntropyRemasking,
    LowConfidenceRemasking,
    MarginRemasking,
    ProcessorChain,
    RemaskingPolicy,
    Sampler,
    Temperature,
    ThresholdRemasking,
    TopK,
    TopP,
    accept_or_resample,
    acceptance_probability,
    classifier_free_guidance,
    get_remasking_policy,
    gumbel_max_tokens,
    register_remasking_policy,
    residual_distribution,
    sample,
    sample_categorical,
    transfer_count_schedule,
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
# Speculative verification: edge cases and errors
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


# ---------------------------------------------------------------------------------------------
# Processors and sampling
# ---------------------------------------------------------------------------------------------


def test_temperature_divides_logits():
    torch.testing.assert_close(
        Temperature(2.0)(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([0.5, 1.0, 1.5])
    )
    with pytest.raises(ValueError, match="Sampler\\(temperature=0\\)"):
        Temperature(0)


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 4.0, -1.0, 6.0]])
    out = TopK(2)(logits)
    inf = -math.inf
    assert out.tolist() == [[inf, 3.0, 2.0, inf], [5.0, inf, inf, 6.0]]
    assert torch.equal(TopK(10)(logits), logits)
    with pytest.raises(ValueError, match="k >= 1"):
        TopK(0)


def test_top_p_keeps_the_minimal_nucleus():
    logits = torch.tensor([0.125, 0.5, 0.125, 0.25]).log()  # sorted: 0.5, 0.25, 0.125, 0.125
    kept = {p: (TopP(p)(logits) > -math.inf).tolist() for p in (0.3, 0.5, 0.7, 0.75, 0.8)}
    assert kept[0.3] == [False, True, False, False]
    assert kept[0.5] == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept[0.7] == [False, True, False, True]
    assert kept[0.75] == [False, True, False, True]  # minimal: 0.5 + 0.25 reaches 0.75
    assert sum(kept[0.8]) == 3
    with pytest.raises(ValueError, match=r"p in \(0, 1\]"):
        TopP(0.0)


def test_processors_work_on_leading_batch_axes():
    logits = torch.randn(2, 3, 7, generator=seeded(0))
    chain = ProcessorChain([Temperature(0.5), TopK(3), TopP(0.9)])
    out = chain(logits)
    assert out.shape == logits.shape
    assert bool(((out > -math.inf).sum(-1) <= 3).all())
    for row_in, row_out in zip(logits.reshape(-1, 7), out.reshape(-1, 7), strict=True):
        assert int(row_out.argmax()) == int(row_in.argmax())


def test_classifier_free_guidance_conventions():
    cond = torch.tensor([1.0, 2.0, 0.0])
    uncond = torch.tensor([0.5, 0.0, 1.0])
    torch.testing.assert_close(
        classifier_free_guidance(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond)
    )
    torch.testing.assert_close(
        classifier_free_guidance(cond, uncond, 3.0, "llada"), uncond + 4.0 * (cond - uncond)
    )
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 0.0, "llada"), cond)
    with pytest.raises(ValueError, match="'standard' is uncond"):
        classifier_free_guidance(cond, uncond, 1.0, "diffusers")


def test_sampler_composes_temperature_top_k_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    # Temperature 0.5 squares the probs: [16, 9, 4, 1] / 30; top-3 renormalises to
    # [16, 9, 4] / 29; the nucleus 0.8 stops after 16/29 + 9/29 >= 0.8 -> [16, 9] / 25.
    probs = Sampler(temperature=0.5, top_k=3, top_p=0.8).probs(logits)
    expected = torch.tensor([16 / 25, 9 / 25, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(probs, expected)
    # At temperature 1 the top-3 mass [4, 3, 2] / 9 needs all three to reach 0.8.
    probs = Sampler(temperature=1.0, top_k=3, top_p=0.8).probs(logits)
    expected = torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0], dtype=torch.float64)
    torch.testing.assert_close(probs, expected)


def test_sampling_is_reproducible_with_a_fixed_generator():
    logits = torch.randn(500, 8, generator=seeded(0))
    first = sample(logits, seeded(3), temperature=0.7, top_p=0.95)
    second = sample(logits, seeded(3), temperature=0.7, top_p=0.95)
    third = sample(logits, seeded(4), temperature=0.7, top_p=0.95)
    assert torch.equal(first.tokens, second.tokens)
    assert not torch.equal(first.tokens, third.tokens)
    torch.testing.assert_close(
        first.token_probs, first.probs.gather(-1, first.tokens[:, None]).squeeze(-1)
    )


def test_sampling_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample(torch.randn(50, 4, generator=seeded(0)), seeded(1))
    assert torch.equal(torch.rand(3), expected)


def test_temperature_zero_is_argmax_with_one_hot_probs():
    logits = torch.randn(4, 6, 9, generator=seeded(0))
    result = sample(logits, None, temperature=0)
    assert torch.equal(result.tokens, logits.argmax(-1))
    assert bool((result.token_probs == 1).all())
    assert bool((result.probs.sum(-1) == 1).all())


def test_sampling_needs_a_generator_when_stochastic():
    with pytest.raises(ValueError, match="explicit generator"):
        sample(torch.zeros(2, 3), None)


def test_sample_categorical_follows_the_probabilities():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    tokens = sample_categorical(probs.expand(40_000, 4), seeded(0))
    freq = torch.bincount(tokens, minlength=4).double() / 40_000
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="positive mass"):
        sample_categorical(torch.zeros(2, 3), seeded(0))


# ---------------------------------------------------------------------------------------------
# Remasking policies
# ---------------------------------------------------------------------------------------------

MASK_ID = 99


def hand_made_step():
    """Five positions of one row, vocabulary 4, with distinct orders per policy.

    Eligible positions 0 (A), 1 (B) and 2 (D); position 3 is already committed and
    position 4 is masked but outside the allowed region — both are more confident
    than anything eligible and must never be chosen.
        A = [0.60, 0.399, 0.0005, 0.0005]  max .60  margin .20  entropy ~.68
        B = [0.65, 0.15, 0.10, 0.10]       max .65  margin .50  entropy ~1.03
        D = [0.64, 0.12, 0.12, 0.12]       max .64  margin .52  entropy ~1.05
    low-confidence order B, D, A; margin D, B, A; entropy (lowest first) A, B, D.
    """
    probs = torch.tensor(
        [
            [0.60, 0.399, 0.0005, 0.0005],
            [0.10, 0.65, 0.15, 0.10],
            [0.12, 0.12, 0.64, 0.12],
            [0.97, 0.01, 0.01, 0.01],
            [0.01, 0.01, 0.01, 0.97],
        ],
        dtype=torch.float64,
    )
    logits = probs.log()[None]  # (1, 5, 4)
    x = torch.tensor([[MASK_ID, MASK_ID, MASK_ID, 3, MASK_ID]])
    mask_index = x == MASK_ID
    allowed = torch.tensor([True, True, True, True, False])
    return logits, x, mask_index, allowed


@pytest.mark.parametrize(
    ("policy", "order"),
    [("low-confidence", [1, 2, 0]), ("margin", [2, 1, 0]), ("entropy", [0, 1, 2])],
)
def test_each_policy_orders_positions_on_a_hand_made_example(policy, order):
    logits, x, mask_index, allowed = hand_made_step()
    predicted_argmax = [0, 1, 2]
    for count in (1, 2, 3):
        step = get_remasking_policy(policy)(logits, x, mask_index, count, allowed=allowed)
        chosen = step.committed[0].nonzero().flatten().tolist()
        assert sorted(chosen) == sorted(order[:count]), f"{policy} with {count}"
        assert step.x[0, 3] == 3 and step.x[0, 4] == MASK_ID
        for position in chosen:
            assert int(step.x[0, position]) == predicted_argmax[position]


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [(0.5, [0, 1, 2]), (0.62, [1, 2]), (0.645, [1]), (0.9, [1]), (1.5, [1])],
)
def test_threshold_commits_confident_positions_and_always_the_top_one(threshold, expected):
    logits, x, mask_index, allowed = hand_made_step()
    step = get_remasking_policy("threshold", threshold=threshold)(
        logits, x, mask_index, allowed=allowed
    )
    assert step.committed[0].nonzero().flatten().tolist() == expected


def random_step(seed: int, batch: int = 4, length: int = 12, vocab: int = 7):
    gen = seeded(seed)
    logits = torch.randn(batch, length, vocab, generator=gen) * 2
    x = torch.randint(0, vocab, (batch, length), generator=gen)
    mask_index = torch.rand(batch, length, generator=gen) < 0.6
    mask_index[:, :2] = True  # every row has masked positions inside the region
    x[mask_index] = MASK_ID
    allowed = torch.arange(length) < 8
    return logits, x, mask_index, allowed


@pytest.mark.parametrize("name", sorted(REMASKING_POLICIES))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_policy_respects_counts_region_and_committed_tokens(name, temperature):
    logits, x, mask_index, allowed = random_step(seed=7)
    eligible = mask_index & allowed
    counts = torch.minimum(torch.tensor([1, 2, 3, 4]), eligible.sum(-1))
    policy = get_remasking_policy(name)
    x_before = x.clone()
    step = policy(
        logits, x, mask_index, counts, temperature=temperature, generator=seeded(1), allowed=allowed
    )
    assert torch.equal(x, x_before), "the input tokens were modified in place"
    assert not bool((step.committed & ~eligible).any()), "committed outside the eligible region"
    assert torch.equal(step.x[~step.committed], x[~step.committed])
    assert torch.equal(step.x[step.committed], step.predicted[step.committed])
    assert bool((step.x[step.committed] != MASK_ID).all())
    if name == "threshold":
        assert bool((step.committed.sum(-1) >= 1).all())
    else:
        assert step.committed.sum(-1).tolist() == counts.tolist()


def test_threshold_above_one_commits_exactly_one_per_row():
    logits, x, mask_index, allowed = random_step(seed=3, batch=6)
    step = ThresholdRemasking(threshold=1.01)(logits, x, mask_index, allowed=allowed)
    assert step.committed.sum(-1).tolist() == [1] * 6
    chosen = step.confidence.argmax(-1)
    assert bool(step.committed[torch.arange(6), chosen].all())


def test_random_policy_is_uniform_over_eligible_positions():
    logits, x, mask_index, allowed = hand_made_step()
    rows = 6000
    step = get_remasking_policy("random")(
        logits.expand(rows, -1, -1),
        x.expand(rows, -1),
        mask_index.expand(rows, -1),
        1,
        generator=seeded(0),
        allowed=allowed,
    )
    freq = step.committed.double().mean(0)  # (L,)
    assert freq[3] == 0 and freq[4] == 0
    torch.testing.assert_close(
        freq[:3], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03, rtol=0
    )


def test_gumbel_max_samples_the_tempered_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5])
    temperature = 0.7
    rows = 40_000
    tokens = gumbel_max_tokens(logits.expand(rows, 4), temperature, seeded(0))
    freq = torch.bincount(tokens, minlength=4).double() / rows
    expected = (logits.double() / temperature).softmax(-1)
    counts_expected = expected * rows
    statistic = ((freq * rows - counts_expected) ** 2 / counts_expected).sum()
    p_value = torch.special.gammaincc(torch.tensor(1.5, dtype=torch.float64), statistic / 2)
    assert float(p_value) > 1e-3


def test_gumbel_max_matches_llada_formula_and_argmax_at_zero():
    logits = torch.randn(3, 5, 11, generator=seeded(0))
    ours = gumbel_max_tokens(logits, 0.5, seeded(4))
    noise = torch.rand(logits.shape, generator=seeded(4), dtype=torch.float64)
    llada = (logits.double().exp() / (-torch.log(noise)) ** 0.5).argmax(-1)
    assert torch.equal(ours, llada)
    assert torch.equal(gumbel_max_tokens(logits, 0, None), logits.argmax(-1))


def test_remasking_is_reproducible_with_a_fixed_generator():
    logits, x, mask_index, allowed = random_step(seed=5)
    policy = get_remasking_policy("random")
    first = policy(logits, x, mask_index, 2, temperature=1.0, generator=seeded(2), allowed=allowed)
    second = policy(logits, x, mask_index, 2, temperature=1.0, generator=seeded(2), allowed=allowed)
    assert torch.equal(first.x, second.x)


def test_remasking_errors_are_clear():
    logits, x, mask_index, allowed = random_step(seed=5)
    policy = LowConfidenceRemasking()
    with pytest.raises(ValueError, match="only .* masked inside the allowed region"):
        policy(logits, x, mask_index, 9, allowed=allowed)
    with pytest.raises(ValueError, match="pass num_transfer"):
        policy(logits, x, mask_index)
    with pytest.raises(ValueError, match="mask_index must be a bool tensor"):
        policy(logits, x, mask_index.long(), 1)
    with pytest.raises(ValueError, match="explicit generator"):
        policy(logits, x, mask_index, 1, temperature=1.0)
    with pytest.raises(UnknownNameError, match="Did you mean 'low-confidence'"):
        get_remasking_policy("low_confidence")
    with pytest.raises(ConfigError, match="threshold must be"):
        get_remasking_policy("threshold", threshold=-1)
    with pytest.raises(ConfigError, match="'margin' takes no parameters; unknown .*threshold"):
        get_remasking_policy("margin", threshold=0.5)


def test_registry_has_the_five_policies_and_accepts_new_ones():
    assert {"low-confidence", "random", "margin", "entropy", "threshold"} <= set(REMASKING_POLICIES)
    assert isinstance(get_remasking_policy("margin"), MarginRemasking)
    instance = EntropyRemasking()
    assert get_remasking_policy(instance) is instance

    @register_remasking_policy
    class LeftToRight(RemaskingPolicy):
        """Commit the leftmost masked positions first."""

        name = "test-left-to-right"

        def confidence(self, probs, predicted, generator):
            return -torch.arange(predicted.shape[-1], dtype=torch.float64).expand(predicted.shape)

    try:
        logits, x, mask_index, allowed = hand_made_step()
        step = get_remasking_policy("test-left-to-right")(logits, x, mask_index, 2, allowed=allowed)
        assert step.committed[0].tolist() == [True, True, False, False, False]
        with pytest.raises(ValueError, match="is taken"):

            @register_remasking_policy
            class Clash(RemaskingPolicy):
                """Same name as above."""

                name = "test-left-to-right"
    finally:
        REMASKING_POLICIES.pop("test-left-to-right", None)


# ---------------------------------------------------------------------------------------------
# Transfer-count schedule
# ---------------------------------------------------------------------------------------------


def test_transfer_count_schedule_values():
    assert transfer_count_schedule(10, 4).tolist() == [3, 3, 2, 2]
    assert transfer_count_schedule(8, 4).tolist() == [2, 2, 2, 2]
    assert transfer_count_schedule(2, 4).tolist() == [1, 1, 0, 0]
    per_row = transfer_count_schedule(torch.tensor([10, 5, 0]), 4)
    assert per_row.tolist() == [[3, 3, 2, 2], [2, 1, 1, 1], [0, 0, 0, 0]]
    assert transfer_count_schedule([7, 3], 3).sum(-1).tolist() == [7, 3]
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        transfer_count_schedule(10, 0)
    with pytest.raises(ValueError, match="num_masked must be >= 0"):
        transfer_count_schedule(-1, 3)


def test_count_checks_read_the_device_once():
    # The checks run at every step of the masked-diffusion loop; on a GPU each read waits.
    from decodekit.testing import HostReads

    logits, x, mask_index, allowed = random_step(seed=5)
    policy = LowConfidenceRemasking()
    counts = torch.ones(x.shape[0], dtype=torch.long)
    with HostReads() as reads:
        policy._check_inputs(logits, x, mask_index, counts, allowed)
    assert reads.total == 1
    with pytest.raises(ValueError, match="num_transfer must be >= 0, got \\[-1"):
        policy(logits, x, mask_index, -1, allowed=allowed)
