"""The `decodekit` command: each subcommand, overrides, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from decodekit.cli import main
from decodekit.demo import run_demo
from PIL import Image

from tests.tiny import ToyAdapter, toy_config


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_validate_prints_ok(toy, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    assert main(["validate", cfg]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok") and "halve" in out


def test_validate_checks_composition(toy, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy, strategies=["halve", "rival"]))
    assert main(["validate", cfg]) == 2
    line = one_error_line(capsys)
    assert (
        line.startswith("error: ")
        and "'halve'" in line
        and "'rival'" in line
        and "denoiser-cache" in line
    )


def test_run_saves_outputs_and_prints_stats(toy, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    out_dir = tmp_path / "out"
    assert main(["run", cfg]) == 0
    text = capsys.readouterr().out
    assert "model calls: 4" in text and "served by strategies: 4" in text and "hits=4" in text
    assert "FLOP-ideal speed-up: x2.00" in text
    rows = [json.loads(line) for line in (out_dir / "outputs.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and len(rows[0]["values"]) == 4


def test_run_with_set_overrides(toy, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    out_dir = tmp_path / "out"
    assert main(["run", cfg]) == 0
    first = (out_dir / "outputs.jsonl").read_text()
    args = ["run", cfg, "--set", "strategies.0.params.every=4", "--set", "inputs.seed=3"]
    assert main(args) == 2  # the folder holds the first run's outputs
    assert "--overwrite" in one_error_line(capsys)
    assert main([*args, "--overwrite"]) == 0
    assert "model calls: 2" in capsys.readouterr().out  # steps 0 and 4 of 8
    assert (out_dir / "outputs.jsonl").read_text() != first  # another seed, other outputs
    assert main(["run", cfg, "--set", "output.dir=" + str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "outputs.jsonl").exists()


def test_bench_writes_json_and_png(toy, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    j, p = tmp_path / "r" / "b.json", tmp_path / "r" / "b.png"
    assert main(["bench", cfg, "--repeat", "2", "--json", str(j), "--png", str(p)]) == 0
    out = capsys.readouterr().out
    assert "speed-up: x" in out and "model calls" in out
    r = json.loads(j.read_text())
    assert {"speedup", "nfe", "peak_memory", "quality"} <= set(r)
    assert r["nfe"]["baseline"] == 8 and r["nfe"]["strategy"] == 4 and r["repeat"] == 2
    with Image.open(p) as img:
        assert img.format == "PNG"


def test_bench_defaults_to_output_dir(toy, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    assert main(["bench", cfg, "--repeat", "1", "--set", "bench.warmup=0"]) == 0
    assert (tmp_path / "out" / "bench.json").exists() and (tmp_path / "out" / "bench.png").exists()
    assert main(["bench", cfg, "--repeat", "0"]) == 2
    assert one_error_line(capsys) == "error: --repeat: must be at least 1, got 0"


def test_plugins_json_lists_the_toy_plugin(toy, manager, capsys):
    manager.registry.failed["broken-plugin"] = "ImportError: no module named 'nothing'"
    assert main(["plugins", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    halve = next(s for s in info["strategies"] if s["name"] == "halve")
    assert halve["package"] == "(registered at run time)" and halve["plugin"] == "toy-plugin"
    assert halve["loops"] == ["continuous-denoising"] and halve["slot"] == "denoiser-cache"
    assert halve["requires"] == [] and halve["conflicts"] == []
    assert halve["params"] == [
        {
            "name": "every",
            "type": "int",
            "default": 2,
            "required": False,
            "description": "run the model on every `every`-th step, reuse it between",
        }
    ]
    assert halve["hooks"] == ["decodekit_denoiser_forward", "decodekit_denoiser_output"]
    assert halve["paper"].startswith("Toy")
    toy_pipe = next(p for p in info["pipelines"] if p["name"] == "toy")
    assert toy_pipe["loop"] == "continuous-denoising"
    assert toy_pipe["description"] == "a toy denoising loop for tests"
    assert {f["name"] for f in toy_pipe["inputs"]} == {"seed", "prompt", "steps"}
    assert {m["name"] for m in info["metrics"]} >= {"toy-signs", "never"}
    assert {"name": "broken-plugin", "error": "ImportError: no module named 'nothing'"} in info[
        "failed"
    ]


def test_plugins_text(toy, manager, capsys):
    manager.registry.failed["broken-plugin"] = "ImportError: boom"
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "halve  [(registered at run time) ]" in out
    assert "every: int = 2  run the model" in out
    assert "hooks: decodekit_denoiser_forward, decodekit_denoiser_output" in out
    assert "toy  [" in out and "loop: continuous-denoising" in out
    assert "broken-plugin: ImportError: boom" in out


@pytest.mark.parametrize(
    "text_or_cfg, expected",
    [
        ("pipeline: {type: toy\n", "error: "),  # bad YAML syntax: no key path, the file:line:column
        (
            {"strategies": [{"name": "halfe"}]},
            "error: strategies.0.name: unknown strategy 'halfe'. Did you mean 'halve'?",
        ),
        (
            {"inputs": {"stepz": 3}},
            "error: inputs.stepz: unknown key in inputs of the 'toy' pipeline. Did you mean 'steps'?",
        ),
        ({"bench": {"repeat": "three"}}, "error: bench.repeat: Input should be a valid integer"),
        (
            {"pipeline": {"type": "toy", "model": "./gone"}},
            "error: pipeline.model: model folder './gone' does not exist",
        ),
        ({"pipline": {}}, "error: pipline: unknown top-level key. Did you mean 'pipeline'?"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run", "bench"])
def test_errors_are_one_line_with_exit_status_2(
    toy, tmp_path, capsys, command, text_or_cfg, expected
):
    path = tmp_path / "c.yaml"
    if isinstance(text_or_cfg, str):
        path.write_text(text_or_cfg)
    else:
        write_config(path, toy_config(toy, **text_or_cfg))
    assert main([command, str(path)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(expected)
    if isinstance(text_or_cfg, str):
        assert "c.yaml:2:1: invalid YAML" in line


def test_bad_override_is_a_one_line_error(toy, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    assert main(["validate", cfg, "--set", "strategies.5.name=halve"]) == 2
    assert one_error_line(capsys).startswith(
        "error: strategies.5: --set strategies.5.name: index 5 is out of range"
    )


def test_debug_env_shows_the_traceback(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DECODEKIT_DEBUG", "1")
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy, strategies=["halfe"]))
    assert main(["validate", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith(
        "error: strategies.0.name:"
    )


def test_console_script_error_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  type: [\n")
    env = {**os.environ, "DECODEKIT_LOAD_PLUGINS": ""}
    env.pop("DECODEKIT_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "decodekit.cli", "validate", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.count("\n") == 1
        and proc.stderr.startswith("error: ")
        and "bad.yaml:3:1" in proc.stderr
    )


def test_zoo_list(manager, monkeypatch, capsys):
    from decodekit.pipelines import zoo

    models = [
        {"name": "shapes-sd", "pipeline": "stable-diffusion", "description": "coloured shapes"},
        {"name": "arith-ar", "pipeline": "causal-lm", "description": "arithmetic\ntext"},
    ]
    monkeypatch.setattr(zoo, "list_models", lambda: models, raising=False)
    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "pipeline", "description"]
    assert lines[1].split()[:2] == ["shapes-sd", "stable-diffusion"] and lines[2].endswith(
        "arithmetic text"
    )


def test_demo_writes_png_per_config_and_a_markdown_table(toy, manager, tmp_path):
    configs = {
        "toy-halve": toy_config(toy),
        "toy-quarter": toy_config(toy, strategies=[{"name": "halve", "params": {"every": 4}}]),
    }
    results = run_demo(tmp_path / "demo", configs=configs, repeat=1, manager=manager)
    assert results["toy-quarter"]["nfe"] == {"baseline": 8, "strategy": 2, "ratio": 4.0}
    for name in configs:
        with Image.open(tmp_path / "demo" / f"{name}.png") as img:
            assert img.format == "PNG"
        assert json.loads((tmp_path / "demo" / f"{name}.json").read_text())["nfe"]["strategy"] in (
            2,
            4,
        )
    table = (tmp_path / "demo" / "README.md").read_text()
    assert "| toy-halve | halve |" in table and "| 8 → 4 |" in table and "| 8 → 2 |" in table
    assert "max_abs_diff=" in table and "sign_agreement=" in table


def test_bench_overhead_flag_adds_the_overhead_figures(toy, tmp_path, capsys, monkeypatch):
    import decodekit.overhead

    seen = []

    def fake_measure(target):
        seen.append(target)
        return {"dispatch_s_per_call": 1e-6, "attach_detach_s": 2e-4}

    monkeypatch.setattr(decodekit.overhead, "measure_overhead", fake_measure)
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    assert main(["bench", cfg, "--repeat", "1", "--overhead"]) == 0
    assert "decodekit overhead: dispatch_s_per_call=1e-06" in capsys.readouterr().out
    assert type(seen[0]).__name__ == "ToyPipe"
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["overhead"]["attach_detach_s"] == 2e-4


def test_a_folder_the_adapter_cannot_read_is_a_one_line_error(toy, tmp_path, capsys, monkeypatch):
    def broken_load(source, *, device, dtype, options):
        raise OSError(f"Error no file named model_index.json found in directory {source}.")

    monkeypatch.setattr(ToyAdapter, "load", staticmethod(broken_load))
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    assert main(["run", cfg]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: pipeline.model: the 'toy' adapter could not load")
    assert "OSError: Error no file named model_index.json" in line


def test_demo_errors_name_the_demo_config(toy, manager, tmp_path):
    from decodekit.errors import ConfigError

    configs = {"good": toy_config(toy), "typo": toy_config(toy, strategies=["halfe"])}
    with pytest.raises(ConfigError) as ei:
        run_demo(tmp_path / "demo", configs=configs, repeat=1, manager=manager)
    assert ei.value.path == "strategies.0.name" and "(demo config 'typo')" in ei.value.message
    assert "Did you mean 'halve'" in ei.value.message
    assert not (tmp_path / "demo").exists()  # every config is checked before anything runs


def test_ngram_subcommand_is_wired(tmp_path, capsys):
    from decodekit.cli import main

    with pytest.raises(SystemExit) as e:
        main(
            [
                "ngram",
                "build",
                str(tmp_path / "missing.txt"),
                "--tokenizer",
                "x",
                "--out",
                str(tmp_path),
            ]
        )
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def _run_shapes_sd(tmp_path: Path, *extra: str, first: tuple = ()) -> subprocess.CompletedProcess:
    cfg = {
        "pipeline": {"type": "stable-diffusion", "model": "zoo:shapes-sd", "device": "cpu"},
        "inputs": {"prompt": ["a small red circle on the left"], "num_inference_steps": 2},
        "output": {"dir": str(tmp_path / "out")},
    }
    env = {**os.environ, "DECODEKIT_LOAD_PLUGINS": ""}
    for name in ("DECODEKIT_DEBUG", "DECODEKIT_VERBOSE", "OMP_NUM_THREADS"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "decodekit.cli", *first, "run"]
        + [write_config(tmp_path / "c.yaml", cfg), "--overwrite", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_run_keeps_library_chatter_out_unless_verbose(tmp_path):
    """No torch_dtype deprecation, accelerate advice or loading bars; --verbose lets them through."""
    proc = _run_shapes_sd(tmp_path, "--threads=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert not [line for line in lines if "torch_dtype" in line or "accelerate" in line], lines
    assert "Loading pipeline components" not in proc.stderr
    assert "(3 torch threads)" in proc.stdout
    assert json.loads((tmp_path / "out" / "run.json").read_text())["torch_threads"] == 3
    proc = _run_shapes_sd(tmp_path, first=("--verbose",))
    assert proc.returncode == 0, proc.stderr
    assert "Loading pipeline components" in proc.stderr  # diffusers' own loading bar
    assert "torch_dtype" not in proc.stderr  # decodekit loads through the current API
    assert "(1 torch thread)" in proc.stdout  # the CPU default


def test_threads_flag_and_config_key(toy, tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    doc = toy_config(toy)
    out = Path(doc["output"]["dir"])
    cfg = write_config(tmp_path / "c.yaml", doc)
    assert main(["run", cfg, "--threads", "0"]) == 2
    assert one_error_line(capsys) == "error: --threads: must be at least 1, got 0"
    assert main(["run", cfg, "--set", "pipeline.threads=2"]) == 0
    assert "(2 torch threads)" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["torch_threads"] == 2
    assert main(["run", cfg, "--overwrite", "--set", "pipeline.threads=2", "--threads", "1"]) == 0
    assert "(1 torch thread)" in capsys.readouterr().out  # the flag wins over the config
    assert torch.get_num_threads() == before  # restored after the command
    assert main(["bench", cfg, "--repeat", "1", "--threads", "1"]) == 0
    assert "torch threads: 1" in capsys.readouterr().out
    assert json.loads((out / "bench.json").read_text())["machine"]["torch_threads"] == 1


# -- small things: --version, zoo path, schema, a closed pipe -----------------------------------
def test_version(capsys):
    import decodekit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"decodekit {decodekit.__version__}"


def test_zoo_path_prints_the_folder(capsys):
    from decodekit.pipelines import zoo

    assert main(["zoo", "path", "shapes-sd"]) == 0
    out = capsys.readouterr().out.strip()
    assert Path(out) == Path(zoo.zoo_path("shapes-sd")) and Path(out).is_dir()


def test_zoo_path_unknown_name_suggests(capsys):
    assert main(["zoo", "path", "shapes-s"]) == 2
    err = one_error_line(capsys)
    assert "unknown zoo model 'shapes-s'" in err and "shapes-sd" in err


def test_schema_prints_the_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["required"] == ["pipeline"]
    assert "params_faster_diffusion" in schema["$defs"] and "inputs_causal_lm" in schema["$defs"]


def test_plugins_json_into_a_closed_pipe_is_quiet():
    """`decodekit plugins --json | head -1`: the reader leaves early, no BrokenPipe traceback."""
    env = {**os.environ}
    env.pop("DECODEKIT_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "decodekit.cli", "plugins", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    proc.stdout.close()  # closed before the command writes: its write meets a broken pipe
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    proc.stderr.close()
    assert err == ""
    assert proc.returncode == 1

    shell = subprocess.run(
        f"{sys.executable} -m decodekit.cli plugins --json | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert shell.stdout == "{\n" and shell.stderr == ""
