"""The strategies on a CUDA device: each result equals the same run on the CPU.

Skipped without a GPU (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py`` (benchmarks/gpu_session.sh does). Float64 models
and temperature 0, so CPU and GPU must choose the same tokens.
"""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.testing import sd_latents, tiny_llama, tiny_mdm_pipeline, tiny_sd_pipeline

from tests.tiny import MDM_PROMPTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LM_PROMPTS = [[1, 5, 6, 7], [1, 9, 3, 4], [1, 30, 31, 8]]


def on_both(make, run):
    """``run(obj)`` for ``make()`` on the CPU and a second ``make()`` moved to CUDA."""
    cpu = run(make())
    gpu = run(make().to("cuda"))
    return cpu, gpu


@pytest.mark.parametrize("variant", ["decode", "greedy", "prefill", "pd"])
@pytest.mark.parametrize("threshold", [False, True])
def test_dkv_cache_on_cuda_matches_cpu(variant, threshold):
    def specs(**extra):
        out = [
            {"name": "dkv-cache", "params": {"variant": variant, "refresh_interval": 4, **extra}}
        ]
        if threshold:
            out.append({"name": "parallel-threshold", "params": {"threshold": 0.3}})
        return out

    def go(pipe, specs):
        with decodekit.attach(pipe, specs):
            out = pipe(input_ids=MDM_PROMPTS, gen_length=16, block_length=8, steps=8)
        return out.sequences.cpu(), out.tokens_computed

    # exact widths on both devices: the same tokens, and the same positions computed
    (cpu, cpu_tokens) = go(tiny_mdm_pipeline(), specs(query_bucket=1))
    (gpu, gpu_tokens) = go(_mdm_on_cuda(), specs(query_bucket=1))
    assert torch.equal(cpu, gpu)
    assert cpu_tokens == gpu_tokens
    # CUDA's default rounds the widths up (query_bucket 16): more computed, same tokens
    bucketed, bucketed_tokens = go(_mdm_on_cuda(), specs())
    assert torch.equal(bucketed, cpu)
    assert sum(bucketed_tokens) >= sum(cpu_tokens)


def _mdm_on_cuda():
    pipe = tiny_mdm_pipeline()
    pipe.model.to("cuda")
    return pipe


def _device_syncs(run) -> int:
    """How many times ``run()`` made the host wait for the GPU (torch's sync debug mode)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("variant", ["decode", "greedy", "prefill", "pd"])
def test_dkv_cache_device_syncs_per_step_do_not_grow_with_depth(variant):
    # What HostReads counts on the CPU, measured where it matters: every wait for the
    # device, including ones torch makes inside an operator (a host number copied in).
    kw = dict(input_ids=MDM_PROMPTS, gen_length=16, block_length=8, steps=8)
    specs = [{"name": "dkv-cache", "params": {"variant": variant, "refresh_interval": 4}}]
    syncs = {}
    for layers in (1, 4):
        pipe = tiny_mdm_pipeline(layers=layers)
        pipe.model.to("cuda")
        with decodekit.attach(pipe, specs):
            pipe(**kw)  # warm-up
            syncs[layers] = _device_syncs(lambda pipe=pipe: pipe(**kw))
    base = tiny_mdm_pipeline(layers=4)
    base.model.to("cuda")
    base_syncs = _device_syncs(lambda: base(**kw))
    print(f"device syncs: {variant} by depth {syncs}, no cache {base_syncs}, steps {kw['steps']}")
    # One sync per layer and step would add 3 * 8 = 24 from 1 to 4 layers; the tokens (and
    # so a per-step branch or two) may differ with depth.
    assert abs(syncs[4] - syncs[1]) < kw["steps"]
    # session 4, run 2: 126 against 47 (about 10 more a step); since then two reads a
    # step more than the uncached loop are expected (HostReads on the CPU: 5.75 vs 4.75)
    assert syncs[4] <= base_syncs + 4 * kw["steps"]


def test_masked_diffusion_baseline_on_cuda_matches_cpu():
    kw = dict(input_ids=MDM_PROMPTS, gen_length=16, block_length=8, steps=8)
    assert torch.equal(
        tiny_mdm_pipeline()(**kw).sequences.cpu(), _mdm_on_cuda()(**kw).sequences.cpu()
    )


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "superposed", "params": {"k": 1, "alpha": 0.0, "n_token_sample": 1}},
        {"name": "diverse-beam", "params": {"num_beam_groups": 2, "diversity_penalty": 0.7}},
    ],
)
def test_token_strategies_on_cuda_match_cpu(spec):
    def go(model):
        kw = dict(max_new_tokens=8, pad_token_id=0, do_sample=False)
        if spec["name"] == "diverse-beam":
            kw.update(num_beams=4, num_return_sequences=4)
        ids = torch.tensor(LM_PROMPTS, device=model.device)
        with decodekit.attach(model, [spec]):
            return model.generate(ids, **kw).cpu()

    cpu, gpu = on_both(lambda: tiny_llama(dtype=torch.float64), go)
    assert torch.equal(cpu, gpu)


def test_faster_diffusion_on_cuda_oracles():
    # Against a run on the same device: diffusers' own UNet on CUDA differs from
    # the CPU by ~1e-6 even in float64 (its time projection is float32), so the
    # oracles are the CPU suite's, on the GPU: every step a key step equals the
    # baseline exactly; the parallel decoder equals the sequential one.
    pipe = tiny_sd_pipeline().to("cuda", torch.float64)
    prompts = ["a red circle", "a blue square"]

    def go(specs):
        latents = sd_latents(pipe, 2, 0).to("cuda", torch.float64)
        with decodekit.attach(pipe, specs) as run:
            out = pipe(prompts, num_inference_steps=8, latents=latents, output_type="latent")
        return out.images, run.stats["strategies"].get("faster-diffusion", {})

    base, _ = go([])
    every, st = go([{"name": "faster-diffusion", "params": {"key_steps": "all"}}])
    assert torch.equal(every, base) and st["decoder_calls"] == 0
    outs = {}
    for parallel in (False, True):
        params = {"key_steps": "uniform-3", "parallel_decoder": parallel}
        outs[parallel], st = go(
            [
                {"name": "faster-diffusion", "params": params},
                {"name": "prior-noise", "params": {"prior_noise": 0.01}},
            ]
        )
        assert st["decoder_calls"] > 0
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-9, atol=1e-9)
