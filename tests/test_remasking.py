"""Tests of decodekit.remasking: which masked positions each policy commits, and the schedule."""

from __future__ import annotations

import pytest
import torch
from decodekit.errors import ConfigError, UnknownNameError
from decodekit.remasking import (
    REMASKING_POLICIES,
    EntropyRemasking,
    FactorRemasking,
    LowConfidenceRemasking,
    MarginRemasking,
    RemaskingPolicy,
    ThresholdRemasking,
    get_remasking_policy,
    gumbel_max_tokens,
    register_remasking_policy,
    transfer_count_schedule,
)

torch.set_num_threads(1)


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


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
    if not policy.needs_num_transfer:  # threshold, factor: at least the top one per row
        assert bool((step.committed.sum(-1) >= 1).all())
    else:
        assert step.committed.sum(-1).tolist() == counts.tolist()


def test_threshold_above_one_commits_exactly_one_per_row():
    logits, x, mask_index, allowed = random_step(seed=3, batch=6)
    step = ThresholdRemasking(threshold=1.01)(logits, x, mask_index, allowed=allowed)
    assert step.committed.sum(-1).tolist() == [1] * 6
    chosen = step.confidence.argmax(-1)
    assert bool(step.committed[torch.arange(6), chosen].all())


def reference_factor_count(confidences: list[float], factor: float) -> int:
    """How many positions Fast-dLLM's get_transfer_index_dynamic commits, as its loop decides."""
    ordered = sorted(confidences, reverse=True)
    bars = [-1.0] + [1 - factor / (n + 1) for n in range(2, len(ordered) + 1)]
    stop = 0
    for stop in range(len(bars)):
        if ordered[stop] < bars[stop]:
            break
    return stop + 1 if stop in (0, len(bars) - 1) else stop


@pytest.mark.parametrize(
    ("confidences", "factor", "expected"),
    [
        ([0.99, 0.98, 0.97, 0.2, 0.1], 1.0, 3),  # 0.97 >= 1 - 1/4; 0.2 < 1 - 1/5
        ([0.99, 0.6, 0.5, 0.4], 1.0, 1),  # 0.6 < 1 - 1/3
        ([0.99, 0.6, 0.45, 0.4], 2.0, 2),  # 0.6 >= 1 - 2/3, 0.45 < 1 - 2/4
        ([0.3, 0.2], 1.0, 2),  # the reference commits the last one when only it fails
        ([0.3], 1.0, 1),
        ([0.99, 0.99, 0.99], 1.0, 3),
    ],
)
def test_factor_rule_counts_as_fast_dllm_does(confidences, factor, expected):
    assert reference_factor_count(confidences, factor) == expected
    conf = torch.tensor([confidences + [0.0] * (6 - len(confidences))], dtype=torch.float64)
    eligible = torch.arange(6)[None] < len(confidences)
    chosen = FactorRemasking(factor).select(conf, eligible, None)
    assert int(chosen.sum()) == expected
    top = conf[0, : len(confidences)].argsort(descending=True)[:expected]
    assert bool(chosen[0, top].all())


def test_factor_rule_matches_the_reference_loop_on_random_rows():
    gen = seeded(11)
    for _ in range(200):
        n = int(torch.randint(1, 10, (1,), generator=gen))
        conf = (torch.rand(n, generator=gen, dtype=torch.float64) ** 0.3).tolist()
        factor = float(torch.rand(1, generator=gen)) * 3 + 0.1
        row = torch.tensor([conf + [0.5] * (10 - n)], dtype=torch.float64)
        eligible = torch.arange(10)[None] < n
        chosen = FactorRemasking(factor).select(row, eligible, None)
        assert int(chosen.sum()) == reference_factor_count(conf, factor)
        assert not bool((chosen & ~eligible).any())


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
    names = {"low-confidence", "random", "margin", "entropy", "threshold", "factor"}
    assert names <= set(REMASKING_POLICIES)
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
