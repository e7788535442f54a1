"""torch.compile of the dLLM caches' cached forward, the shapes it sees, and `compile:` in YAML.

The compile tests use dynamo's "eager" backend: it traces exactly what inductor would
(graph breaks are dynamo's) without generating code, so they stay fast on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import decodekit
import decodekit.plugins.dkv_cache as dkv_module
import pytest
import torch
import yaml
from decodekit.bench import bench
from decodekit.compiling import compile_pipeline
from decodekit.config import load_config
from decodekit.errors import ConfigError
from decodekit.kv_cache import CacheError, PositionalKVCache
from decodekit.testing import tiny_mdm_pipeline

from tests.tiny import MDM_PROMPTS as PROMPTS

KW = dict(gen_length=16, block_length=8, steps=8)
CACHES = [
    {"name": "dkv-cache", "params": {"variant": "decode", "query_bucket": 16}},
    {"name": "block-cache", "params": {"mode": "dual"}},
    {"name": "block-cache", "params": {"mode": "prefix"}},
    {"name": "dkv-cache", "params": {"variant": "pd", "query_bucket": 16}},
]


def record_model_calls(monkeypatch, compiled: bool):
    """Spy on the cached forward; with ``compiled``, run it through torch.compile(fullgraph=True).

    Returns the list the spy fills with ``((batch, query width, LM-head width), logits)``
    per call. A graph break
    fails the call with `torch._dynamo.explain`'s report (breaks and their reasons).
    """
    import torch._dynamo

    real = dkv_module._call_model
    run = torch.compile(real, fullgraph=True, backend="eager") if compiled else real
    calls = []

    def spy(model, ids, pos_ids, keep):
        try:
            logits = run(model, ids, pos_ids, keep)
        except torch._dynamo.exc.Unsupported as error:
            report = torch._dynamo.explain(real)(model, ids, pos_ids, keep)
            breaks = "\n".join(str(r) for r in report.break_reasons)
            raise AssertionError(
                f"the cached forward does not compile as one graph: "
                f"{report.graph_break_count} graph breaks (torch._dynamo.explain):\n{breaks}"
            ) from error
        calls.append(((*ids.shape, *keep.shape), logits.detach().clone()))
        return logits

    monkeypatch.setattr(dkv_module, "_call_model", spy)
    return calls


@pytest.mark.parametrize(
    "spec", CACHES, ids=lambda s: "-".join([s["name"], *map(str, s["params"].values())])
)
def test_cached_forward_compiles_as_one_graph_and_equals_eager(spec, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    outs, calls = {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        pipe = tiny_mdm_pipeline(layers=1)
        with monkeypatch.context() as patch:
            calls[compiled] = record_model_calls(patch, compiled)
            with decodekit.attach(pipe, [spec]):
                outs[compiled] = pipe(input_ids=PROMPTS, **KW).sequences
    assert torch.equal(outs[True], outs[False])
    assert [shape for shape, _ in calls[True]] == [shape for shape, _ in calls[False]]
    for (_, compiled), (_, eager) in zip(calls[True], calls[False], strict=True):
        torch.testing.assert_close(compiled, eager)
    shapes = {shape for shape, _ in calls[True]}
    # one graph per query shape, and one more for the first call (the cache is empty then)
    assert 1 <= counters["stats"]["unique_graphs"] <= len(shapes) + 1


def query_shapes(spec: dict, monkeypatch, **kw) -> list[tuple[int, int]]:
    pipe = tiny_mdm_pipeline(layers=1)
    with monkeypatch.context() as patch:
        calls = record_model_calls(patch, compiled=False)
        with decodekit.attach(pipe, [spec]):
            pipe(input_ids=PROMPTS, **kw)
    return [shape for shape, _ in calls]


def test_block_cache_sees_one_query_shape_per_block_step(monkeypatch):
    # CUDA graphs and compiled kernels are per shape: dual feeds the whole sequence at a
    # block's first step and the block alone after it, whatever the step.
    kw = dict(gen_length=32, block_length=8, steps=16)
    shapes = query_shapes(CACHES[1], monkeypatch, **kw)
    length = max(len(p) for p in PROMPTS) + kw["gen_length"]
    block = kw["block_length"]
    assert set(shapes) == {(len(PROMPTS), length, block), (len(PROMPTS), block, block)}
    assert len(shapes) == kw["steps"]


def test_dkv_cache_query_shapes_are_bounded_by_the_bucket(monkeypatch):
    kw = dict(gen_length=32, block_length=8, steps=32)
    length = max(len(p) for p in PROMPTS) + kw["gen_length"]
    exact = set(query_shapes(dkv_module_spec(1), monkeypatch, **kw))
    bucketed = set(query_shapes(dkv_module_spec(8), monkeypatch, **kw))
    assert all(q % 8 == 0 or q == length for _, q, _ in bucketed)
    assert len(bucketed) <= math.ceil(length / 8)
    assert len(exact) > len(bucketed)  # the control: exact widths vary more


def dkv_module_spec(bucket: int) -> dict:
    return {"name": "dkv-cache", "params": {"variant": "decode", "query_bucket": bucket}}


def test_column_form_store_equals_the_flat_store():
    # The fixed-shape store the compiled forward uses: unreal columns write back their
    # slot's own data, so the cache ends as the -1-padded (flat) store leaves it.
    torch.manual_seed(0)
    order = torch.tensor([[4, 1, 0, 2], [3, 0, 5, 1]])  # distinct per row, < 6
    real = torch.tensor([[True, True, True, False], [True, False, False, False]])
    caches = [PositionalKVCache(1), PositionalKVCache(1)]
    for cache in caches:
        cache.mark_decoded(torch.ones(2, 6, dtype=torch.bool), -1)
    for step in (0, 1):
        keys, values = torch.randn(2, 2, 4, 3), torch.randn(2, 2, 4, 5)
        if step == 0:  # first fill every slot, so the write-back has data to keep
            keys, values = torch.randn(2, 2, 6, 3), torch.randn(2, 2, 6, 5)
            full = torch.arange(6).expand(2, -1)
            for cache in caches:
                cache.store(0, keys, values, full, step=0)
            continue
        flat = caches[0].prepare(torch.where(real, order, -1), 4, end=6, step=step)
        column = caches[1].prepare(order, 4, end=6, step=step, real=real)
        caches[0].store(0, keys, values, flat)
        caches[1].store(0, keys, values, column)
    for got, want in zip(caches[1].kv(0), caches[0].kv(0), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(caches[1].key_mask(0), caches[0].key_mask(0))
    assert torch.equal(caches[1].reusable(3, layer=0), caches[0].reusable(3, layer=0))
    assert not torch.equal(caches[1].reusable(1, layer=0), caches[1].reusable(2, layer=0))
    with pytest.raises(CacheError, match="bool mask of the columns"):
        caches[1].prepare(order, 4, end=6, real=real.long())
    with pytest.raises(CacheError, match="needs end="):
        caches[1].prepare(order, 4, real=real)


def tiny_config(tmp_path, **pipeline) -> Path:
    doc = {
        "pipeline": {"type": "masked-diffusion-lm", "model": "zoo:arith-mdlm", "device": "cpu"}
        | pipeline,
        "strategies": [{"name": "block-cache", "params": {"mode": "dual"}}],
        "inputs": {"prompt": ["12+7=", "8+5="], "gen_length": 8, "block_length": 4, "steps": 4},
        "bench": {"repeat": 1, "warmup": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("pipeline", "match"),
    [
        ({"compile": "yes"}, "pipeline.compile"),
        ({"compile": 1}, "pipeline.compile"),
        ({"type": "causal-lm", "compile": True}, "no single model call to compile"),
    ],
)
def test_compile_setting_is_checked(tmp_path, pipeline, match):
    with pytest.raises(ConfigError, match=match):
        load_config(tiny_config(tmp_path, **pipeline))


def test_compile_pipeline_compiles_the_model_in_place_and_restores_it():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = tiny_mdm_pipeline(layers=1)
    model = pipe.model
    with decodekit.attach(pipe, [CACHES[1]]):
        eager = pipe(input_ids=PROMPTS, **KW).sequences
    compiled = compile_pipeline(pipe, "masked-diffusion-lm", "eager")
    assert pipe.model is model  # strategies see the same module
    with decodekit.attach(pipe, [CACHES[1]]):
        out = pipe(input_ids=PROMPTS, **KW).sequences
    assert counters["stats"]["unique_graphs"] >= 1  # the calls went through dynamo
    assert torch.equal(out, eager)
    compiled.restore()
    assert model._compiled_call_impl is None
    with pytest.raises(ConfigError, match="no single model call"):
        compile_pipeline(pipe, "causal-lm", True)


def test_compile_pipeline_targets_the_unet_of_stable_diffusion():
    from decodekit.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    unet, encoder = pipe.unet, pipe.text_encoder
    compiled = compile_pipeline(pipe, "stable-diffusion", True)  # compiles lazily, at a call
    assert pipe.unet is unet and unet._compiled_call_impl is not None
    assert encoder._compiled_call_impl is None
    compiled.restore()
    assert unet._compiled_call_impl is None


@pytest.mark.slow  # traces the tiny UNet; the test above covers which module is compiled
def test_compiled_unet_of_stable_diffusion_equals_eager():
    from decodekit.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    unet = pipe.unet

    def images():
        generator = torch.Generator().manual_seed(0)
        kw = dict(num_inference_steps=2, output_type="pt", generator=generator)
        return pipe(prompt=["a red circle"], **kw).images

    eager = images()
    compiled = compile_pipeline(pipe, "stable-diffusion", "eager")
    assert pipe.unet is unet and unet._compiled_call_impl is not None
    assert torch.equal(images(), eager)
    compiled.restore()
    assert unet._compiled_call_impl is None


@pytest.mark.slow  # compiles the zoo model; the in-place compile test above covers the call
def test_bench_reports_compile_time_apart(tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    result = bench(load_config(tiny_config(tmp_path, compile="eager")))
    assert set(result["compile_s"]) == {"baseline", "strategy"}
    assert all(t > 0 for t in result["compile_s"].values())
    assert counters["stats"]["unique_graphs"] >= 2  # baseline and cached forward
    assert result["config"]["pipeline"]["compile"] == "eager"
    plain = bench(load_config(tiny_config(tmp_path)))
    assert plain["compile_s"] is None
    assert plain["quality"] == result["quality"]
