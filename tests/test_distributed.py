"""`decodekit run` and `bench` over several processes (issue 20).

Under torchrun (or ``accelerate launch``) each process takes a contiguous shard
of the prompts, writes its outputs under their run-wide names, and rank 0
gathers the stats into one run.json. Row seeds follow the prompt, so a
2-process CPU run (gloo) writes the same bytes as a 1-process run.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import yaml
from decodekit.bench import bench
from decodekit.cli import main
from decodekit.config import load_config
from decodekit.distributed import World, bench_across, slice_inputs

from tests.tiny import toy_config

PROMPTS = [
    "a small red circle on the left",
    "a large green square on the right",
    "a small red circle on the left",  # its second copy: the other process, its own seed
]


SHAPES_RUN = {
    "pipeline": {"type": "stable-diffusion", "model": "zoo:shapes-sd", "device": "cpu"},
    "inputs": {"prompt": PROMPTS, "num_inference_steps": 2, "guidance_scale": 3.0},
}


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m decodekit.cli ARGS`` (gloo, 1 thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, "-m", "decodekit.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_two_processes_write_the_bytes_of_one(tmp_path, manager, capsys):
    config = tmp_path / "shapes.yaml"
    config.write_text(yaml.safe_dump(SHAPES_RUN))
    args = ["run", str(config), "--batch-size", "1", "--threads", "1", "--set"]
    proc = torchrun(*args, f"output.dir={tmp_path / 'two'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout and proc.stdout.count("model calls:") == 1  # rank 0 prints
    assert main([*args, f"output.dir={tmp_path / 'one'}"]) == 0
    one, two_dir = tmp_path / "one", tmp_path / "two"
    names = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two_dir.iterdir()) == names and len(names) == 4
    for name in names[:-1]:  # the images, byte for byte
        assert (two_dir / name).read_bytes() == (one / name).read_bytes(), name
    rec, ref = (json.loads((d / "run.json").read_text()) for d in (two_dir, one))
    assert rec["status"] == "complete" and rec["processes"] == 2 and ref["processes"] == 1
    assert rec["files"] == ref["files"] and rec["outputs"] == ref["outputs"]
    ranks = rec["ranks"]
    assert [(r["rank"], r["prompts"], r["generated"]) for r in ranks] == [(0, 2, 2), (1, 1, 1)]
    assert rec["stats"]["nfe"] == ref["stats"]["nfe"] == sum(r["stats"]["nfe"] for r in ranks)
    assert rec["stats"]["calls"] == 3


def test_totals_of_several_processes_sum_their_counters():
    from decodekit.distributed import Job

    def rank(served, rate):
        totals = {"cspd": {"accepted_tokens": served, "acceptance_rate": rate}}
        stats = {
            "calls": 1,
            "nfe": 4,
            "served": 0,
            "time_s": 1.0,
            "hook_time_s": {},
            "totals": totals,
        }
        return {"stats": stats, "ideal_speedup": None, "timings_s": {"generate_s": 1.0}}

    figures = Job._figures(None, [rank(3, 0.5), rank(4, 0.25)])
    # counters add up; a rate derived on each process stays under that process's rank
    assert figures["stats"]["totals"] == {"cspd": {"accepted_tokens": 7}}
    assert figures["ranks"][1]["stats"]["totals"]["cspd"]["acceptance_rate"] == 0.25


class FakeWorld(World):
    """Rank ``rank`` of ``size``, whose gather returns the other ranks' values given in ``others``."""

    def __init__(self, rank: int, size: int, others: dict[int, object] | None = None):
        super().__init__()
        self.rank, self.size, self.others, self.sent = rank, size, others or {}, []

    def gather(self, value):
        value = json.loads(json.dumps(value, default=str))
        self.sent.append(value)
        return [value if r == self.rank else self.others[r] for r in range(self.size)]

    def shard(self, count):
        per, extra = divmod(count, self.size)
        first = self.rank * per + min(self.rank, extra)
        return range(first, first + per + (1 if self.rank < extra else 0))

    def barrier(self):
        pass


def test_bench_across_joins_per_process_figures(toy, manager, tmp_path):
    """Each process benches its shard; rank 0's JSON has per-pair the slowest process's times."""
    cfg = load_config(
        toy_config(toy, inputs={"prompt": ["a", "b", "c"]}, bench={"repeat": 2, "warmup": 0}),
        manager=manager,
    )
    second = FakeWorld(1, 2, {0: None})
    assert bench_across(cfg, second, None, None, manager=manager) is None  # rank 0 writes
    rank1 = second.sent[0]
    assert rank1["rank"] == 1 and rank1["prompts"] == [2, 3]
    rank1["baseline"]["time_s"]["all"] = [100.0, 100.0]  # the slow process sets the job's times

    first = FakeWorld(0, 2, {1: rank1})
    json_path = tmp_path / "b.json"
    r = bench_across(cfg, first, json_path, None, manager=manager)
    assert json.loads(json_path.read_text())["processes"] == 2
    assert [x["rank"] for x in r["ranks"]] == [0, 1] and r["ranks"][0]["prompts"] == [0, 2]
    assert r["baseline"]["time_s"]["all"] == [100.0, 100.0]
    strategy = [max(a, b) for a, b in zip(*(x["strategy"]["time_s"]["all"] for x in r["ranks"]))]
    assert r["pair_ratios"] == [100.0 / t for t in strategy]
    # model calls add up over the processes: 2 prompts and 1 prompt of the toy loop
    alone = bench(
        cfg.__class__(**{**cfg.__dict__, "inputs": slice_inputs(cfg.inputs, 0, 2)}),
        repeat=1,
        manager=manager,
    )
    assert r["strategy"]["nfe"] == alone["strategy"]["nfe"] + rank1["strategy"]["nfe"]
    assert r["config"]["inputs"]["prompt"] == ["a", "b", "c"]


def test_bench_needs_a_prompt_per_process(toy, manager):
    cfg = load_config(toy_config(toy, inputs={"prompt": ["a"]}), manager=manager)
    with pytest.raises(Exception, match="at least one prompt per process"):
        bench_across(cfg, FakeWorld(1, 2, {0: None}), None, None, manager=manager)


def test_the_bar_shows_prompts_per_second_and_counters_on_rank_0_only(toy, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(toy_config(toy, inputs={"prompt": ["a", "b", "c"]})))
    assert main(["run", str(config), "--batch-size", "1", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "c.yaml · prompt 3/3 · " in err and "prompts/s · halve hits=" in err

    from decodekit.distributed import Job

    cfg = load_config(str(config), ["output.dir=" + str(tmp_path / "other")])
    for rank, shown in ((0, True), (1, False)):
        stream = io.StringIO()
        stream.isatty = lambda: True  # a terminal: rank 0 draws by default, the others do not
        job = Job(cfg, FakeWorld(rank, 2), batch_size=1, label="c.yaml", stream=stream)
        job.generate(cfg.load_pipeline(), run=None)
        assert ("c.yaml · rank" in stream.getvalue()) is shown


def test_each_process_takes_its_own_gpu_and_needs_one():
    world = FakeWorld(1, 2)
    world.local_rank = 1
    assert world.device("cuda", gpus=2) == "cuda:1"
    assert world.device("cpu", gpus=0) == "cpu" and world.device("cuda:0", gpus=1) == "cuda:0"
    with pytest.raises(Exception, match="this machine has 1 GPU"):
        world.device("cuda", gpus=1)
    assert World().device("cuda", gpus=0) == "cuda"  # one process: the config's device as it is


def test_device_map_is_a_pipeline_option(manager):
    """diffusers' and transformers' device_map load the zoo models (one device here, the CPU)."""
    from decodekit.distributed import devices_of

    sd = load_config(
        {
            "pipeline": {**SHAPES_RUN["pipeline"], "options": {"device_map": "cpu"}},
            "inputs": {"prompt": ["a red circle"], "num_inference_steps": 1},
        }
    )
    pipe = sd.load_pipeline()
    assert devices_of(pipe) == ["cpu"] and len(sd.adapter.generate(pipe, sd.inputs)) == 1
    lm = {"type": "causal-lm", "model": "zoo:arith-ar", "device": "cpu"}
    text = load_config(
        {
            "pipeline": {**lm, "options": {"device_map": {"": "cpu"}}},
            "inputs": {"prompt": ["1+1="], "max_new_tokens": 2},
        }
    )
    assert text.adapter.generate(text.load_pipeline(), text.inputs)[0]["text"]
    with pytest.raises(Exception, match="device_map"):
        load_config({"pipeline": {**lm, "options": {"device_mapp": "auto"}}, "inputs": {}})
    mdm = {"type": "masked-diffusion-lm", "model": "zoo:arith-mdlm", "device": "cpu"}
    inputs = {"prompt": ["8+5="], "gen_length": 8, "block_length": 8, "steps": 8}
    placed = load_config(
        {"pipeline": {**mdm, "options": {"device_map": {"": "cpu"}}}, "inputs": inputs}
    )
    plain = load_config({"pipeline": mdm, "inputs": inputs})
    pipe = placed.load_pipeline()  # one device: transformers places it whole (no hf_device_map)
    got = placed.adapter.generate(pipe, placed.inputs)
    assert got == plain.adapter.generate(plain.load_pipeline(), plain.inputs)


def test_strategies_refuse_a_model_split_across_devices(tmp_path, manager, capsys, monkeypatch):
    """A fake two-GPU map on the CPU pipeline: the strategy is refused before it attaches."""
    from decodekit.distributed import check_placement
    from decodekit.pipelines.stable_diffusion import StableDiffusionAdapter

    real = StableDiffusionAdapter.load.__func__

    def split(cls, *args, **kw):
        pipe = real(cls, *args, **kw)
        pipe.hf_device_map = {"text_encoder": 0, "unet": 1, "vae": 0}  # as 'balanced' writes it
        return pipe

    monkeypatch.setattr(StableDiffusionAdapter, "load", classmethod(split))
    config = tmp_path / "split.yaml"
    run = {
        **SHAPES_RUN,
        "strategies": [{"name": "faster-diffusion", "params": {"key_steps": "uniform-2"}}],
        "output": {"dir": str(tmp_path / "out")},
    }
    config.write_text(yaml.safe_dump(run))
    assert main(["run", str(config), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: strategies.0.name: 'faster-diffusion' cannot run on a model")
    assert "split across devices (0, 1" in err and "device_map" in err
    assert not (tmp_path / "out").exists()
    check_placement(object(), [object()])  # placed whole: nothing to refuse
    assert main(["run", str(config), "--set", "strategies=[]", "--threads", "1"]) == 0  # baseline


def test_a_job_started_on_two_processes_resumes_on_one(toy, tmp_path, capsys):
    """Rank 1 saved its batch, rank 0 was killed: one process makes the rest and joins them."""
    from decodekit.distributed import Job

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(toy_config(toy, inputs={"prompt": ["a", "b", "c"]})))
    cfg = load_config(str(config))
    Job(cfg, FakeWorld(0, 2, {1: {}})).prepare()  # rank 0 checks the folder, writes run.json
    second = Job(cfg, FakeWorld(1, 2, {0: {}}))
    second.prepare()
    second.generate(cfg.load_pipeline(), run=None)  # prompt 2, its share; rank 0 never finishes
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / ".decodekit-parts").iterdir()) == ["000002-000003"]

    assert main(["run", str(config)]) == 0
    assert "resuming: 1 of 3 outputs exist, generating the rest" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and sorted(p.name for p in out.iterdir()) == ["outputs.jsonl", "run.json"]
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and rec["resumed"]["outputs_generated"] == 2
