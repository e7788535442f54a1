"""The per-loop strategy sketches of docs/writing-a-plugin.md run as written, one per loop."""

from __future__ import annotations

import re
from pathlib import Path

import decodekit
import pytest
import torch
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline
from decodekit.testing import tiny_llama, tiny_sd_pipeline

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-plugin.md"


@pytest.fixture(scope="module")
def sketches() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "class ReuseEveryOther" in b]
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the documented code itself
    return namespace


def test_denoising_sketch_serves_every_other_call(sketches):
    pipe = tiny_sd_pipeline()
    kw = dict(
        num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0)
    )
    base = pipe("a red circle", **kw).images
    with decodekit.attach(pipe, [sketches["ReuseEveryOther"]()]) as run:
        kw["generator"] = torch.Generator().manual_seed(0)
        out = pipe("a red circle", **kw).images
    assert (run.last["nfe"], run.last["served"]) == (2, 2)
    assert not torch.equal(base, out)  # served outputs changed the trajectory


def test_masked_diffusion_sketch_counts_every_commit(sketches):
    pipe = MaskedDiffusionLMPipeline(tiny_llama(), mask_token_id=3, eos_token_id=2, pad_token_id=0)
    with decodekit.attach(pipe, [sketches["CountCommits"]()]) as run:
        out = pipe(input_ids=[[5, 6, 7], [8, 9, 10]], gen_length=8, block_length=4, steps=4)
    per_step = run.stats["strategies"]["count-commits"]["committed_per_step"]
    assert len(per_step) == 4 and sum(per_step) == 2 * 8  # every generated position, once
    assert not (out.sequences[:, 3:] == 3).any()


def test_token_loop_sketch_bans_the_token_greedy_would_emit(sketches):
    model = tiny_llama()
    prompt = torch.tensor([[1, 5, 6, 7]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    base = model.generate(prompt, **kw)[0, 4:].tolist()
    banned = base[0]
    with decodekit.attach(
        model,
        [{"name": "ban-token", "params": {"token_id": banned}}],
        manager=_manager_with(sketches["BanToken"]),
    ):
        out = model.generate(prompt, **kw)[0, 4:].tolist()
    assert banned not in out and out != base


def _manager_with(cls):
    from decodekit.manager import PluginManager

    manager = PluginManager(load_entry_points=True)
    module = type("SketchPlugin", (), {})()

    @decodekit.hookimpl
    def decodekit_register_strategies(register):
        register(cls)

    module.decodekit_register_strategies = decodekit_register_strategies
    manager.register(module, name="sketch-plugin")
    assert "sketch-plugin" not in manager.registry.failed
    return manager
