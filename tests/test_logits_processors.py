"""Tests of decodekit.logits_processors: temperature, top-k, top-p, chains, guidance."""

from __future__ import annotations

import math

import pytest
import torch
from decodekit.logits_processors import (
    ProcessorChain,
    Temperature,
    TopK,
    TopP,
    classifier_free_guidance,
)


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
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
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
