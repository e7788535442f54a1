"""Tests of decodekit.sampler: logits to tokens, reproducibly, with an explicit generator."""

from __future__ import annotations

import pytest
import torch
from decodekit.sampler import Sampler, sample_categorical

torch.set_num_threads(1)


def seeded(seed: int) -> torch.Generator:
    """A CPU generator with a fixed seed."""
    return torch.Generator().manual_seed(seed)


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
    sampler = Sampler(temperature=0.7, top_p=0.95)
    first, second, third = (sampler(logits, seeded(seed)) for seed in (3, 3, 4))
    assert torch.equal(first.tokens, second.tokens)
    assert not torch.equal(first.tokens, third.tokens)
    torch.testing.assert_close(
        first.token_probs, first.probs.gather(-1, first.tokens[:, None]).squeeze(-1)
    )


def test_sampling_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    Sampler()(torch.randn(50, 4, generator=seeded(0)), seeded(1))
    assert torch.equal(torch.rand(3), expected)


def test_temperature_zero_is_argmax_with_one_hot_probs():
    logits = torch.randn(4, 6, 9, generator=seeded(0))
    result = Sampler(temperature=0)(logits, None)
    assert torch.equal(result.tokens, logits.argmax(-1))
    assert bool((result.token_probs == 1).all())
    assert bool((result.probs.sum(-1) == 1).all())


def test_sampling_needs_a_generator_when_stochastic():
    with pytest.raises(ValueError, match="explicit generator"):
        Sampler()(torch.zeros(2, 3), None)


def test_sample_categorical_follows_the_probabilities():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    tokens = sample_categorical(probs.expand(40_000, 4), seeded(0))
    freq = torch.bincount(tokens, minlength=4).double() / 40_000
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    with pytest.raises(ValueError, match="positive mass"):
        sample_categorical(torch.zeros(2, 3), seeded(0))
