"""The statistics of benchmarks/dkv_cache_pooled.py, which the dkv-cache docs quote."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "dkv_cache_pooled", Path(__file__).parents[1] / "benchmarks" / "dkv_cache_pooled.py"
)
pooled = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pooled)


def test_sign_test_matches_binomial_tails():
    # 8 against 4: 2 * P(X <= 4), X ~ Bin(12, 1/2) = 2 * 794 / 4096
    assert pooled.sign_test(8, 4) == pytest.approx(2 * 794 / 4096)
    assert pooled.sign_test(4, 8) == pooled.sign_test(8, 4)
    assert pooled.sign_test(6, 6) == 1.0
    assert pooled.sign_test(0, 0) == 1.0
    assert pooled.sign_test(10, 0) == pytest.approx(2 / 1024)


def test_paired_difference_interval():
    diff, low, high = pooled.paired_difference(256, 8, 4)
    assert diff == pytest.approx(-4 / 256)
    half = 1.959964 * math.sqrt((12 - 16 / 256) / 256**2)
    assert (low, high) == pytest.approx((diff - half, diff + half))
    # no changed answer: no uncertainty left in a paired comparison
    assert pooled.paired_difference(100, 0, 0) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="b \\+ c <= n"):
        pooled.paired_difference(10, 6, 6)


def _run(skip: int, batches: int, accuracy: float, b: int, c: int, interval=(8,)):
    rows = [
        {
            "config": "baseline",
            "accuracy": accuracy,
            "right_to_wrong": 0,
            "wrong_to_right": 0,
            "speedup": 1.0,
            "ideal_speedup": None,
        },
        {
            "config": "decode",
            "accuracy": 0.0,
            "right_to_wrong": b,
            "wrong_to_right": c,
            "speedup": 2.9,
            "ideal_speedup": 3.4,
        },
    ]
    args = {
        "batches": [8],
        "skip_batches": skip,
        "prompt_batches": batches,
        "refresh_interval": list(interval),
    }
    return {"args": args, "rows": rows}


def test_pool_adds_runs_and_reads_a_lone_decode_row_by_its_interval():
    out = pooled.pool([_run(None, 2, 0.875, 1, 0), _run(2, 4, 0.75, 2, 1)], "decode@8")
    assert out["prompts"] == 32
    assert out["baseline_accuracy"] == pytest.approx((14 + 12) / 32, abs=1e-4)
    assert out["accuracy"] == pytest.approx((26 - 3 + 1) / 32, abs=1e-4)
    assert (out["right_to_wrong"], out["wrong_to_right"]) == (3, 1)
    assert [r["prompts"] for r in out["runs"]] == [[0, 15], [16, 31]]


def test_pool_refuses_overlaps_and_missing_rows():
    with pytest.raises(SystemExit, match="overlap"):
        pooled.pool([_run(None, 2, 0.9, 0, 0), _run(1, 3, 0.9, 0, 0)], "decode@8")
    with pytest.raises(SystemExit, match="no row 'decode@4'"):
        pooled.pool([_run(None, 2, 0.9, 0, 0)], "decode@4")
