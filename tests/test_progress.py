"""Progress bars: labels of bench pairs and run prompts, an ETA that leaves warm-up out, quiet off a TTY."""

from __future__ import annotations

import io
import json
import re

import pytest
from decodekit.bench import bench
from decodekit.cli import main
from decodekit.config import load_config
from decodekit.progress import Bar, Eta, format_eta

from tests.tiny import ScriptedClock, ToyAdapter, toy_config


def frames(err: str) -> list[str]:
    """The successive states of a bar drawn with carriage returns (blank erasures dropped)."""
    return [f.strip() for f in err.split("\r") if f.strip()]


def test_eta_counts_measured_items_only():
    eta = Eta({"baseline": 2, "strategy": 2})
    assert eta.seconds() is None  # nothing measured yet: unknown, not a guess from warm-up
    eta.record("baseline", 4.0)
    assert eta.seconds() == 1 * 4.0 + 2 * 4.0  # strategy not measured yet: the overall mean
    eta.record("strategy", 2.0)
    assert eta.seconds() == 4.0 + 2.0
    eta.record("strategy", 1.0)
    eta.record("baseline", 8.0)
    assert eta.seconds() == 0.0
    assert format_eta(None) == "ETA after warm-up"
    assert (format_eta(65), format_eta(7384)) == ("ETA 1:05", "ETA 2:03:04")


def test_bench_bar_labels_config_arm_pair_and_its_eta_ignores_warm_up(toy, manager, capsys):
    cfg = load_config(toy_config(toy, bench={"repeat": 2, "warmup": 1}), manager=manager)
    # warm-up B S (100 s each), then pairs B S (4, 2) and S B (2, 4)
    clock = ScriptedClock([100.0, 100.0, 4.0, 2.0, 2.0, 4.0])
    bench(cfg, manager=manager, clock=clock, progress=True, label="toy.yaml")
    shown = frames(capsys.readouterr().err)
    labels = [s.split("  ")[0] for s in shown]
    assert labels[0] == "toy.yaml · baseline · warm-up 1/1"
    assert "toy.yaml · strategy · warm-up 1/1" in labels
    assert "toy.yaml · baseline · pair 1/2" in labels and "toy.yaml · strategy · pair 2/2" in labels
    etas = [s.rsplit("  ", 1)[1] for s in shown]
    done = [re.search(r"(\d+)/6", s).group(1) for s in shown]
    by_done = dict(zip(done, etas))
    assert by_done["2"] == "ETA after warm-up"  # warm-up over, nothing measured yet
    # after the first measured run (baseline 4 s): 1 baseline + 2 strategy left at 4 s each;
    # had the 100 s warm-up runs counted, it would be minutes
    assert by_done["3"] == "ETA 0:12"
    assert by_done["4"] == "ETA 0:06"  # 1 baseline at 4 s + 1 strategy at 2 s
    assert by_done["6"] == "ETA 0:00"


def test_bench_bar_is_quiet_off_a_terminal_unless_asked(toy, manager, capsys):
    cfg = load_config(toy_config(toy), manager=manager)
    bench(cfg, manager=manager)  # progress=None and stderr is not a terminal here
    assert capsys.readouterr().err == ""
    bench(cfg, manager=manager, progress=False)
    assert capsys.readouterr().err == ""


def test_bar_erases_itself_and_draws_only_when_enabled():
    stream = io.StringIO()
    with Bar(3, enabled=True, stream=stream) as bar:
        bar.show("x · prompt 1/3")
        bar.advance(eta=2.0)
        assert bar.line().startswith("x · prompt 1/3  ") and bar.line().endswith("1/3  ETA 0:02")
    assert stream.getvalue().endswith("\r")  # the last state is blanked out
    stream = io.StringIO()
    with Bar(3, stream=stream) as bar:  # a StringIO is not a terminal
        bar.show("x")
        bar.advance()
    assert stream.getvalue() == ""


def test_bar_falls_back_to_ascii_where_the_stream_cannot_encode_blocks():
    stream = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    bar = Bar(4, enabled=True, stream=stream)
    bar.show("x")
    bar.advance(2)
    assert "##########----------" in bar.line()  # and writing it raised no UnicodeEncodeError


def test_run_bar_goes_over_prompts_and_leaves_the_first_batch_out_of_the_rate(toy, tmp_path):
    import yaml
    from decodekit.distributed import Job

    config = tmp_path / "sd.yaml"
    config.write_text(yaml.safe_dump(toy_config(toy, inputs={"prompt": ["a", "b", "c", "d"]})))
    cfg = load_config(str(config), ["output.dir=" + str(tmp_path / "out")])
    stream = io.StringIO()
    job = Job(cfg, batch_size=1, progress=True, label="sd.yaml", stream=stream)
    now, durations, made = [0.0], [30.0, 2.0, 2.0, 2.0], []  # the first batch is slow

    def unit(target, first, stop, progress, clock):  # a batch that only takes time
        made.append((first, stop, progress))
        now[0] += durations.pop(0)

    job._unit = unit
    job.generate(None, run=None, clock=lambda: now[0])
    assert made == [(0, 1, False), (1, 2, False), (2, 3, False), (3, 4, False)]
    shown = frames(stream.getvalue())
    labels = [s.split("  ")[0] for s in shown[::2]]
    assert [x.split(" · ")[:2] for x in labels] == [
        ["sd.yaml", f"prompt {i}/4"] for i in range(1, 5)
    ]
    assert labels[1].endswith("0.03 prompts/s") and labels[2].endswith("0.50 prompts/s")
    etas = [s.rsplit("  ", 1)[1] for s in shown[1::2]]
    # 3 left at 30 s after the first batch alone; then the first is left out: 2 s a prompt
    assert etas == ["ETA 1:30", "ETA 0:04", "ETA 0:02", "ETA 0:00"]


def test_run_batch_size_splits_the_calls_and_refuses_zero(toy, tmp_path, capsys):
    def run(*extra):
        out = tmp_path / f"out{len(extra)}"
        inputs = {"prompt": ["a", "b", "c"], "steps": 8, "seed": 0}
        path = tmp_path / f"c{len(extra)}.json"
        path.write_text(json.dumps(toy_config(toy, output={"dir": str(out)}, inputs=inputs)))
        assert main(["run", str(path), *extra]) == 0
        rows = (out / "outputs.jsonl").read_text().splitlines()
        return len(rows), json.loads((out / "run.json").read_text())["stats"]

    rows, stats = run()
    assert rows == 3 and stats["calls"] == 1  # default: one call, as before
    shown = capsys.readouterr()
    assert "last call" not in shown.out and "\r" not in shown.err  # no bar off a terminal
    rows, stats = run("--batch-size", "2", "--no-progress")
    assert rows == 3 and stats["calls"] == 2 and stats["nfe"] + stats["served"] == 2 * 8
    shown = capsys.readouterr().out
    assert "halve (last call of 2):" in shown
    # the declared counters of the whole run beside the last call's
    assert f"halve (all 2 calls): hits={stats['totals']['halve']['hits']}" in shown
    assert stats["totals"]["halve"]["hits"] == stats["served"]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(toy_config(toy)))
    assert main(["run", str(cfg), "--batch-size", "0"]) == 2
    assert "--batch-size: must be at least 1" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _toy_adapter_unchanged():
    yield
    assert ToyAdapter.draw_picture is False
