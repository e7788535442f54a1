"""The example plugin package examples/decodekit-cfg-cutoff, installed, is found and used like a built-in.

Install it with ``pip install -e examples/decodekit-cfg-cutoff --no-deps``; the
tests here skip (saying so) when it is not installed. Its own tests live in
examples/decodekit-cfg-cutoff/tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata

import decodekit
import pytest
import torch
from decodekit.testing import tiny_sd_pipeline

DIST = "decodekit-cfg-cutoff"

try:
    metadata.distribution(DIST)
    INSTALLED = True
except metadata.PackageNotFoundError:
    INSTALLED = False

pytestmark = pytest.mark.skipif(
    not INSTALLED,
    reason=f"{DIST} is not installed; run: pip install -e examples/decodekit-cfg-cutoff --no-deps",
)


def test_entry_point_declared():
    eps = [ep for ep in metadata.distribution(DIST).entry_points if ep.group == "decodekit"]
    assert [(ep.name, ep.value) for ep in eps] == [("cfg-cutoff", "decodekit_cfg_cutoff")]


def test_plugins_command_lists_it():
    proc = subprocess.run(
        [sys.executable, "-m", "decodekit.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DECODEKIT_LOAD_PLUGINS": "cfg-cutoff"},
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    row = next((s for s in info["strategies"] if s["name"] == "cfg-cutoff"), None)
    assert row is not None, (
        f"cfg-cutoff missing from `decodekit plugins --json`: {[s['name'] for s in info['strategies']]}"
    )
    assert row["package"] == DIST
    assert row["loops"] == ["continuous-denoising"]
    assert [p["name"] for p in row["params"]] == ["fraction"]
    assert row["params"][0]["default"] == 0.5
    assert "decodekit_step_end" in row["hooks"]
    assert not [f for f in info["failed"] if f["name"] == "cfg-cutoff"]


def test_allow_list_can_leave_it_out(manager, monkeypatch):
    import decodekit.manager as manager_mod

    monkeypatch.setenv("DECODEKIT_LOAD_PLUGINS", "")
    manager_mod.reset_manager()
    assert "cfg-cutoff" not in manager_mod.get_manager().registry.strategies
    assert "prior-noise" in manager_mod.get_manager().registry.strategies  # built-ins always load


def test_python_api_run_cuts_guidance(manager):
    pipe = tiny_sd_pipeline()
    steps = 4
    seen: list[int] = []  # batch size of every UNet call
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        with decodekit.attach(
            pipe, [{"name": "cfg-cutoff", "params": {"fraction": 0.5}}, "prior-noise"]
        ) as run:
            pipe(
                "a red circle",
                num_inference_steps=steps,
                guidance_scale=7.5,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            )
    finally:
        handle.remove()
    stats = run.stats["strategies"]["cfg-cutoff"]
    assert (stats["steps_with_cfg"], stats["steps_without_cfg"], stats["cutoff_step"]) == (2, 2, 1)
    assert seen == [
        2,
        2,
        1,
        1,
    ]  # CFG doubles the batch of one prompt, then the conditional half alone
    assert run.stats["nfe"] == steps
    assert run.ideal_speedup() == pytest.approx(8 / 6)
    assert pipe.guidance_scale == 7.5  # the scale it set to 0 mid-call is put back


def test_yaml_run_uses_it(tmp_path):
    """`decodekit run` on the example's YAML finds the plugin through its entry point and cuts guidance."""
    config = os.path.join(
        os.path.dirname(__file__), "..", "examples", "decodekit-cfg-cutoff", "shapes.yaml"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "decodekit.cli",
            "run",
            config,
            "--set",
            "inputs.num_inference_steps=5",
            "--set",
            f"output.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DECODEKIT_LOAD_PLUGINS": "cfg-cutoff"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "strategies: cfg-cutoff" in proc.stdout
    assert "steps_with_cfg=3, steps_without_cfg=2" in proc.stdout  # fraction 0.6 of 5 steps
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000-a-small-red-circle-on-the-left.png",
        "001-a-large-blue-square-on-the-right.png",
        "run.json",
    ]
