"""Tests of decodekit.feature_memo: features stored per loop step index."""

from __future__ import annotations

import pytest
import torch
from decodekit.feature_memo import StepFeatureMemo
from decodekit.kv_cache import CacheError


def test_memo_is_keyed_by_step_index_not_timestep_value():
    memo = StepFeatureMemo()
    timesteps = [999, 500, 500, 1]  # a repeated timestep value, as in some schedulers
    for i, _timestep in enumerate(timesteps):
        memo.put(i, "mid", torch.full((1,), float(i)))
    assert memo.get(1, "mid").item() == 1.0 and memo.get(2, "mid").item() == 2.0
    assert memo.steps() == [0, 1, 2, 3]
    with pytest.raises(CacheError, match="not the timestep"):
        memo.put(torch.tensor(500), "mid", torch.zeros(1))
    with pytest.raises(CacheError, match="step index"):
        memo.get(500.0, "mid")


def test_memo_get_latest_cap_and_clear():
    memo = StepFeatureMemo(max_steps=2)
    memo.put(0, "down", "a")
    memo.put(0, "mid", "b")
    memo.put(3, "down", "c")
    assert memo.latest("down", at_or_before=2) == (0, "a")
    assert memo.latest("down", at_or_before=7) == (3, "c")
    memo.put(5, "down", "d")  # over the cap: step 0 goes
    assert memo.steps() == [3, 5] and not memo.has(0, "mid")
    assert memo.get(0, "mid", default=None) is None
    with pytest.raises(KeyError, match=r"steps holding it: \[3, 5\]"):
        memo.get(4, "down")
    memo.clear(3)
    assert memo.steps() == [5]
    memo.clear()
    assert len(memo) == 0
    with pytest.raises(KeyError):
        memo.latest("down", at_or_before=9)
