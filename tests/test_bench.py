"""bench(): structure, exact model-call counts, per-pair ratio arithmetic, quality, files."""

from __future__ import annotations

import json
import statistics

import decodekit
import pytest
import torch
from decodekit.bench import PeakMemory, bar_chart, bench, pair_ratios
from decodekit.config import load_config
from decodekit.figures import SPREAD_H
from PIL import Image

from tests.tiny import ScriptedClock, ToyAdapter, ToyPipe, toy_config


def test_bench_reports_exact_nfe_quality_and_structure(toy, manager, tmp_path):
    cfg = load_config(toy_config(toy), manager=manager)  # steps=8, halve every=2, repeat=2
    loads = ToyPipe.loads
    r = bench(cfg, json_path=tmp_path / "b.json", png_path=tmp_path / "b.png", manager=manager)
    assert ToyPipe.loads == loads + 1  # loaded once for both arms
    for key in (
        "speedup",
        "nfe",
        "peak_memory",
        "quality",
        "baseline",
        "strategy",
        "strategies",
        "config",
        "machine",
    ):
        assert key in r
    assert r["nfe"] == {"baseline": 8, "strategy": 4, "ratio": 2.0}
    assert r["baseline"]["nfe_all"] == [8, 8] and r["strategy"]["nfe_all"] == [4, 4]
    assert r["strategy"]["served"] == 4 and r["baseline"]["served"] == 0
    assert r["strategy"]["stats"]["strategies"]["halve"]["hits"] == 4
    assert r["baseline"]["stats"]["strategies"] == {}
    assert r["ideal_speedup"] == 2.0
    assert r["strategies"] == [{"name": "halve", "params": {"every": 2}}]
    assert r["repeat"] == 2 and len(r["pair_ratios"]) == 2
    assert len(r["baseline"]["time_s"]["all"]) == 2 and len(r["strategy"]["time_s"]["all"]) == 2
    assert r["speedup"] == statistics.median(r["pair_ratios"]) > 0
    assert r["baseline"]["items"] == 2

    # Quality compares the strategy outputs with the baseline outputs of the same seed.
    pipe = ToyAdapter.load(cfg.source, device="cpu", dtype="float32", options={})
    base = pipe(["a", "b"], 8, 0)
    with decodekit.attach(pipe, ["halve"], manager=manager):
        fast = pipe(["a", "b"], 8, 0)
    expected = float((base - fast).abs().max())
    assert expected > 0 and r["quality"]["adapter"]["max_abs_diff"] == expected
    assert set(r["quality"]) == {"adapter", "toy-signs"}  # the metric returning None is left out
    assert r["quality"]["toy-signs"]["rows"] == 2
    assert 0.0 <= r["quality"]["toy-signs"]["sign_agreement"] <= 1.0

    mem = r["peak_memory"]
    assert mem["kind"] in (
        "cpu_rss_high_water",
        "cpu_rss_delta",
        "cuda_max_allocated",
        "unavailable",
    )
    if mem["kind"].startswith("cpu_rss"):
        assert mem["baseline"] >= 0 and mem["strategy"] >= 0
    assert r["machine"]["device"] == "cpu" and r["machine"]["torch"] == torch.__version__

    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["nfe"] == r["nfe"] and saved["speedup"] == r["speedup"]
    assert saved["config"]["pipeline"]["type"] == "toy" and saved["picture"]["kind"] == "bar-chart"
    with Image.open(tmp_path / "b.png") as img:
        assert img.format == "PNG" and img.size == (560, 300 + SPREAD_H)  # bars, then the spread


def test_speedup_is_the_median_of_per_pair_ratios_with_an_injected_clock(toy, manager):
    cfg = load_config(toy_config(toy, bench={"repeat": 3, "warmup": 1}), manager=manager)
    # warm-up: baseline, strategy; then pairs in order B S, S B, B S.
    durations = [9.0, 9.0, 4.0, 2.0, 1.0, 6.0, 3.0, 1.5]
    r = bench(cfg, manager=manager, clock=ScriptedClock(durations))
    assert r["baseline"]["time_s"]["all"] == [4.0, 6.0, 3.0]
    assert r["strategy"]["time_s"]["all"] == [2.0, 1.0, 1.5]
    assert r["pair_ratios"] == [2.0, 6.0, 2.0]
    assert r["speedup"] == 2.0  # median of ratios, not median(B) / median(S) = 4 / 1.5
    assert r["baseline"]["time_s"]["median"] == 4.0 and r["strategy"]["time_s"]["median"] == 1.5
    assert r["baseline"]["items_per_s"] == pytest.approx(2 / 4.0)


def test_pair_ratios_arithmetic():
    assert pair_ratios([2.0, 3.0], [1.0, 4.0]) == [2.0, 0.75]
    assert pair_ratios([1.0], [0.0]) == [float("inf")]
    with pytest.raises(ValueError):
        pair_ratios([1.0], [1.0, 2.0])


def test_repeat_argument_overrides_config(toy, manager):
    cfg = load_config(toy_config(toy), manager=manager)
    r = bench(cfg, repeat=3, manager=manager)
    assert r["repeat"] == 3 and len(r["pair_ratios"]) == 3
    with pytest.raises(ValueError):
        bench(cfg, repeat=0, manager=manager)


def test_adapter_picture_is_used_when_it_draws(toy, manager, tmp_path, monkeypatch):
    monkeypatch.setattr(ToyAdapter, "draw_picture", True)
    cfg = load_config(toy_config(toy), manager=manager)
    r = bench(cfg, repeat=1, png_path=tmp_path / "p.png", manager=manager)
    assert r["picture"]["kind"] == "adapter"
    with Image.open(tmp_path / "p.png") as img:
        assert img.size == (8, 4)


def test_baseline_only_config(toy, manager):
    cfg = load_config(toy_config(toy, strategies=[]), manager=manager)
    r = bench(cfg, repeat=1, manager=manager)
    assert r["nfe"] == {"baseline": 8, "strategy": 8, "ratio": 1.0}
    assert r["quality"]["adapter"]["max_abs_diff"] == 0.0 and r["ideal_speedup"] is None


def test_bar_chart_draws_both_arms(tmp_path):
    result = {
        "speedup": 2.0,
        "strategies": [{"name": "halve", "params": {}}],
        "baseline": {"time_s": {"median": 0.4}, "nfe": 8},
        "strategy": {"time_s": {"median": 0.2}, "nfe": 4},
    }
    bar_chart(result, tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as img:
        rgb = img.convert("RGB")
        colors = {c for _, c in rgb.getcolors(maxcolors=100000)}
    assert (120, 120, 120) in colors and (40, 110, 200) in colors  # both arms' bars are drawn


@pytest.mark.parametrize("sampled", [False, True], ids=["high-water-mark", "sampler-thread"])
def test_peak_memory_sees_an_allocation(sampled):
    mem = PeakMemory("cpu", interval_s=0.001)
    if sampled and mem.kind == "cpu_rss_high_water":
        mem.kind = "cpu_rss_delta"  # the fallback where the kernel refuses the reset
    if not mem.kind.startswith("cpu_rss"):
        pytest.skip("no /proc here")
    with mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
        import time

        time.sleep(0.02)
        del block
    assert mem.peak >= 32 * 2**20  # freed before the exit: only a peak reading sees it
    with mem:  # a second block starts from its own entry, not the first block's peak
        torch.ones(16).add_(1)
    assert mem.peak < 32 * 2**20
