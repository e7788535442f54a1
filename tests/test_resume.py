"""Runs that resume (issue 20): a killed `decodekit run` rerun loses nothing and duplicates nothing.

Outputs are saved batch by batch; a rerun of the same command skips the
prompts whose outputs are in the folder and says so; a rerun with another
config is refused (run.json records the config's fingerprint from the start);
shared files (``outputs.jsonl``) are joined from the saved batches in prompt
order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from decodekit.cli import main
from decodekit.outputs import PARTS, TEMP_MARK, prepare_output_dir, write_run_record
from decodekit.seeds import earlier_copies, row_seeds

SHAPES = [
    "a small red circle on the left",
    "a large green square on the right",
    "a small red circle on the left",  # a repeated prompt: its second copy has its own seed
    "a large blue triangle in the middle",
]


def shapes_config(tmp_path: Path, out: str, prompts: list[str] = SHAPES) -> str:
    cfg = {
        "pipeline": {"type": "stable-diffusion", "model": "zoo:shapes-sd", "device": "cpu"},
        "inputs": {"prompt": prompts, "num_inference_steps": 2, "guidance_scale": 3.0},
        "output": {"dir": str(tmp_path / out)},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file but run.json, by path in the folder (hidden ones included: none may be left)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "run.json")
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def interrupt_call(monkeypatch, adapter: type, n: int) -> None:
    """The ``n``-th call of ``adapter.generate`` raises KeyboardInterrupt (Ctrl-C mid-run)."""
    real = adapter.generate.__func__
    calls = []

    def generate(cls, target, inputs, progress=False):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(cls, target, inputs, progress)

    monkeypatch.setattr(adapter, "generate", classmethod(generate))


def test_a_slice_of_a_prompt_list_is_seeded_as_in_the_whole_list():
    whole = row_seeds(7, SHAPES, per_prompt=2)
    for first in range(len(SHAPES)):
        with earlier_copies(SHAPES[:first]):
            assert row_seeds(7, SHAPES[first:], per_prompt=2) == whole[2 * first :]
    assert row_seeds(7, SHAPES[2:3]) != whole[4:5:2]  # outside the block: the first copy's seed


def test_a_killed_run_rerun_equals_an_uninterrupted_one_byte_for_byte(tmp_path, manager, capsys):
    """SIGKILL after the first image is in place; the rerun generates the rest, says so, and the
    folder then holds exactly what a run never interrupted writes (with the same batches: the
    batch shape can change the last bits of a float sum, so of a pixel)."""
    killed = shapes_config(tmp_path, "killed")
    env = {
        **os.environ,
        "DECODEKIT_TEST_SLOW_SAVE": "1.0",  # each image's write takes a second (tests only)
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "decodekit.cli", "run", killed, "--batch-size", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    out = tmp_path / "killed"
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.png")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.3)  # inside the second prompt's batch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    first = sorted(p.name for p in out.glob("*.png"))
    assert 1 <= len(first) < len(SHAPES)
    assert record(out)["status"] == "running"  # killed: no last record

    assert main(["run", killed, "--batch-size", "1", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert f"resuming: {len(first)} of {len(SHAPES)} outputs exist, generating the rest" in err
    assert (
        main(["run", shapes_config(tmp_path, "whole"), "--batch-size", "1", "--threads", "1"]) == 0
    )
    whole = tmp_path / "whole"
    assert folder_bytes(out) == folder_bytes(whole)
    assert not [p for p in out.iterdir() if TEMP_MARK in p.name]
    rec, ref = record(out), record(whole)
    assert rec["status"] == "complete" and rec["files"] == ref["files"]
    assert rec["outputs"] == ref["outputs"] and len(rec["outputs"]) == len(SHAPES)
    assert rec["resumed"] == {
        "outputs_existing": len(first),
        "outputs_generated": len(SHAPES) - len(first),
        "outputs_total": len(SHAPES),
    }
    assert rec["stats"]["calls"] == len(SHAPES) - len(first)  # one call per prompt left

    # the same command once more: nothing to do, nothing touched
    before = (out / "run.json").read_bytes()
    assert main(["run", killed, "--threads", "1"]) == 0
    assert "nothing to do: all 4 outputs" in capsys.readouterr().err
    assert (out / "run.json").read_bytes() == before


def test_another_config_in_a_started_folder_is_refused(toy, tmp_path, capsys):
    """A run stopped after its first batch; a rerun with another seed would mix two runs: refused."""
    from tests.tiny import ToyAdapter, toy_config

    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(toy_config(toy)))
    cfg, out = str(path), toy.parent / "out"
    with pytest.MonkeyPatch.context() as m:
        interrupt_call(m, ToyAdapter, 2)
        assert main(["run", cfg, "--batch-size", "1"]) == 130
    rec = record(out)
    assert rec["status"] == "interrupted" and rec["files"] == []
    assert sorted(p.name for p in (out / PARTS).iterdir()) == ["000000-000001"]
    before = folder_bytes(out)

    assert main(["run", cfg, "--set", "inputs.seed=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: output.dir:") and "another config" in err
    assert "inputs.seed" in err and "--overwrite" in err
    assert folder_bytes(out) == before and (out / PARTS / "000000-000001").is_dir()

    # --overwrite clears the started run (its saved batches too) and starts again
    assert main(["run", cfg, "--set", "inputs.seed=1", "--overwrite"]) == 0
    rec = record(out)
    assert rec["status"] == "complete" and rec["seed"] == 1 and rec["files"] == ["outputs.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == ["outputs.jsonl", "run.json"]


def test_overwrite_removes_what_a_killed_run_planned_and_its_batches(tmp_path):
    for name in ("000-a.png", "001-b.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / PARTS / "000000-000001").mkdir(parents=True)
    write_run_record(
        tmp_path, {"status": "running", "files": [], "planned": ["000-a.png", "001-b.png"]}
    )
    prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_text_batches_are_joined_in_prompt_order_after_a_resume(tmp_path, manager, capsys):
    """causal-lm writes one outputs.jsonl: batches wait in .decodekit-parts until all are done."""
    from decodekit.pipelines.causal_lm import CausalLMAdapter

    prompts = ["86-7=", "8+5=", "86-7=", "12+30="]

    def config(out: str) -> str:
        cfg = {
            "pipeline": {"type": "causal-lm", "model": "zoo:arith-ar", "device": "cpu"},
            "inputs": {"prompt": prompts, "max_new_tokens": 4, "do_sample": True},
            "output": {"dir": str(tmp_path / out)},
        }
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    assert main(["run", config("whole"), "--threads", "1"]) == 0
    cfg = config("parts")
    out = tmp_path / "parts"
    with pytest.MonkeyPatch.context() as m:
        interrupt_call(m, CausalLMAdapter, 3)
        assert main(["run", cfg, "--batch-size", "1", "--threads", "1"]) == 130
    assert sorted(p.name for p in (out / PARTS).iterdir()) == ["000000-000001", "000001-000002"]
    assert not (out / "outputs.jsonl").exists() and record(out)["files"] == []

    capsys.readouterr()
    assert main(["run", cfg, "--batch-size", "2", "--threads", "1"]) == 0
    assert "resuming: 2 of 4 outputs exist" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["outputs.jsonl", "run.json"]
    assert (out / "outputs.jsonl").read_bytes() == (
        tmp_path / "whole" / "outputs.jsonl"
    ).read_bytes()
    rec = record(out)
    assert rec["outputs"] == record(tmp_path / "whole")["outputs"]
    assert [r["line"] for r in rec["outputs"]] == [0, 1, 2, 3]
    assert rec["resumed"] == {"outputs_existing": 2, "outputs_generated": 2, "outputs_total": 4}
