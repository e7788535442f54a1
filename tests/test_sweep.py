"""bench --sweep: sweep points, one baseline per pair, per-point ratios, fidelity and the Pareto front."""

from __future__ import annotations

import json

import pytest
from decodekit.cli import main
from decodekit.config import load_config
from decodekit.errors import ConfigError
from decodekit.sweep import (
    Arm,
    ArmUnavailable,
    fidelity,
    mark_dominated,
    pareto_bench,
    pareto_chart,
    parse_sweep,
    sweep_bench,
    sweep_points,
    sweep_table,
)
from PIL import Image

from tests.tiny import ScriptedClock, toy_config


def test_sweep_points_are_every_combination_of_yaml_values():
    assert parse_sweep("strategies.0.params.every=2,4") == ("strategies.0.params.every", [2, 4])
    points = sweep_points(["strategies.0.params.a=x,y", "strategies.1.params.b=0.5,true"])
    assert points == [
        {"strategies.0.params.a": "x", "strategies.1.params.b": 0.5},
        {"strategies.0.params.a": "x", "strategies.1.params.b": True},
        {"strategies.0.params.a": "y", "strategies.1.params.b": 0.5},
        {"strategies.0.params.a": "y", "strategies.1.params.b": True},
    ]
    for bad, words in [
        ("inputs.steps=1,2", "only strategy paths"),
        ("strategies.0.params.every", "KEY=V1,V2"),
        ("strategies.0.params.every=", "KEY=V1,V2"),
    ]:
        with pytest.raises(ConfigError) as ei:
            parse_sweep(bad)
        assert ei.value.path == "--sweep" and words in ei.value.message
    with pytest.raises(ConfigError, match="swept twice"):
        sweep_points(["strategies.0.params.a=1", "strategies.0.params.a=2"])


def test_fidelity_prefers_the_judge_then_psnr_then_token_agreement():
    q = {"adapter": {"psnr": 30.0}, "shapes-judge": {"judge_frechet_to_baseline": 2.5}}
    assert fidelity(q) == {
        "key": "judge_frechet_to_baseline",
        "name": "judge Fréchet to the baseline",
        "value": 2.5,
        "higher_is_better": False,
    }
    assert fidelity({"adapter": {"psnr": 30.0, "identical": 0.0}})["key"] == "psnr"
    assert fidelity({"adapter": {"token_agreement": 0.9}})["higher_is_better"] is True
    assert fidelity({"adapter": {"max_abs_diff": 0.1}}) is None


def _point(speedup, value, higher=True):
    return {"speedup": speedup, "fidelity": {"value": value, "higher_is_better": higher}}


def test_dominated_points_are_slower_and_no_more_faithful():
    points = [_point(2.0, 30.0), _point(1.5, 35.0), _point(1.4, 34.0), _point(2.0, 30.0)]
    mark_dominated(points)
    assert [p["dominated"] for p in points] == [False, False, True, False]  # ties dominate nothing
    # lower is better (a distance): the faster point with the smaller distance dominates
    points = [_point(2.0, 1.0, False), _point(1.5, 3.0, False), _point(1.0, 0.5, False)]
    mark_dominated(points)
    assert [p["dominated"] for p in points] == [False, True, False]
    inf = [_point(1.2, float("inf")), _point(1.1, 40.0)]  # identical outputs: PSNR inf
    mark_dominated(inf)
    assert [p["dominated"] for p in inf] == [False, True]


def test_sweep_runs_one_baseline_per_pair_and_every_point(toy, manager, tmp_path, capsys):
    cfg = load_config(toy_config(toy, bench={"repeat": 2, "warmup": 0}), manager=manager)
    # pair 1 in order baseline, point 1, point 2; pair 2 rotated: point 1, point 2, baseline
    clock = ScriptedClock([6.0, 3.0, 2.0, 4.0, 1.0, 8.0])
    r = sweep_bench(
        cfg,
        ["strategies.0.params.every=2,4"],
        manager=manager,
        clock=clock,
        json_path=tmp_path / "s.json",
        png_path=tmp_path / "s.png",
        markdown_path=tmp_path / "s.md",
        label="toy.yaml",
        progress=True,
    )
    shown = [f.split("  ")[0] for f in capsys.readouterr().err.split("\r") if f.strip()]
    assert shown[0] == "toy.yaml · baseline · pair 1/2" and "toy.yaml · every=4 · pair 2/2" in shown
    assert r["baseline"]["time_s"]["all"] == [6.0, 8.0] and r["baseline"]["nfe"] == 8
    first, second = r["points"]
    assert first["params"] == {"strategies.0.params.every": 2} and first["label"] == "every=2"
    assert first["strategies"] == [{"name": "halve", "params": {"every": 2}}]
    assert first["pair_ratios"] == [2.0, 2.0] and second["pair_ratios"] == [3.0, 8.0]
    assert second["speedup"] == 5.5 and second["speedup_spread"]["low"] == 3.0
    assert (first["nfe"], second["nfe"]) == (4, 2)  # halve every 2 / every 4 of 8 steps
    assert first["fidelity"] is None  # the toy has no fidelity figure: compared on speed alone
    assert first["dominated"] and not second["dominated"]
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["points"][1]["pair_ratios"] == [3.0, 8.0] and saved["picture"]["kind"] == "pareto"
    rows = (tmp_path / "s.md").read_text().splitlines()
    assert rows[4].startswith("| every=2 | ×2 |") and rows[4].endswith("| – | dominated |")
    assert rows[5].startswith("| every=4 | ×5.5 |") and rows[5].endswith("| **front** |")
    with Image.open(tmp_path / "s.png") as img:
        assert img.format == "PNG"


def test_bench_sweep_on_a_zoo_config_draws_token_agreement(tmp_path, capsys):
    config = {
        "pipeline": {"type": "masked-diffusion-lm", "model": "zoo:arith-mdlm", "device": "cpu"},
        "strategies": [{"name": "parallel-threshold", "params": {"threshold": 0.9}}],
        "inputs": {"prompt": ["86-7=", "8+5="], "gen_length": 8, "block_length": 8, "steps": 8},
        "output": {"dir": str(tmp_path / "out")},
        "bench": {"repeat": 1, "warmup": 0},
    }
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    sweep = "strategies.0.params.threshold=0.5,1.0"
    assert main(["bench", str(path), "--sweep", sweep]) == 0
    out = capsys.readouterr().out
    assert "| threshold=0.5 |" in out and "| threshold=1.0 |" in out
    r = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [p["fidelity"]["key"] for p in r["points"]] == ["token_agreement"] * 2
    loose, strict = r["points"]
    # threshold 1.0 commits one token per step, as the baseline: the same tokens, 8 calls
    assert strict["nfe"] == r["baseline"]["nfe"] == 8 and strict["fidelity"]["value"] == 1.0
    assert loose["nfe"] < 8
    assert (tmp_path / "out" / "sweep.md").exists() and (tmp_path / "out" / "sweep.png").exists()
    assert main(["bench", str(path), "--sweep", sweep, "--overhead"]) == 2
    assert "--overhead" in capsys.readouterr().err


def test_pareto_chart_draws_identical_outputs_and_skips_points_without_fidelity(tmp_path):
    def point(label, speedup, value):
        spread = {"low": speedup * 0.9, "high": speedup * 1.1}
        fid = None if value is None else {"name": "PSNR", "value": value, "higher_is_better": True}
        return {"label": label, "speedup": speedup, "speedup_spread": spread, "fidelity": fid}

    points = [point("a=1", 1.5, 30.0), point("a=2", 1.2, float("inf")), point("a=3", 2.0, None)]
    mark_dominated(points)
    result = {
        "points": points,
        "label": "x.yaml",
        "sweeps": ["strategies.0.params.a=1,2,3"],
        "repeat": 3,
        "machine": {"device": "cpu", "torch_threads": 1},
    }
    pareto_chart(result, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as img:
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (40, 110, 200) in colours  # front points are drawn filled


def _scale_arm(factor: float, log: list[str], restore: bool = True):
    """An external arm that rescales the toy's denoiser output; its undo reports 3 full calls."""

    def apply(pipe):
        old = pipe.scale
        pipe.scale = factor
        log.append("apply")

        def undo():
            log.append("undo")
            if restore:
                pipe.scale = old
            return {"nfe": 3}

        return undo

    return apply


def _refused(pipe):
    raise ArmUnavailable("peer-pkg is not installed (pip install peer-pkg)")


def test_external_arms_run_beside_decodekit_points_and_are_undone_after_each_run(
    toy, manager, tmp_path
):
    cfg = load_config(toy_config(toy, bench={"repeat": 2, "warmup": 1}), manager=manager)
    log: list[str] = []
    arms = [
        Arm("halve 2", [{"name": "halve", "params": {"every": 2}}]),
        Arm("peer x0.5", apply=_scale_arm(0.5, log), by="peer-pkg"),
        Arm("peer refused", apply=_refused, by="peer-pkg"),
    ]
    r = pareto_bench(cfg, arms, manager=manager, what="caches", markdown_path=tmp_path / "t.md")
    # a probe (apply + undo at once), then one warm-up and two measured runs, each undone
    assert log == ["apply", "undo"] * 4
    assert [p["label"] for p in r["points"]] == ["halve 2", "peer x0.5"]
    dk, peer = r["points"]
    assert (dk["by"], dk["nfe"], peer["by"], peer["nfe"]) == ("decodekit", 4, "peer-pkg", 3)
    assert peer["quality"]["adapter"]["max_abs_diff"] > 0  # the peer's change reached the outputs
    assert r["unavailable"] == [
        {
            "label": "peer refused",
            "by": "peer-pkg",
            "reason": "peer-pkg is not installed (pip install peer-pkg)",
        }
    ]
    assert r["baseline"]["repeatable"] and len(r["baseline"]["time_s"]["all"]) == 2
    table = (tmp_path / "t.md").read_text()
    assert table.startswith("Caches on `")
    # whether the peer lies on the front depends on two timings; the row must say what the result says
    mark = "dominated" if peer["dominated"] else "**front**"
    assert table.splitlines()[5].startswith("| peer x0.5 |")
    assert table.splitlines()[5].endswith(f"| 3 | – | {mark} | peer-pkg |")
    assert "Not run: peer refused (peer-pkg): peer-pkg is not installed" in table


def test_an_external_arm_that_leaves_the_pipeline_changed_is_caught(toy, manager):
    cfg = load_config(toy_config(toy, bench={"repeat": 2, "warmup": 0}), manager=manager)
    leaky = Arm("leaky", apply=_scale_arm(0.5, [], restore=False), by="peer-pkg")
    r = pareto_bench(cfg, [leaky], manager=manager)
    assert r["baseline"]["repeatable"] is False
    assert "left the pipeline changed" in sweep_table(r)
    with pytest.raises(ValueError, match="its own label"):
        pareto_bench(cfg, [Arm("a"), Arm("a")], manager=manager)
