"""benchmarks/feature_caches.py: its peer arms (other packages' caches applied by hand) on the zoo."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import decodekit
import numpy as np
import pytest
from decodekit.config import load_config
from decodekit.sweep import ArmUnavailable, pareto_bench

_spec = importlib.util.spec_from_file_location(
    "feature_caches", Path(__file__).parents[1] / "benchmarks" / "feature_caches.py"
)
fc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fc)


def small_config(model: str, steps: int = 6, prompts: int = 2, repeat: int = 1):
    args = fc.parse_args(["--model", model, "--repeat", str(repeat)])
    doc = fc.base_config(args, None)
    doc["inputs"]["prompt"] = doc["inputs"]["prompt"][:prompts]
    doc["inputs"]["num_inference_steps"] = steps
    doc["bench"]["warmup"] = 0
    return load_config(doc)


def images(config, pipe) -> np.ndarray:
    return np.stack([np.asarray(im) for im in config.adapter.generate(pipe, config.inputs)])


def peer(arms, label):
    return next(a for a in arms if a.label == label)


def by_hand(config, pipe, arm):
    undo = arm.apply(pipe)
    try:
        return images(config, pipe)
    finally:
        stats = undo()
        arm.last_stats = stats


def with_decodekit(config, pipe, arm):
    with decodekit.attach(pipe, arm.strategies):
        return images(config, pipe)


@pytest.fixture(scope="module")
def dit():
    config = small_config("shapes-dit", steps=28, prompts=1)  # 28: fewer never hit FBC 0.1
    return config, config.load_pipeline()


@pytest.fixture(scope="module")
def sd():
    config = small_config("shapes-sd")
    return config, config.load_pipeline()


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("first-block-cache 0.1", "diffusers FBC 0.1"),
        ("taylorseer-cache", "diffusers TaylorSeer"),
        ("pyramid-attention-broadcast", "diffusers PAB"),  # Flux's true CFG: both calls a step
    ],
)
def test_diffusers_by_hand_equals_decodekit_on_shapes_dit(dit, ours, theirs):
    config, pipe = dit
    base = images(config, pipe)
    mine = with_decodekit(config, pipe, peer(fc.decodekit_arms("shapes-dit"), ours))
    hand = by_hand(config, pipe, peer(fc.diffusers_peers("shapes-dit"), theirs))
    assert np.array_equal(mine, hand) and not np.array_equal(mine, base)
    assert np.array_equal(images(config, pipe), base)  # the undo left the pipeline as it was


def test_deepcache_package_and_diffusers_pab_by_hand_equal_decodekit_on_shapes_sd(sd):
    config, pipe = sd
    base = images(config, pipe)
    for ours, theirs in [
        ("deep-cache 3", "DeepCache 3"),
        ("pyramid-attention-broadcast", "diffusers PAB"),
    ]:
        mine = with_decodekit(config, pipe, peer(fc.decodekit_arms("shapes-sd"), ours))
        arm = peer(fc.peer_arms("shapes-sd", 6, False), theirs)
        assert np.array_equal(mine, by_hand(config, pipe, arm)), theirs
        assert not np.array_equal(mine, base)
    assert arm.last_stats is None  # diffusers by hand: no count of full calls
    deepcache = peer(fc.peer_arms("shapes-sd", 6, False), "DeepCache 3")
    by_hand(config, pipe, deepcache)
    assert deepcache.last_stats == {"nfe": 2}  # steps 0 and 3 of 6 in full
    assert np.array_equal(images(config, pipe), base)


def test_missing_packages_and_refused_pipelines_make_arms_unavailable(sd, monkeypatch):
    config, pipe = sd
    cache_dit = fc.cache_dit_arm(0.08, 0, 6, False)
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "DeepCache", None)
    with pytest.raises(ArmUnavailable, match=r"pip install 'decodekit\[peers\]'"):
        cache_dit.apply(pipe)
    with pytest.raises(ArmUnavailable, match="DeepCache is not installed"):
        fc.deepcache_arm(3, 6).apply(pipe)


def test_pareto_bench_of_peers_and_decodekit_on_shapes_dit(dit, tmp_path, monkeypatch):
    config, _ = dit
    monkeypatch.setitem(sys.modules, "cache_dit", None)
    arms = [
        peer(fc.decodekit_arms("shapes-dit"), "first-block-cache 0.1"),
        peer(fc.diffusers_peers("shapes-dit"), "diffusers FBC 0.1"),
        fc.cache_dit_arm(0.08, 0, 28, True),
    ]
    r = pareto_bench(config, arms, label="shapes-dit", markdown_path=tmp_path / "t.md")
    ours, theirs = r["points"]
    assert (ours["by"], theirs["by"]) == ("decodekit", "diffusers (by hand)")
    assert ours["fidelity"]["key"] == theirs["fidelity"]["key"] == "psnr"  # 1 image: no Fréchet
    assert ours["fidelity"]["value"] == theirs["fidelity"]["value"] < float("inf")
    assert r["unavailable"][0]["label"] == "cache-dit F1B0 0.08"
    assert r["baseline"]["repeatable"]
    assert fc.verdict(r).startswith(("decodekit points", "every"))


def test_cache_dit_dbcache_on_shapes_dit_and_refusal_on_a_unet(dit, sd):
    pytest.importorskip("cache_dit")
    config, pipe = dit
    base = images(config, pipe)
    forwards = {n for n, m in pipe.transformer.named_modules() if "forward" in m.__dict__}
    short = small_config("shapes-dit", steps=6)
    arm = fc.cache_dit_arm(0.3, 0, 6, separate_cfg=True)
    base6 = images(short, pipe)
    out = by_hand(short, pipe, arm)
    assert arm.last_stats["transformer_calls"] == 12  # 6 steps, cond and uncond
    # cache-dit computes its first max_warmup_steps (8) steps in full: 6 steps are all warm-up
    assert arm.last_stats["cached_calls"] == 0 and np.array_equal(out, base6)
    arm = fc.cache_dit_arm(0.3, 0, 28, separate_cfg=True)
    out = by_hand(config, pipe, arm)
    assert arm.last_stats["cached_calls"] > 0 and not np.array_equal(out, base)
    assert arm.last_stats["nfe"] == 56 - arm.last_stats["cached_calls"]
    assert np.array_equal(images(config, pipe), base)  # the pipeline is as it was
    # cache-dit ran on the arm's own copy of the transformer: diffusers' caches run after it
    assert {n for n, m in pipe.transformer.named_modules() if "forward" in m.__dict__} == forwards
    ours = peer(fc.decodekit_arms("shapes-dit"), "first-block-cache 0.1")
    hand = peer(fc.diffusers_peers("shapes-dit"), "diffusers FBC 0.1")
    assert np.array_equal(with_decodekit(config, pipe, ours), by_hand(config, pipe, hand))
    with pytest.raises(ArmUnavailable, match="cache-dit refuses this pipeline"):
        fc.cache_dit_arm(0.08, 0, 6, False).apply(sd[1])
