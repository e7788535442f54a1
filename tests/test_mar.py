"""The MAR model, its diffusion head, `MARPipeline`'s loop and the ``mar`` adapter.

Tiny random models (one block, width 32, an 8 x 8 token grid from a tiny
``AutoencoderKL`` of stride 2), float64 where a claim is about equality. The
schedule is checked against MAR's own formula written as its ``sample_tokens``
computes it (numpy cos/floor, clipped with torch); the model's outputs against a
plain re-computation from its weights are in tests/test_convert_mar.py.
"""

from __future__ import annotations

import json
import math
import re

import decodekit
import numpy as np
import pytest
import torch
from decodekit.errors import ConfigError
from decodekit.hookspecs import hookimpl
from decodekit.loops import AdapterView, MaskedAutoregressionAdapter, contract_of
from decodekit.pipelines.mar import (
    MARConfig,
    MARModel,
    named_betas,
    spaced_timesteps,
)
from decodekit.pipelines.mar_adapter import MARAdapter, MARInputs
from decodekit.pipelines.mar_pipeline import MARPipeline, guidance_scale, mask_schedule
from decodekit.session import attached_run
from decodekit.strategy import Strategy
from pydantic import ValidationError

CLASSES = ["red circle", "blue square", "green star"]
SMALL = dict(
    img_size=16,
    vae_stride=2,
    vae_embed_dim=4,
    encoder_embed_dim=32,
    encoder_depth=1,
    encoder_num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
    class_num=3,
    buffer_size=4,
    diffloss_d=2,
    diffloss_w=32,
    num_sampling_steps="6",
)


def tiny_model(seed: int = 0, **overrides) -> MARModel:
    """A random MAR whose head is not zero-initialised (so every weight matters), float64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MARModel(MARConfig(**{**SMALL, **overrides}))
        net = model.diffloss.net
        for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [
            net.final_layer.adaLN_modulation[-1],
            net.final_layer.linear,
        ]:
            torch.nn.init.normal_(layer.weight, std=0.05)
    return model.double().eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(8, 8),
            latent_channels=4,
            norm_num_groups=4,
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=16,
        )
    return vae.double().eval()


def tiny_pipe(seed: int = 0) -> MARPipeline:
    return MARPipeline(tiny_model(seed), tiny_vae(seed), CLASSES)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (see conftest)


@pytest.fixture(scope="module")
def pipe() -> MARPipeline:
    return tiny_pipe()


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


KW = dict(num_iter=8, cfg=3.0, output_type="latents")


# -- model shapes and files ---------------------------------------------------------------------
def test_config_derives_the_token_grid_as_mar_does():
    config = MARConfig(img_size=256, vae_stride=16, patch_size=2, vae_embed_dim=16)
    assert (config.seq_h, config.seq_len, config.token_embed_dim) == (8, 64, 64)
    assert MARConfig().num_sampling_steps == "100" and MARConfig().noise_schedule == "cosine"


def test_conditions_shape_and_patchify_round_trip():
    model = tiny_model(patch_size=2)  # 4 x 4 tokens of 16 numbers
    latents = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    tokens = model.patchify(latents)
    assert tokens.shape == (3, 16, 16) and torch.equal(model.unpatchify(tokens), latents)
    # token (row 1, column 2) holds the 2 x 2 latent patch there, channel-major
    assert torch.equal(tokens[0, 1 * 4 + 2], latents[0, :, 2:4, 4:6].reshape(-1))
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, 5:12] = True
    z = model.conditions(tokens, mask, model.class_embedding(torch.tensor([0, 1, 3])))
    assert z.shape == (3, 16, 32)


def test_unknown_tokens_values_do_not_matter_and_the_null_class_is_fake_latent():
    model = tiny_model()
    tokens = torch.randn(2, 64, 4, dtype=torch.float64)
    mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)).argsort(1) < 20
    emb = model.class_embedding(torch.tensor([1, 3]))
    assert torch.equal(emb[1], model.fake_latent[0]) and torch.equal(
        emb[0], model.class_emb.weight[1]
    )
    z = model.conditions(tokens, mask, emb)
    changed = torch.where(mask[..., None], torch.randn_like(tokens), tokens)
    assert torch.equal(model.conditions(changed, mask, emb), z)
    known = torch.where(mask[..., None], tokens, torch.randn_like(tokens))
    assert not torch.allclose(model.conditions(known, mask, emb), z)


def test_rows_with_different_unknown_counts_are_refused():
    model = tiny_model()
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match=r"same number of unknown tokens, got \[3, 0\]"):
        model.conditions(torch.zeros(2, 64, 4), mask, model.class_embedding(torch.tensor([0, 1])))


def test_save_and_load_keep_every_weight_and_the_config(tmp_path):
    model = tiny_model(num_sampling_steps="3,2")
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_sampling_steps"] == "3,2"
    loaded = MARModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    for (k, a), (j, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == j and torch.equal(a, b)
    assert loaded.diffloss.sample_schedule.timesteps.tolist() == [0, 250, 499, 500, 999]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(img_size=20, vae_stride=16), "multiple of vae_stride"),
        (dict(encoder_embed_dim=30, encoder_num_heads=4), "encoder_embed_dim"),
        (dict(num_sampling_steps="ddim"), "step count like '100'"),
        (dict(num_sampling_steps="1"), "at least 2 steps"),
        (dict(num_sampling_steps="2000"), "cannot take 2000 steps"),
        (dict(noise_schedule="sigmoid"), "noise_schedule"),
        (dict(class_num=0), "class_num must be >= 1"),
        (dict(buffer_size=1.5), "buffer_size must be an int"),
    ],
)
def test_bad_configs_are_refused_naming_the_value(bad, message):
    with pytest.raises(ValueError, match=message):
        MARConfig(**{**SMALL, **bad})


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a MAR model folder"):
        MARModel.from_pretrained(tmp_path)
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['depth'\]"):
        MARModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "decoder_depth": 2}))
    with pytest.raises(RuntimeError, match="decoder_blocks.1"):  # a weight the file lacks
        MARModel.from_pretrained(tmp_path)


# -- the diffusion head ---------------------------------------------------------------------------
def test_respacing_and_schedules_are_improved_ddpms():
    kept = spaced_timesteps(1000, "100")
    assert len(kept) == 100 and kept[:3] == [0, 10, 20] and kept[-1] == 999
    assert spaced_timesteps(1000, "10,5") == sorted(
        set([round(j * 499 / 9) for j in range(10)] + [500 + round(j * 499 / 4) for j in range(5)])
    )
    cosine = named_betas("cosine", 1000)
    assert cosine.dtype == torch.float64 and float(cosine[-1]) == 0.999
    assert float(named_betas("linear", 1000)[0]) == pytest.approx(1e-4)
    head = tiny_model().diffloss
    sched = head.sample_schedule
    # respacing keeps the kept steps' cumulative alphas
    base = torch.cumprod(1 - cosine, 0)
    assert torch.allclose(sched.alphas_cumprod, base[sched.timesteps], rtol=1e-12, atol=0)


def test_head_sample_is_its_trajectorys_end_and_a_function_of_the_noise():
    head = tiny_model().diffloss
    z, zu = torch.randn(5, 32, dtype=torch.float64), torch.randn(5, 32, dtype=torch.float64)
    noise = head.draw_noise(5, gens(1)[0], dtype=torch.float64)
    assert noise.shape == (5, head.num_steps, 4)
    x = head.sample(z, 0.8, 2.5, z_uncond=zu, noise=noise)
    traj = head.sample(z, 0.8, 2.5, z_uncond=zu, noise=noise, trajectory=True)
    assert torch.equal(traj.sample, x) and traj.states.shape == (head.num_steps + 1, 5, 4)
    assert torch.equal(traj.states[0], noise[:, 0])
    # each step is its Gaussian's mean plus temperature * std * the step's noise; the last adds none
    S = head.num_steps
    for k in range(S):
        std = (0.5 * traj.log_variances[k]).exp() * 0.8
        added = noise[:, k + 1] * std if k < S - 1 else 0
        torch.testing.assert_close(traj.states[k + 1], traj.means[k] + added, rtol=0, atol=1e-12)
    # a per-token generator list draws what each generator alone draws
    one = head.draw_noise(2, gens(7, 8), dtype=torch.float64)
    assert torch.equal(one[1], head.draw_noise(1, gens(8)[0], dtype=torch.float64)[0])


def test_guidance_mixes_the_noise_predictions_and_keeps_the_conditional_variance():
    head = tiny_model().diffloss
    x = torch.randn(4, 4, dtype=torch.float64)
    z, zu = torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64)
    i = head.num_steps - 2
    t = head.sample_schedule.timesteps[i].repeat(4)
    eps_c, v_c = head.net(x, t, z).chunk(2, dim=-1)
    eps_u, _ = head.net(x, t, zu).chunk(2, dim=-1)
    mean, log_var = head.step_distribution(x, i, z, 3.0, zu)
    want_mean, want_log_var = head._mean_log_variance(
        head.sample_schedule, x, torch.full((4,), i), eps_u + 3.0 * (eps_c - eps_u), v_c
    )
    torch.testing.assert_close(mean, want_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_var, want_log_var, rtol=0, atol=1e-12)
    plain = head.step_distribution(x, i, z)
    torch.testing.assert_close(
        head.step_distribution(x, i, z, 1.0, zu)[0], plain[0], rtol=0, atol=1e-12
    )


def test_per_row_steps_give_each_rows_own_step():
    """A step tensor (one step per row, as density evaluation uses) gives what one call a step gives."""
    head = tiny_model().diffloss
    S = head.num_steps
    x = torch.randn(S, 3, 4, dtype=torch.float64)
    z, zu = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    steps = torch.arange(S).repeat_interleave(3)
    mean, log_var = head.step_distribution(
        x.reshape(-1, 4), steps, z.repeat(S, 1), 2.5, zu.repeat(S, 1)
    )
    for i in range(S):
        m, lv = head.step_distribution(x[i], i, z, 2.5, zu)
        torch.testing.assert_close(mean.view(S, 3, 4)[i], m, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(log_var.view(S, 3, 4)[i], lv, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="per-row steps must be"):
        head.step_distribution(x[0], torch.arange(2), z)


def test_head_refuses_the_global_rng_and_wrong_noise():
    head = tiny_model().diffloss
    with pytest.raises(ValueError, match="explicit generator"):
        head.sample(torch.zeros(2, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="2 generators for 3 tokens"):
        head.draw_noise(3, gens(1, 2))
    with pytest.raises(ValueError, match=r"noise must be \(n, S, D\)"):
        head.sample(torch.zeros(2, 32), noise=torch.zeros(2, 3, 4))


def test_training_loss_trains_the_head_and_the_transformer():
    model = tiny_model().float().train()
    tokens = torch.randn(2, 64, 4)
    loss = model.training_loss(tokens, torch.tensor([0, 2]), generator=gens(0)[0])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name in (
        "z_proj.weight",
        "encoder_blocks.0.attn.qkv.weight",
        "decoder_blocks.0.mlp.fc1.weight",
    ):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    assert model.diffloss.net.final_layer.linear.weight.grad.abs().sum() > 0
    # the same generator draws the same orders, masks, timesteps and noise
    again = model.training_loss(tokens, torch.tensor([0, 2]), generator=gens(0)[0])
    model.eval()
    assert again.item() != 0


def test_head_loss_is_mse_plus_the_bound_that_trains_the_variance():
    head = tiny_model().float().diffloss
    target, z = torch.randn(64, 4), torch.randn(64, 32)
    loss = head.loss(target, z, generator=gens(0)[0])
    loss.backward()
    weight = head.net.final_layer.linear.weight.grad  # rows 0..3 predict eps, 4..7 the variance
    assert weight[:4].abs().sum() > 0 and weight[4:].abs().sum() > 0
    masked = head.loss(target, z, torch.zeros(64).index_fill(0, torch.arange(8), 1.0), gens(0)[0])
    assert torch.isfinite(masked)


# -- the loop -------------------------------------------------------------------------------------
def official_mask_lens(seq_len: int, num_iter: int) -> list[int]:
    """``mask_len`` of each step as MAR's ``sample_tokens`` computes it (numpy, then torch clipping)."""
    mask = torch.ones(1, seq_len)
    out = []
    for step in range(num_iter):
        mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = torch.Tensor([np.floor(seq_len * mask_ratio)])
        mask_len = torch.maximum(
            torch.Tensor([1]), torch.minimum(torch.sum(mask, dim=-1, keepdims=True) - 1, mask_len)
        )
        out.append(int(mask_len[0].item()))
        mask = torch.zeros(1, seq_len)
        mask[0, : int(mask_len[0].item())] = 1
    return out


@pytest.mark.parametrize(
    "seq_len, num_iter", [(256, 64), (256, 256), (64, 8), (64, 64), (16, 1), (5, 4)]
)
def test_cosine_schedule_equals_mars_formula(seq_len, num_iter):
    assert mask_schedule(seq_len, num_iter) == official_mask_lens(seq_len, num_iter)


def test_each_step_reveals_the_schedules_count_in_reverse_order(pipe):
    decoder = pipe.decoder_for([0, 1], num_iter=8, cfg=1.0, generator=gens(1, 2))
    lens = mask_schedule(64, 8)
    seen = torch.zeros(2, 64, dtype=torch.long)
    while decoder.step < 8:
        step = decoder.step
        pos = decoder.positions(step)
        before = decoder.mask.clone()
        decoder.run_step()
        assert int(decoder.mask[0].sum()) == (lens[step] if step < 7 else 0)
        assert bool(before.gather(1, pos).all()) and not bool(decoder.mask.gather(1, pos).any())
        # MAR's mask_by_order keeps the head of the order masked: reveal its tail first
        assert torch.equal(
            pos, decoder.orders[:, decoder.masked_after(step) : decoder.masked_after(step - 1)]
        )
        seen.scatter_add_(1, pos, torch.ones_like(pos))
        rows = torch.stack([decoder.noise[b, pos[b]] for b in range(2)]).flatten(0, 1)
        assert torch.equal(decoder.gather_step(decoder.noise, step), rows)  # (B * k, S, D)
    assert bool((seen == 1).all())  # every position revealed exactly once


def test_linear_and_constant_guidance_are_mars():
    # MAR: cfg_iter = 1 + (cfg - 1) * (N - mask_len) / N with the step's clipped mask_len
    assert guidance_scale(4.0, "linear", 48, 64) == 1 + 3.0 * 16 / 64
    assert guidance_scale(4.0, "constant", 48, 64) == 4.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        guidance_scale(4.0, "cosine", 48, 64)


def test_guidance_paths(pipe):
    unguided = pipe([0, 1], num_iter=4, cfg=1.0, generator=gens(1, 2), output_type="latents")
    assert pipe.decoder.guided is False and unguided.forwards == 4
    linear = pipe([0, 1], num_iter=4, cfg=3.0, generator=gens(1, 2), output_type="latents")
    constant = pipe(
        [0, 1],
        num_iter=4,
        cfg=3.0,
        cfg_schedule="constant",
        generator=gens(1, 2),
        output_type="latents",
    )
    assert pipe.decoder.guided and linear.forwards == 4  # a guided forward counts once
    assert not torch.allclose(linear.tokens, constant.tokens)
    assert not torch.allclose(linear.tokens, unguided.tokens)
    assert pipe.decoder.guidance(3) == 3.0
    # the linear ramp's last step: 1 + (cfg - 1) * (N - 1) / N, not cfg (mask_len is clipped to 1)
    decoder = pipe.decoder_for([0], num_iter=4, cfg=3.0, generator=gens(1))
    assert decoder.guidance(3) == 1 + 2.0 * 63 / 64
    assert decoder.guidance(0) == 1 + 2.0 * (64 - mask_schedule(64, 4)[0]) / 64


def test_each_row_equals_the_same_row_alone_with_its_generator(pipe):
    batch = pipe([0, "blue square", 2], generator=gens(5, 6, 7), **KW)
    for i, (label, seed) in enumerate([(0, 5), (1, 6), (2, 7)]):
        alone = pipe([label], generator=gens(seed), **KW)
        torch.testing.assert_close(alone.tokens[0], batch.tokens[i], rtol=0, atol=1e-9)
    other = pipe([0, 1, 2], generator=gens(5, 6, 8), **KW)
    torch.testing.assert_close(other.tokens[:2], batch.tokens[:2], rtol=0, atol=1e-9)
    assert not torch.allclose(other.tokens[2], batch.tokens[2])


def test_the_same_seeds_give_the_same_images_and_others_differ(pipe):
    a = pipe([0, 1], num_iter=6, cfg=2.0, generator=gens(1, 2))
    b = pipe([0, 1], num_iter=6, cfg=2.0, generator=gens(1, 2))
    c = pipe([0, 1], num_iter=6, cfg=2.0, generator=gens(3, 4))
    assert torch.equal(a.tokens, b.tokens) and not torch.allclose(a.tokens, c.tokens)
    assert len(a.images) == 2 and a.images[0].size == (16, 16)
    assert np.array_equal(np.asarray(a.images[1]), np.asarray(b.images[1]))
    assert a.latents.shape == (2, 4, 8, 8) and torch.equal(pipe.model.patchify(a.latents), a.tokens)


def test_temperature_scales_only_the_heads_noise(pipe):
    cold = pipe([0], num_iter=4, cfg=1.0, temperature=0.0, generator=gens(1), output_type="latents")
    warm = pipe([0], num_iter=4, cfg=1.0, temperature=1.0, generator=gens(1), output_type="latents")
    assert not torch.allclose(cold.tokens, warm.tokens)
    # at temperature 0 a token is the head's deterministic path from its x_T
    decoder = pipe.decoder_for([0], num_iter=4, cfg=1.0, temperature=0.0, generator=gens(1))
    z, _ = decoder.conditions(pipe.model)
    values = decoder.sample(pipe.model, z, None, 0)
    noise = decoder.noise.clone()
    noise[..., 1:, :] = 99.0  # noise of later head steps: unused at temperature 0
    decoder.noise = noise
    torch.testing.assert_close(decoder.sample(pipe.model, z, None, 0), values, rtol=0, atol=0)


def test_pipeline_save_and_load_keep_the_samples(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "mar.json").read_text())["class_names"] == CLASSES
    loaded = MARPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.float64)
    a = pipe(["green star", 0], generator=gens(1, 2), num_iter=4, cfg=2.0)
    b = loaded(["green star", 0], generator=gens(1, 2), num_iter=4, cfg=2.0)
    assert torch.equal(a.tokens, b.tokens)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    with pytest.raises(ValueError, match="not a mar folder"):
        MARPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(class_labels=["purple circle"]),
            "unknown class name 'purple circle'; known: 'red circle'",
        ),
        (dict(class_labels=[3]), r"ints in \[0, 2\]"),
        (dict(class_labels=[]), r"non-empty list"),
        (dict(class_labels=[True]), r"ints in \[0, 2\]"),
        (dict(num_iter=0), r"num_iter must be an int in \[1, 64\]"),
        (dict(num_iter=65), r"num_iter must be an int in \[1, 64\]"),
        (dict(num_iter=4.0), r"num_iter must be an int"),
        (dict(cfg=float("nan")), "cfg must be a finite number"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(cfg_schedule="cosine"), "cfg_schedule must be one of"),
        (dict(generator=None), "explicit generator"),
        (dict(generator=gens(1)), "got 1 generators for 2 rows"),
        (dict(output_type="np"), "output_type must be"),
    ],
)
def test_bad_call_arguments_are_refused_clearly(pipe, kwargs, message):
    call = {"class_labels": [0, 1], "num_iter": 4, "generator": gens(1, 2), **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(**call)


def test_a_vae_or_model_that_does_not_fit_is_refused(pipe):
    with pytest.raises(ValueError, match=r"latent_channels 4 \(vae_embed_dim 8\)"):
        MARPipeline(tiny_model(vae_embed_dim=8), pipe.vae)
    with pytest.raises(ValueError, match=r"stride 2 \(vae_stride 4\)"):
        MARPipeline(tiny_model(vae_stride=4, img_size=32), pipe.vae)
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        MARPipeline(tiny_model(), pipe.vae, CLASSES[:2])
    decoder = pipe.decoder_for([0], num_iter=4, generator=gens(1))
    with pytest.raises(ValueError, match=r"class_num 5 \(the pipeline has 3\)"):
        decoder.conditions(tiny_model(class_num=5))
    with pytest.raises(TypeError, match="runs a MARModel"):
        decoder.conditions(torch.nn.Linear(2, 2))
    z, zu = decoder.conditions(pipe.model)
    with pytest.raises(ValueError, match="share num_sampling_steps"):
        decoder.sample(tiny_model(num_sampling_steps="4"), z, zu, 0)
    with pytest.raises(ValueError, match=r"values must be \(1, 5, 4\)"):
        decoder.commit(torch.zeros(1, 3, 4))


def test_generate_keeps_no_autograd_graph(pipe):
    out = pipe([0], num_iter=2, generator=gens(1), output_type="latents")
    assert not out.tokens.requires_grad and out.tokens.grad_fn is None


# -- the hook and the adapter ---------------------------------------------------------------------
class StepTaker(Strategy):
    """Takes ``span`` steps at a time from ``start`` on, with ``model``, through the decoder's API."""

    name = "test-mar-steps"
    loops = ("masked-autoregression",)

    def __init__(self, model=None, start: int = 0, span: int = 2, report=None):
        super().__init__()
        self.model, self.start, self.span, self.report = model, start, span, report
        self.calls: list[int] = []

    @hookimpl
    def decodekit_mar_step(self, run, decoder):
        self.calls.append(decoder.step)
        if decoder.step < self.start:
            return None
        model = self.model or decoder.model
        todo = min(self.span, decoder.num_iter - decoder.step)
        for _ in range(todo):
            z, zu = decoder.conditions(model)
            decoder.commit(decoder.sample(model, z, zu, decoder.step))
        return todo if self.report is None else self.report


def test_attach_exposes_the_contract_and_detach_restores(pipe):
    forward = pipe.model.forward
    with decodekit.attach(pipe, []) as run:
        assert run.loop == "masked-autoregression" and isinstance(run.adapter, AdapterView)
        for name in contract_of(run.loop):
            getattr(run.adapter, name)
        out = pipe([0, 1], generator=gens(1, 2), **KW)
        assert run.adapter.model is pipe.model and run.adapter.vae is pipe.vae
        assert run.adapter.step == out.forwards == 8 and run.last["nfe"] == 8
        assert run.adapter.decoder is pipe.decoder
    assert attached_run(pipe) is None and pipe.model.forward == forward
    assert issubclass(MARAdapter, MaskedAutoregressionAdapter)


@pytest.mark.parametrize("start, span", [(0, 1), (3, 2), (5, 8)])
def test_a_strategy_taking_steps_through_the_decoder_reproduces_the_plain_call(pipe, start, span):
    plain = pipe([0, 2], generator=gens(1, 2), **KW)
    taker = StepTaker(start=start, span=span)
    with decodekit.attach(pipe, [taker]) as run:
        out = pipe([0, 2], generator=gens(1, 2), **KW)
    assert torch.equal(out.tokens, plain.tokens) and run.last["nfe"] == 8
    assert taker.calls[: start + 1] == list(range(start + 1))


def test_another_models_steps_are_counted_under_its_name(pipe):
    other = tiny_model(seed=1)
    with decodekit.attach(pipe, [StepTaker(other, start=2, span=3)]) as run:
        out = pipe([0], generator=gens(1), **KW)
    assert out.stats["models"]["model"]["forwards"] == 2
    assert out.stats["models"]["model-1"]["forwards"] == 6 and run.last["nfe"] == 8
    plain = pipe([0], generator=gens(1), **KW)
    assert not torch.allclose(out.tokens, plain.tokens)


def test_a_step_count_that_does_not_match_the_decoder_is_refused_and_detaches(pipe):
    with decodekit.attach(pipe, [StepTaker(span=2, report=1)]) as run:
        with pytest.raises(ValueError, match="returned 1 but the decoder went from step 0 to 2"):
            pipe([0], generator=gens(1), **KW)
    assert not run.attached and attached_run(pipe) is None


def test_adapter_loads_runs_saves_and_compares(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    loaded = MARAdapter.load(str(tmp_path / "m"), device="cpu", dtype="float64", options={})
    assert MARAdapter.matches(loaded) and not MARAdapter.matches(pipe.model)
    inputs = MARInputs(
        prompt=[CLASSES[0], 2, "blue square"], num_iter=4, cfg=2.0, seed=3, batch_size=2
    )
    assert inputs.prompt == [CLASSES[0], "class 2", CLASSES[1]]
    images = MARAdapter.generate(loaded, inputs)
    assert len(images) == 3 and images[0].size == (16, 16)
    # rows seeded from their prompt: the same prompt gives the same image anywhere in the list
    moved = MARAdapter.generate(loaded, inputs.model_copy(update={"prompt": inputs.prompt[::-1]}))
    assert MARAdapter.quality(images, moved[::-1])["psnr"] > 60
    files = MARAdapter.save(images, tmp_path / "out", inputs=inputs)
    assert [f.name for f in files][0] == "000-red-circle.png"
    with pytest.raises(ConfigError, match="not a mar folder"):
        MARAdapter.load(str(tmp_path), device="cpu", dtype="float64", options={})


@pytest.mark.parametrize(
    "bad",
    [
        {"cfg": -1},
        {"temperature": -1},
        {"num_iter": 0},
        {"cfg_schedule": "cosine"},
        {"prompt": []},
        {"prompt": [True]},
        {"batch_size": 0},
        {"top_k": 3},
    ],
)
def test_inputs_out_of_range_are_refused(bad):
    with pytest.raises(ValidationError):
        MARInputs(**{"prompt": [0], **bad})


def test_decodekit_validate_run_and_bench_from_yaml(pipe, tmp_path, capsys):
    import yaml
    from decodekit.cli import main

    pipe.save_pretrained(tmp_path / "m")
    config = {
        "pipeline": {"type": "mar", "model": str(tmp_path / "m"), "dtype": "float64"},
        "inputs": {"prompt": ["blue square", 0], "num_iter": 4, "cfg": 2.0, "seed": 1},
        "output": {"dir": str(tmp_path / "out")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["plugins"]) == 0
    assert re.search(r"\bmar\b.*loop: masked-autoregression", capsys.readouterr().out)
    assert main(["validate", str(tmp_path / "c.yaml")]) == 0
    assert main(["run", str(tmp_path / "c.yaml")]) == 0
    assert "model calls: 4" in capsys.readouterr().out  # one forward per step, both rows at once
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [o["file"] for o in run["outputs"]] == ["000-blue-square.png", "001-class-0.png"]
    assert main(["bench", str(tmp_path / "c.yaml"), "--repeat", "1"]) == 0
    assert "identical" in capsys.readouterr().out  # no strategy: the baseline's images again
    config["inputs"]["prompt"] = ["purple circle"]
    config["output"]["dir"] = str(tmp_path / "out2")
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "unknown.yaml")]) != 0
    assert "unknown class name 'purple circle'; known: 'red circle'" in capsys.readouterr().err
    config["inputs"]["cfg_schedule"] = "cosine"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["validate", str(tmp_path / "bad.yaml")]) != 0
    assert "inputs.cfg_schedule" in capsys.readouterr().err


def test_orders_and_head_noise_do_not_depend_on_the_models_dtype(pipe):
    import copy

    single = MARPipeline(
        copy.deepcopy(pipe.model).float(), copy.deepcopy(pipe.vae).float(), CLASSES
    )
    a = pipe.decoder_for([0, 1], num_iter=4, generator=gens(1, 2))
    b = single.decoder_for([0, 1], num_iter=4, generator=gens(1, 2))
    assert a.noise.dtype == torch.float64 and b.noise.dtype == torch.float32
    assert torch.equal(a.orders, b.orders) and torch.equal(a.noise.float(), b.noise)


def test_the_shapes_judge_reads_mar_outputs():
    from types import SimpleNamespace

    from decodekit.pipelines.judges import shapes_judge_metric
    from decodekit.pipelines.zoo.shapes_data import parse_caption, render_scene

    captions = ["a small red circle on the left", "a large blue square at the top"]
    images = [render_scene(parse_caption(c)) for c in captions]
    inputs = SimpleNamespace(prompt=["red circle", "blue square"], num_images_per_prompt=1)
    same = shapes_judge_metric("mar", images, images, inputs)
    assert same["judge_shape_colour_baseline"] == 1.0
    swapped = shapes_judge_metric("mar", images, images[::-1], inputs)
    assert swapped["judge_shape_colour_strategy"] == 0.0


def test_released_sizes_have_the_papers_parameter_counts():
    from decodekit.pipelines.mar import PRESETS

    counts = {}
    with torch.device("meta"):
        for name, sizes in PRESETS.items():
            model = MARModel(MARConfig(**sizes))
            counts[name] = round(sum(p.numel() for p in model.parameters()) / 1e6)
    assert counts == {"mar_base": 208, "mar_large": 478, "mar_huge": 942}  # paper: 208M, 479M, 943M
