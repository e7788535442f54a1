"""Bench pictures: the words drawn on them, word differences, the spread of per-pair ratios."""

from __future__ import annotations

import json
import math

import pytest
from decodekit.bench import bench, draw_picture
from decodekit.config import load_config
from decodekit.demo import markdown_table
from decodekit.figures import (
    column_labels,
    draw_image_figure,
    draw_text_figure,
    figure_text,
    speedup_spread,
    strategy_label,
    text_samples,
    word_diff,
)
from PIL import Image

from tests.tiny import toy_config


def _result(ratios: list[float], **extra) -> dict:
    r = {
        "label": "sjd.yaml",
        "pair_ratios": ratios,
        "speedup_spread": speedup_spread(ratios),
        "ideal_speedup": 2.0,
        "strategies": [
            {"name": "faster-diffusion", "params": {"key_steps": "paper"}},
            {"name": "prior-noise", "params": {"prior_noise": 0.003}},
        ],
        "baseline": {"time_s": {"median": 0.5}, "nfe": 50},
        "strategy": {"time_s": {"median": 0.25}, "nfe": 9},
        "quality": {"adapter": {"psnr": 36.21, "identical": 0.0}, "shapes-judge": {}},
        "machine": {"device": "cpu", "torch_threads": 1},
    }
    r.update(extra)
    return r


def test_spread_interval_is_the_order_statistic_interval_with_its_coverage():
    s = speedup_spread([1.2, 0.9, 1.1])
    # three pairs: the whole range, covering the median with probability 1 - 2/8
    assert (s["n"], s["low"], s["high"], s["median"]) == (3, 0.9, 1.2, 1.1)
    assert s["coverage"] == 0.75 and s["within_noise"] is True
    s = speedup_spread([2.0, 2.2, 1.9, 2.5, 2.1, 2.05, 2.3, 2.4, 1.95, 2.15])
    # ten pairs: x_(2)..x_(9) covers 1 - 2 * 11/1024 = 0.979 >= 0.95; x_(3)..x_(8) only 0.891
    assert (s["low"], s["high"]) == (1.95, 2.4)
    assert s["coverage"] == pytest.approx(1 - 22 / 1024) and s["within_noise"] is False
    assert (s["min"], s["max"]) == (1.9, 2.5)
    with pytest.raises(ValueError):
        speedup_spread([])


def test_figure_text_names_strategies_params_speedup_quality_and_rows():
    text = figure_text(_result([1.2, 0.9, 1.1]))
    assert text["title"] == (
        "sjd.yaml: baseline vs faster-diffusion(key_steps=paper) + prior-noise(prior_noise=0.003)"
    )
    speed, quality = text["lines"]
    assert speed.startswith("speed-up x1.10 (75% interval x0.90-x1.20 over 3 pairs: within noise)")
    assert "FLOP-ideal x2.00" in speed and "model calls 50 -> 9" in speed
    assert speed.endswith("cpu, 1 thread")
    assert quality == "quality against the baseline: adapter: psnr=36.2, identical=0"
    assert text["rows"] == [
        "baseline\n0.5 s · 50 calls",
        "faster-diffusion + prior-noise\n0.25 s · 9 calls",
    ]
    assert figure_text(_result([2.0, 2.1, 2.2]))["lines"][0].startswith(
        "speed-up x2.10 (75% interval x2.00-x2.20 over 3 pairs: outside noise)"
    )
    assert strategy_label([]) == "no strategy"


def test_word_diff_marks_the_differing_words_and_keeps_the_text():
    a, b = word_diff("the cat sat on the mat", "the dog sat on a mat today")
    assert "".join(p for p, _ in a) == "the cat sat on the mat"
    assert "".join(p for p, _ in b) == "the dog sat on a mat today"
    assert [p for p, d in a if d] == ["cat", "the"]
    assert [p for p, d in b if d] == ["dog", "a", "today"]
    same, _ = word_diff("86-7=79", "86-7=79")
    assert not any(d for _, d in same)


def test_text_samples_compare_the_first_row_of_each_prompt():
    base = [{"prompt": "p1", "text": "a b"}, {"prompt": "p2", "text": "c\nd"}]
    strat = [{"text": "a b"}, {"text": "a x"}, {"text": "c\nd"}, {"text": "c e"}]  # 2 per prompt
    samples = text_samples(base, strat)
    assert [s["prompt"] for s in samples] == ["p1", "p2"]
    assert not any(d for s in samples for _, d in s["strategy"])
    assert "".join(p for p, _ in samples[1]["baseline"]) == "c / d"


def test_text_samples_of_ranked_rows_pair_the_best_of_each_prompt():
    base = [
        {"prompt": p, "text": t, "rank": r}
        for p, t, r in [("a", "1", 0), ("a", "2", 1), ("b", "3", 0), ("b", "4", 1)]
    ]
    strat = [
        {"prompt": p, "text": t, "rank": r}
        for p, t, r in [("a", "1", 0), ("a", "5", 1), ("b", "6", 0), ("b", "3", 1)]
    ]
    samples = text_samples(base, strat)
    assert [s["prompt"] for s in samples] == ["a", "b"]
    assert [[p for p, d in s["strategy"] if d] for s in samples] == [[], ["6"]]


def test_column_labels_are_the_prompts():
    assert column_labels(["red", "blue"], 1, 2) == ["red", "blue"]
    assert column_labels(["red", "blue"], 2, 3) == ["red #0", "red #1", "blue #0"]


def test_figures_draw_pngs_with_both_arms(tmp_path):
    r = _result([1.2, 0.9, 1.1])
    red, blue = Image.new("RGB", (16, 16), (250, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 250))
    draw_image_figure(r, [red, red], [blue, red], ["a red one", "another"], tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as img:
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (250, 0, 0) in colours and (0, 0, 250) in colours  # both rows' tiles are on it
    base = [{"prompt": "1+1=", "text": "2"}]
    draw_text_figure(r, base, [{"prompt": "1+1=", "text": "3"}], tmp_path / "t.png")
    with Image.open(tmp_path / "t.png") as img:
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (255, 236, 160) in colours and (255, 190, 190) in colours  # both sides marked


def test_bench_records_the_spread_and_the_label(toy, manager, tmp_path):
    cfg = load_config(toy_config(toy, bench={"repeat": 3, "warmup": 0}), manager=manager)
    r = bench(cfg, manager=manager, json_path=tmp_path / "b.json", label="toy.yaml")
    s = r["speedup_spread"]
    assert s == speedup_spread(r["pair_ratios"]) and s["n"] == 3
    assert s["low"] == min(r["pair_ratios"]) and s["high"] == max(r["pair_ratios"])
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["speedup_spread"]["coverage"] == 0.75 and saved["label"] == "toy.yaml"
    row = markdown_table({"toy": r}).splitlines()[2]
    low, high = (f"×{v:.3g}" for v in (s["low"], s["high"]))
    assert f"| {low}–{high} (75%, 3 pairs" in row
    assert ("within noise" in row) == (s["low"] <= 1 <= s["high"])
    assert not math.isnan(s["median"])


def test_draw_picture_picks_the_grid_for_images_and_samples_for_text(tmp_path):
    from types import SimpleNamespace

    from tests.tiny import ToyAdapter

    r = _result([1.5, 1.6, 1.4])
    cfg = SimpleNamespace(
        inputs=SimpleNamespace(prompt=["one", "two"], num_images_per_prompt=1), adapter=ToyAdapter
    )
    im = Image.new("RGB", (8, 8), "red")
    assert draw_picture(r, cfg, [im, im], [im, im], tmp_path / "a.png") == "image-grid"
    rows = [{"prompt": "one", "text": "x"}, {"prompt": "two", "text": "y"}]
    assert draw_picture(r, cfg, rows, rows, tmp_path / "b.png") == "text-samples"
    assert draw_picture(r, cfg, [1, 2], [1, 2], tmp_path / "c.png") == "bar-chart"
    for name in ("a", "b", "c"):
        with Image.open(tmp_path / f"{name}.png") as img:
            assert img.format == "PNG"
