"""The VAR transformer and `VARPipeline` against VAR's own code, and the scale loop's properties.

The oracle is tests/fixtures/var_tiny (fixtures/var_tiny/make.py): a tiny random
VAR (depth 2, width 32, scales 1/2/3/5, 4 classes) in the official layout, in
two variants (``var.pt``: ``attn_l2_norm`` with per-block ``ada_lin``, as
released; ``var_shared.pt``: ``shared_aln`` without ``attn_l2_norm``), with
what FoundationVision/VAR's ``autoregressive_infer_cfg`` sampled from it
greedily (``top_k=1``, with and without guidance) at every scale, the images
it decoded, one row it sampled with top-k/top-p from a seed (also with
``more_smooth``), and its teacher-forced ``forward`` logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from decodekit.pipelines.var import (
    ScaleDecoder,
    ScaleKVCache,
    VARPipeline,
    VARTransformer,
    guidance_ramp,
)
from decodekit.pipelines.var_vq import MultiScaleVQConfig, MultiScaleVQVAE
from decodekit.sampler import Sampler
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "var_tiny"
META = json.loads((FIXTURE / "oracle.json").read_text())
VARIANTS = list(META["var"]["variants"])


@pytest.fixture(scope="module")
def oracle() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "oracle.safetensors")


@pytest.fixture(scope="module")
def vq() -> MultiScaleVQVAE:
    model = MultiScaleVQVAE(MultiScaleVQConfig(**META["vae"]))
    state = torch.load(FIXTURE / "vae.pt", weights_only=True)
    state.pop("quantize.ema_vocab_hit_SV")  # a training statistic
    model.load_weights({k: v.float() for k, v in state.items()})
    return model


def official_transformer(vq: MultiScaleVQVAE, variant: str) -> VARTransformer:
    args = META["var"]["args"]
    model = VARTransformer(
        num_classes=args["num_classes"],
        depth=args["depth"],
        embed_dim=args["embed_dim"],
        num_heads=args["num_heads"],
        mlp_ratio=args["mlp_ratio"],
        norm_eps=args["norm_eps"],
        patch_nums=vq.patch_nums,
        vocab_size=vq.vocab_size,
        vae_embed_dim=vq.embed_dim,
        **META["var"]["variants"][variant],
    )
    model.load_official_state_dict(torch.load(FIXTURE / f"{variant}.pt", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def pipes(vq) -> dict[str, VARPipeline]:
    return {v: VARPipeline(official_transformer(vq, v), vq) for v in VARIANTS}


@pytest.fixture(scope="module")
def pipe64(pipes) -> VARPipeline:
    """The released-layout variant in float64, where prefill and incremental logits must agree."""
    return VARPipeline(
        copy.deepcopy(pipes["var"].transformer).double(), copy.deepcopy(pipes["var"].vq).double()
    )


def rnd_maps(oracle) -> list[torch.Tensor]:
    return [oracle[f"vae.rnd_idx.{si}"] for si in range(len(META["vae"]["v_patch_nums"]))]


# -- VAR's own outputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_forced_logits_equal_vars_forward(pipes, oracle, variant):
    logits, targets = pipes[variant].teacher_forced(
        oracle[f"{variant}.tf_labels"], rnd_maps(oracle)
    )
    torch.testing.assert_close(logits, oracle[f"{variant}.tf_logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, torch.cat(rnd_maps(oracle), dim=1))


@pytest.mark.parametrize("cfg", META["var"]["cfgs"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_token_maps_and_images_equal_autoregressive_infer_cfg(pipes, oracle, variant, cfg):
    out = pipes[variant](META["var"]["labels"], cfg=cfg, temperature=0)
    for si, tokens in enumerate(out.token_maps):
        assert torch.equal(tokens, oracle[f"{variant}.cfg{cfg:g}.tokens.{si}"]), f"scale {si}"
    pixels = pipes[variant].vq.fhat_to_img(out.f_hat).add(1).mul(0.5)  # VAR returns [0, 1]
    torch.testing.assert_close(pixels, oracle[f"{variant}.cfg{cfg:g}.img"], rtol=0, atol=1e-5)
    assert len(out.images) == len(META["var"]["labels"]) and out.images[0].size == (10, 10)
    assert out.forwards == len(out.token_maps)  # one forward per scale, guided rows included


def test_top_k_1_sampling_equals_greedy(pipes, oracle):
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    out = pipes["var"](
        META["var"]["labels"], cfg=3.0, top_k=1, generator=gens, output_type="tokens"
    )
    assert out.images is None
    for si, tokens in enumerate(out.token_maps):
        assert torch.equal(tokens, oracle[f"var.cfg3.tokens.{si}"])


@pytest.mark.parametrize("more_smooth", [False, True])
def test_a_sampled_row_equals_vars_with_its_seed(pipes, oracle, more_smooth):
    s = META["var"]["sampled"]
    out = pipes["var"](
        [s["label"]],
        cfg=s["cfg"],
        top_k=s["top_k"],
        top_p=s["top_p"],
        generator=torch.Generator().manual_seed(s["seed"]),
        more_smooth=more_smooth,
    )
    # more_smooth feeds code mixtures on, so its later scales differ: its image is the check
    for si, tokens in enumerate(out.token_maps[: 1 if more_smooth else None]):
        assert torch.equal(tokens, oracle[f"var.sampled.tokens.{si}"]), f"scale {si}"
    pixels = pipes["var"].vq.fhat_to_img(out.f_hat).add(1).mul(0.5)
    want = oracle["var.smooth.img" if more_smooth else "var.sampled.img"]
    torch.testing.assert_close(pixels, want, rtol=0, atol=1e-5)


def test_oracle_fails_with_the_other_variants_weights(vq, pipes, oracle):
    # the same weights under the other attention/modulation code give other tokens: the
    # oracle tells the variants apart
    out = pipes["var_shared"](META["var"]["labels"], cfg=3.0, temperature=0, output_type="tokens")
    assert not all(
        torch.equal(t, oracle[f"var.cfg3.tokens.{si}"]) for si, t in enumerate(out.token_maps)
    )


# -- the loop's own properties -----------------------------------------------------------------------


def test_prefill_logits_equal_incremental_logits(pipe64, oracle):
    model, vq = pipe64.transformer, pipe64.vq
    maps = rnd_maps(oracle)
    inputs = vq.teacher_inputs(maps)  # (B, L - 1, Cvae)
    emb = model.class_emb(oracle["var.tf_labels"])
    whole = model(oracle["var.tf_labels"], inputs)  # block-causal, no cache
    spans = model.begin_ends
    cache = ScaleKVCache(len(model.blocks))
    steps = [model.logits_for_scales(emb, None, 0, 1, cache)]
    for si in range(1, model.num_scales):  # one scale at a time from the per-scale K/V
        b, e = spans[si]
        steps.append(model.logits_for_scales(emb, inputs[:, b - 1 : e - 1], si, si + 1, cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=0, atol=1e-10)
    # a prefill of the first scales into a fresh cache, then increments
    cache = ScaleKVCache(len(model.blocks))
    pre = model.logits_for_scales(emb, inputs[:, : spans[2][1] - 1], 0, 3, cache)
    b, e = spans[3]
    last = model.logits_for_scales(emb, inputs[:, b - 1 : e - 1], 3, 4, cache)
    torch.testing.assert_close(torch.cat((pre, last), dim=1), whole, rtol=0, atol=1e-10)
    assert cache.num_scales == 4 and cache.keys[0].shape[2] == model.seq_len


def test_block_causal_attention_ignores_later_scales(pipe64, oracle):
    model, vq = pipe64.transformer, pipe64.vq
    maps = rnd_maps(oracle)
    changed = [m.clone() for m in maps]
    changed[2] = (changed[2] + 1) % vq.vocab_size  # changes the inputs of scale 3 only
    a = model(oracle["var.tf_labels"], vq.teacher_inputs(maps))
    b = model(oracle["var.tf_labels"], vq.teacher_inputs(changed))
    first_three = model.begin_ends[2][1]
    assert torch.equal(a[:, :first_three], b[:, :first_three])
    assert not torch.allclose(a[:, first_three:], b[:, first_three:])


@pytest.mark.parametrize("switch", [1, 3])
def test_another_model_object_taking_over_reproduces_the_plain_call(pipe64, switch):
    # a second model with the same weights takes over at scale `switch` after one prefill
    # over the earlier scales; the first model's cache is freed; the generators carry on
    labels, kw = [0, 3, 1], dict(cfg=2.0, top_k=8, top_p=0.9, temperature=1.3)
    plain = pipe64(labels, generator=[torch.Generator().manual_seed(i) for i in range(3)], **kw)
    other = copy.deepcopy(pipe64.transformer)
    decoder = pipe64.decoder_for(
        labels, generator=[torch.Generator().manual_seed(i) for i in range(3)], **kw
    )
    for si in range(decoder.num_scales):
        decoder.run_scale(pipe64.transformer if si < switch else other)
        if si == switch < decoder.num_scales - 1:  # the first model's K/V are gone
            assert decoder.model is other and decoder.cache.num_scales == switch + 1
    assert decoder.cache is None  # freed once the last scale is done
    for a, b in zip(plain.token_maps, decoder.token_maps):
        assert torch.equal(a, b)
    torch.testing.assert_close(plain.f_hat, decoder.f_hat, rtol=0, atol=1e-12)
    per = decoder.stats["models"]
    assert per["transformer"]["scales"] == switch
    assert per["model-1"]["prefills"] == 1 and per["model-1"]["scales"] == 4 - switch


def test_each_row_equals_the_same_row_alone_with_its_generator(pipes):
    pipe = pipes["var"]
    labels, seeds = [1, 2, 1], [5, 6, 7]
    kw = dict(cfg=2.5, top_k=10, top_p=0.95, temperature=[1.0, 1.2, 0.9, 0.8])
    batch = pipe(labels, generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    rows = [
        pipe([c], generator=torch.Generator().manual_seed(s), output_type="tokens", **kw)
        for c, s in zip(labels, seeds)
    ]
    for i, row in enumerate(rows):
        for si, tokens in enumerate(row.token_maps):
            assert torch.equal(tokens[0], batch.token_maps[si][i])
    assert not torch.equal(
        batch.token_maps[-1][0], batch.token_maps[-1][2]
    )  # same class, other seed


def test_guidance_ramp_is_vars():
    assert [guidance_ramp(4.0, si, 5) for si in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_temperature_order_is_a_sampler_setting():
    logits = torch.tensor([[2.0, 1.5, 1.0, -1.0]])
    first = Sampler(temperature=3.0, top_p=0.7).probs(logits)
    last = Sampler(temperature=3.0, top_p=0.7, temperature_last=True).probs(logits)
    # at temperature 3 the nucleus of the flattened distribution keeps more tokens than VAR's
    assert int((first > 0).sum()) > int((last > 0).sum()) == 2
    torch.testing.assert_close(last[0, :2], (logits[0, :2] / 3).softmax(-1))


def test_per_scale_settings_reach_their_scale(pipes):
    pipe = pipes["var"]
    gens = [torch.Generator().manual_seed(0)]
    # greedy at every scale but the last: the first scales equal the greedy call
    out = pipe([2], cfg=3.0, temperature=[0, 0, 0, 5.0], generator=gens, output_type="tokens")
    assert [s.temperature for s in pipe.decoder.samplers] == [0, 0, 0, 5.0]
    greedy = pipe([2], cfg=3.0, temperature=0, output_type="tokens")
    for a, b in zip(out.token_maps[:3], greedy.token_maps[:3]):
        assert torch.equal(a, b)
    assert not torch.equal(out.token_maps[3], greedy.token_maps[3])


def test_save_and_load_keep_the_samples(pipes, tmp_path):
    pipe = VARPipeline(pipes["var"].transformer, pipes["var"].vq, ["a", "b", "c", "d"])
    pipe.save_pretrained(tmp_path / "var")
    loaded = VARPipeline.from_pretrained(tmp_path / "var")
    a = pipe(["c", 0], cfg=3.0, temperature=0, output_type="tokens")
    b = loaded(["c", 0], cfg=3.0, temperature=0, output_type="tokens")
    assert loaded.class_names == ["a", "b", "c", "d"]
    for x, y in zip(a.token_maps, b.token_maps):
        assert torch.equal(x, y)


def test_from_transformer_builds_a_fitting_model_without_touching_the_global_rng(vq):
    state = torch.random.get_rng_state()
    a = VARPipeline.from_transformer(vq, num_classes=3, depth=1, embed_dim=16, num_heads=2, seed=4)
    b = VARPipeline.from_transformer(vq, num_classes=3, depth=1, embed_dim=16, num_heads=2, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.transformer.config.patch_nums == tuple(vq.patch_nums)
    assert torch.equal(a.transformer.pos_1LC, b.transformer.pos_1LC)
    out = a([0, 2], cfg=1.0, temperature=0, output_type="tokens")
    assert [t.shape[1] for t in out.token_maps] == [p * p for p in vq.patch_nums]


# -- clear errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_labels=[4]), r"class labels must be .* ints in \[0, 3\]"),
        (dict(class_labels=[1.5]), r"class labels must be"),
        (dict(class_labels=["a cat"]), r"unknown class name 'a cat'.*no class_names"),
        (dict(class_labels=[0, 1], generator=[torch.Generator()]), r"got 1 generators for 2 rows"),
        (dict(class_labels=[0]), r"sampling needs one generator per row"),
        (dict(class_labels=[0], temperature=[1.0, 1.0]), r"temperature per scale needs 4 values"),
        (dict(class_labels=[0], temperature=0, top_k=0), r"TopK needs an integer k >= 1"),
        (dict(class_labels=[0], temperature=0, cfg=float("nan")), r"cfg must be a finite number"),
        (dict(class_labels=[0], temperature=0, output_type="np"), r"output_type must be"),
    ],
)
def test_bad_call_arguments_are_refused_clearly(pipes, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipes["var"](**kwargs)


def test_a_model_that_does_not_fit_the_vq_is_refused(pipes, vq):
    wrong = VARTransformer(
        num_classes=4,
        depth=1,
        embed_dim=16,
        num_heads=2,
        patch_nums=vq.patch_nums,
        vocab_size=vq.vocab_size + 1,
        vae_embed_dim=vq.embed_dim,
    )
    decoder: ScaleDecoder = pipes["var"].decoder_for([0], temperature=0)
    with pytest.raises(ValueError, match=r"vocab_size 33 \(the pipeline has 32\)"):
        decoder.run_scale(wrong)
    with pytest.raises(ValueError, match=r"does not fit the pipeline"):
        VARPipeline(wrong, vq)


def test_official_state_dicts_that_do_not_fit_are_named(vq):
    state = torch.load(FIXTURE / "var.pt", weights_only=True)
    model = official_transformer(vq, "var")
    bad = dict(state)
    bad.pop("head.bias")
    bad["blocks.0.attn.proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"missing: head.bias; shape: blocks.0.attn.proj.weight"):
        model.load_official_state_dict(bad)
    with pytest.raises(ValueError, match=r"unknown: blocks.0.ada_gss"):
        model.load_official_state_dict({**state, "blocks.0.ada_gss": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"embed_dim \(30\) must be divisible by num_heads \(4\)"):
        VARTransformer(embed_dim=30, num_heads=4)


# -- decodekit convert-var: the transformer half ---------------------------------------------------


def test_converted_transformer_folder_samples_as_var(vq, oracle, tmp_path):
    from decodekit.pipelines.convert_var import convert_var_transformer

    folder = convert_var_transformer(FIXTURE / "var.pt", tmp_path / "t", patch_nums=vq.patch_nums)
    model = VARTransformer.from_pretrained(folder)
    args = META["var"]["args"]
    assert (model.config.depth, model.config.num_heads, model.config.mlp_ratio) == (
        args["depth"],
        args["num_heads"],
        args["mlp_ratio"],
    )
    assert model.config.attn_l2_norm and not model.config.shared_aln
    out = VARPipeline(model, vq)(META["var"]["labels"], cfg=3.0, temperature=0)
    for si, tokens in enumerate(out.token_maps):
        assert torch.equal(tokens, oracle[f"var.cfg3.tokens.{si}"])


def test_convert_var_cli_writes_a_var_folder(vq, oracle, tmp_path, capsys):
    from decodekit.cli import main

    pns = ",".join(str(p) for p in vq.patch_nums)
    argv = ["convert-var", "--vae", str(FIXTURE / "vae.pt"), "--var", str(FIXTURE / "var.pt")]
    assert main([*argv, "--out", str(tmp_path / "m"), "--patch-nums", pns]) == 0
    assert "transformer/: VAR transformer" in capsys.readouterr().out
    pipe = VARPipeline.from_pretrained(tmp_path / "m")
    out = pipe(META["var"]["labels"], cfg=0.0, temperature=0, output_type="tokens")
    for si, tokens in enumerate(out.token_maps):
        assert torch.equal(tokens, oracle[f"var.cfg0.tokens.{si}"])


def test_convert_var_transformer_refusals(tmp_path):
    from decodekit.pipelines.convert_llada import CheckpointError
    from decodekit.pipelines.convert_var import convert_var_transformer, var_transformer_config

    state = torch.load(FIXTURE / "var_shared.pt", weights_only=True)
    with pytest.raises(CheckpointError, match=r"4 scales and 39 positions; patch_nums \(1, 2\)"):
        var_transformer_config(state, patch_nums=(1, 2))
    config = var_transformer_config(state, patch_nums=(1, 2, 3, 5), num_heads=4)
    assert config["shared_aln"] and not config["attn_l2_norm"] and config["num_heads"] == 4
    assert var_transformer_config(state, patch_nums=(1, 2, 3, 5))["num_heads"] == 2  # VAR's rule
    with pytest.raises(CheckpointError, match=r"lacks pos_start"):
        var_transformer_config({k: v for k, v in state.items() if k != "pos_start"})
    bad = dict(state)
    bad["blocks.1.ffn.fc2.bias"] = torch.zeros(5)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"shape: blocks.1.ffn.fc2.bias \(5,\)"):
        convert_var_transformer(tmp_path / "bad.pt", tmp_path / "out", patch_nums=(1, 2, 3, 5))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_convert_var_cli_var_alone_and_a_mismatched_pair(vq, tmp_path, capsys):
    from decodekit.cli import main

    pns = ",".join(str(p) for p in vq.patch_nums)
    var = str(FIXTURE / "var.pt")
    assert (
        main(["convert-var", "--var", var, "--out", str(tmp_path / "t"), "--patch-nums", pns]) == 0
    )
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["transformer"]
    state = torch.load(FIXTURE / "var.pt", weights_only=True)
    state["head.weight"], state["head.bias"] = state["head.weight"][:-1], state["head.bias"][:-1]
    torch.save(state, tmp_path / "v31.pt")
    argv = ["convert-var", "--vae", str(FIXTURE / "vae.pt"), "--var", str(tmp_path / "v31.pt")]
    assert main([*argv, "--out", str(tmp_path / "m"), "--patch-nums", pns]) == 2
    assert "do not belong together: vocab_size 31 vs 32" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


def test_generate_keeps_no_autograd_graph_and_teacher_forcing_does(pipes, oracle):
    pipe = pipes["var"]
    model, grad_modes = pipe.transformer, []
    forward = model.logits_for_scales

    def recording(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    model.logits_for_scales = recording
    try:
        pipe.generate(META["var"]["labels"], cfg=3.0, temperature=0, output_type="tokens")
    finally:
        del model.logits_for_scales
    assert grad_modes == [False] * 4
    logits, _ = pipe.teacher_forced(oracle["var.tf_labels"], rnd_maps(oracle))
    assert logits.requires_grad  # a trainer's loss backpropagates into the transformer


def test_a_bfloat16_folder_samples_with_a_float32_head(pipes, tmp_path):
    pipes["var"].save_pretrained(tmp_path / "m")
    pipe = VARPipeline.from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    assert next(pipe.transformer.parameters()).dtype == torch.bfloat16
    assert next(pipe.vq.parameters()).dtype == torch.bfloat16
    out = pipe([0, 3], cfg=2.0, top_k=5, generator=[torch.Generator().manual_seed(0)] * 2)
    assert out.f_hat.dtype == torch.bfloat16 and len(out.images) == 2
    labels = torch.tensor([1, 2])
    inputs = pipe.vq.teacher_inputs([m[:2] for m in out.token_maps])
    logits = pipe.transformer(labels, inputs)
    want = pipes["var"].transformer(labels, inputs.float())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, want, rtol=0, atol=0.1)  # bfloat16 weights and blocks
