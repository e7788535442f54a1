"""Outputs are never lost, half-written or mixed with another run's (issue 22).

The output folder is checked before the model loads, every file is written
through a temporary file renamed into place, a non-empty folder needs
``--overwrite`` (which removes only what the previous run recorded), and
``run.json`` records the run. A SIGINT while images are being saved leaves
only complete PNGs and no temporary file.
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
from decodekit.errors import ConfigError
from decodekit.outputs import (
    TEMP_MARK,
    atomic_save_image,
    atomic_write_text,
    image_names,
    prepare_output_dir,
    slug,
    write_run_record,
)
from decodekit.seeds import row_seeds
from PIL import Image

from tests.tiny import ToyAdapter, toy_config


def write_config(path: Path, cfg: dict) -> str:
    cfg["pipeline"].pop("options", None)  # outputs do not depend on the model's options
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


# -- the output folder --------------------------------------------------------------------


def test_prepare_creates_the_folder_and_leaves_it_empty(tmp_path):
    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe is gone


def test_prepare_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "000.png").write_bytes(b"old")
    with pytest.raises(ConfigError) as e:
        prepare_output_dir(tmp_path)
    assert e.value.path == "output.dir" and "000.png" in e.value.message
    assert "--overwrite" in e.value.message
    assert (tmp_path / "000.png").read_bytes() == b"old"


def test_prepare_refuses_a_file_and_an_uncreatable_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_output_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match="cannot create"):
        prepare_output_dir(tmp_path / "f" / "sub")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_prepare_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot write"):
            prepare_output_dir(ro)
    finally:
        ro.chmod(0o700)


def test_overwrite_removes_only_what_the_previous_run_recorded(tmp_path):
    for name in ("000.png", "001.png", "notes.txt", f".x{TEMP_MARK}abc"):
        (tmp_path / name).write_bytes(b"old")
    write_run_record(tmp_path, {"files": ["000.png", "001.png", "../escape.txt"]})
    (tmp_path.parent / "escape.txt").write_text("outside")
    prepare_output_dir(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the user's file stays
    assert (tmp_path.parent / "escape.txt").exists()  # a record never reaches outside the folder


def test_overwrite_refuses_an_unreadable_record(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ConfigError, match="run.json"):
        prepare_output_dir(tmp_path, overwrite=True)


# -- atomic files -------------------------------------------------------------------------


def test_atomic_write_replaces_whole_files(tmp_path):
    p = atomic_write_text(tmp_path / "t.txt", "new")
    assert p.read_text() == "new" and os.listdir(tmp_path) == ["t.txt"]


def test_a_failed_image_save_keeps_the_old_file_and_no_temp_file(tmp_path):
    p = tmp_path / "000.png"
    Image.new("RGB", (4, 4), "red").save(p)
    before = p.read_bytes()

    class Broken:
        def save(self, f, format):
            f.write(b"\x89PNG half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save_image(Broken(), p)
    assert p.read_bytes() == before and os.listdir(tmp_path) == ["000.png"]
    atomic_save_image(Image.new("RGB", (4, 4), "blue"), p)
    with Image.open(p) as img:
        img.load()
        assert img.getpixel((0, 0)) == (0, 0, 255)


# -- decodekit run ------------------------------------------------------------------------


def test_run_checks_the_folder_before_loading_the_model(toy, tmp_path, monkeypatch, capsys):
    loaded = []
    real_load = ToyAdapter.load.__func__
    monkeypatch.setattr(
        ToyAdapter,
        "load",
        classmethod(lambda cls, *a, **k: loaded.append(1) or real_load(cls, *a, **k)),
    )
    (tmp_path / "file").write_text("x")
    cfg = write_config(
        tmp_path / "c.yaml", toy_config(toy, output={"dir": str(tmp_path / "file" / "out")})
    )
    assert main(["run", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output.dir: cannot create") and "\n" not in err
    assert loaded == []


def test_run_writes_run_json_beside_the_outputs(toy, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    assert main(["run", cfg]) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["outputs.jsonl", "run.json"]
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and rec["files"] == ["outputs.jsonl"]
    assert rec["seed"] == 0 and rec["config"]["strategies"] == [
        {"name": "halve", "params": {"every": 2}}
    ]
    assert rec["stats"]["nfe"] == 4 and rec["versions"]["torch"]
    assert {"load_s", "generate_s", "save_s"} <= set(rec["timings_s"])


def test_a_failed_run_leaves_no_folder_behind(toy, tmp_path, monkeypatch, capsys):
    def boom(cls, *a, **k):
        raise ConfigError("inputs.steps", "too many")

    monkeypatch.setattr(ToyAdapter, "generate", classmethod(boom))
    cfg = write_config(tmp_path / "c.yaml", toy_config(toy))
    assert main(["run", cfg]) == 2
    assert not (tmp_path / "out").exists()


SHAPES = ["a small red circle on the left", "a large green square on the right"]


def shapes_config(tmp_path: Path, prompts: list[str], steps: int = 2) -> str:
    cfg = {
        "pipeline": {"type": "stable-diffusion", "model": "zoo:shapes-sd", "device": "cpu"},
        "inputs": {"prompt": prompts, "num_inference_steps": steps, "guidance_scale": 3.0},
        "output": {"dir": str(tmp_path / "out")},
    }
    return write_config(tmp_path / "shapes.yaml", cfg)


def test_overwrite_does_not_mix_two_runs(tmp_path, manager, capsys):
    assert main(["run", shapes_config(tmp_path, SHAPES * 2)]) == 0
    out = tmp_path / "out"
    assert len(list(out.glob("*.png"))) == 4
    assert main(["run", shapes_config(tmp_path, SHAPES[:1])]) == 2
    assert len(list(out.glob("*.png"))) == 4  # refused: nothing touched
    assert main(["run", shapes_config(tmp_path, SHAPES[:1]), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "000-a-small-red-circle-on-the-left.png",
        "run.json",
    ]


def test_sigint_while_saving_leaves_only_complete_pngs(tmp_path):
    """Ctrl-C in the middle of writing the third image: two whole PNGs, no temporary file."""
    cfg = shapes_config(tmp_path, SHAPES * 3)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DECODEKIT_TEST_SLOW_SAVE": "1.0",  # each image's write takes a second (tests only)
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "decodekit.cli", "run", cfg],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("*.png"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # now inside the third image's write
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().endswith("interrupted")
    pngs = sorted(out.glob("*.png"))
    assert 2 <= len(pngs) < 6
    for p in pngs:
        with Image.open(p) as img:
            img.load()  # a truncated PNG raises here
    assert not [p for p in out.iterdir() if TEMP_MARK in p.name]
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "interrupted" and rec["files"] == [p.name for p in pngs]


# -- outputs that explain themselves (issue 23) --------------------------------------------


def test_slug_is_short_lowercase_ascii():
    assert slug("A Red Circle!") == "a-red-circle"
    assert slug("  Crème brûlée, über   alles ") == "creme-brulee-uber-alles"
    long = slug("a very long prompt about a small red circle on the left of a square")
    assert long == "a-very-long-prompt-about-a-small-red" and len(long) <= 40
    assert slug("x" * 50) == "x" * 40
    assert slug("猫 ?!") == ""


def test_image_names_index_slug_and_image_number():
    assert image_names(["a red circle", "B"]) == ["000-a-red-circle.png", "001-b.png"]
    assert image_names(["a red circle", "?"], per_prompt=2) == [
        "000-a-red-circle-0.png",
        "000-a-red-circle-1.png",
        "001-0.png",
        "001-1.png",
    ]


def test_image_run_names_files_by_prompt_and_records_each(tmp_path, manager, capsys):
    assert main(["run", shapes_config(tmp_path, SHAPES)]) == 0
    out = tmp_path / "out"
    names = ["000-a-small-red-circle-on-the-left.png", "001-a-large-green-square-on-the-right.png"]
    assert sorted(p.name for p in out.iterdir()) == [*names, "run.json"]
    rec = json.loads((out / "run.json").read_text())
    assert rec["files"] == names
    assert rec["outputs"] == [
        {"file": n, "prompt": p, "seed": s} for n, p, s in zip(names, SHAPES, row_seeds(0, SHAPES))
    ]
    # --overwrite removes the previous run's named files (recorded in run.json)
    assert main(["run", shapes_config(tmp_path, SHAPES[1:]), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "000-a-large-green-square-on-the-right.png",
        "run.json",
    ]


def test_diverse_beam_run_writes_ranked_scored_rows(tmp_path, manager, capsys):
    prompts = ["86-7=", "8+5="]
    cfg = {
        "pipeline": {"type": "causal-lm", "model": "zoo:arith-ar", "device": "cpu"},
        "strategies": [
            {"name": "diverse-beam", "params": {"num_beam_groups": 2, "diversity_penalty": 0.5}}
        ],
        "inputs": {
            "prompt": prompts,
            "max_new_tokens": 6,
            "do_sample": False,
            "extra": {"num_beams": 4, "num_return_sequences": 4},
        },
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "dbs.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for i, prompt in enumerate(prompts):
        block = rows[4 * i : 4 * i + 4]
        assert [r["prompt"] for r in block] == [prompt] * 4
        assert [r["rank"] for r in block] == [0, 1, 2, 3]
        scores = [r["score"] for r in block]
        assert scores == sorted(scores, reverse=True)
        assert all(isinstance(r["text"], str) and r["tokens"] for r in block)
    rec = json.loads((out / "run.json").read_text())
    seeds = row_seeds(0, prompts)
    assert rec["outputs"] == [
        {
            "file": "outputs.jsonl",
            "line": j,
            "prompt": r["prompt"],
            "seed": seeds[j // 4],
            "rank": r["rank"],
            "score": r["score"],
        }
        for j, r in enumerate(rows)
    ]


def test_one_row_per_prompt_has_no_rank(tmp_path, manager, capsys):
    cfg = {
        "pipeline": {"type": "causal-lm", "model": "zoo:arith-ar", "device": "cpu"},
        "inputs": {"prompt": ["8+5="], "max_new_tokens": 4, "do_sample": False},
        "output": {"dir": str(tmp_path / "out")},
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 0
    (row,) = [json.loads(x) for x in (tmp_path / "out" / "outputs.jsonl").read_text().splitlines()]
    assert set(row) == {"prompt", "text", "tokens"}
