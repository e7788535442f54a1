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
    assert len(memo) == 4
    assert memo.latest("mid", at_or_before=1).item() == 1.0
    assert memo.latest("mid", at_or_before=2).item() == 2.0
    with pytest.raises(CacheError, match="not the timestep"):
        memo.put(torch.tensor(500), "mid", torch.zeros(1))
    with pytest.raises(CacheError, match="step index"):
        memo.latest("mid", at_or_before=500.0)


def test_memo_latest_cap_and_clear():
    memo = StepFeatureMemo(max_steps=2)
    memo.put(0, "down", "a")
    memo.put(0, "mid", "b")
    memo.put(3, "down", "c")
    assert memo.latest("down", at_or_before=2) == "a"
    assert memo.latest("down", at_or_before=7) == "c"
    assert memo.latest("down") == "c"
    memo.put(3, "down", "c2")  # the same step again: replaced, nothing dropped
    assert memo.latest("down") == "c2" and memo.latest("mid") == "b"
    memo.put(5, "down", "d")  # over the cap: step 0 goes, with both its features
    assert len(memo) == 2 and memo.latest("mid", default=None) is None
    assert memo.latest("down", at_or_before=2, default="none") == "none"
    with pytest.raises(KeyError, match=r"at or before step 2; steps holding it: \[3, 5\]"):
        memo.latest("down", at_or_before=2)
    memo.clear()
    assert len(memo) == 0
    with pytest.raises(KeyError, match="steps holding it: none"):
        memo.latest("down")
