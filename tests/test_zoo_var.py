"""The VAR zoo: shapes-msvq, shapes-var-d6 and shapes-var-d3 (trainer pieces and the committed gates)."""

from __future__ import annotations

import json

import pytest
import torch
from decodekit.pipelines.var import VARPipeline
from decodekit.pipelines.var_vq import MultiScaleVQVAE
from decodekit.pipelines.zoo import zoo_path
from decodekit.pipelines.zoo.shapes_data import COLOUR_NAMES, SHAPES
from decodekit.pipelines.zoo.train_shapes_var import (
    CLASS_NAMES,
    OPERATING_POINT,
    PATCH_NUMS,
    cached_token_maps,
    class_data,
    class_of,
    evaluate_msvq,
    evaluate_var,
    quantise_for_training,
    train_msvq,
    train_var,
    vq_config,
)

# --- trainer pieces -----------------------------------------------------------------------


def test_classes_are_shape_by_colour():
    assert len(CLASS_NAMES) == len(SHAPES) * len(COLOUR_NAMES) == 24
    assert CLASS_NAMES[class_of("circle", "red")] == "red circle"
    assert CLASS_NAMES[class_of("star", "orange")] == "orange star"
    images, labels = class_data(8, seed=3)
    assert images.shape == (8, 3, 32, 32) and -1 <= images.min() < images.max() <= 1
    assert labels.dtype == torch.long and 0 <= labels.min() and labels.max() < 24


def test_training_pass_quantises_as_inference_and_trains_every_part():
    torch.manual_seed(0)
    vq = MultiScaleVQVAE(vq_config(vocab_size=32, z_channels=8)).train().requires_grad_(True)
    x, _ = class_data(4, seed=1)
    f = vq.quant_conv(vq.encoder(x))
    f_hat, loss, idx, seen = quantise_for_training(vq, f)
    with torch.no_grad():
        assert [torch.equal(a, b) for a, b in zip(idx, vq.features_to_idx(f))] == [True] * 6
        torch.testing.assert_close(f_hat, vq.idx_to_fhat(idx))  # straight-through: same values
    assert seen.shape == (4 * sum(p * p for p in vq.patch_nums), 8)
    (torch.nn.functional.mse_loss(vq.decoder(vq.post_quant_conv(f_hat)), x) + loss).backward()
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "decoder.conv_out.weight"):
        grad = dict(vq.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    phi = vq.quantize.quant_resi.qresi_ls[0].weight.grad
    assert phi is not None and phi.abs().sum() > 0


def test_trainers_write_a_var_folder_over_one_vq(tmp_path):
    train_msvq(tmp_path / "msvq", steps=2, num_images=16, batch_size=4, measure=False)
    train_var(
        tmp_path / "var",
        tmp_path / "msvq",
        depth=2,
        steps=2,
        num_images=16,
        batch_size=4,
        measure=False,
    )
    assert (tmp_path / "var" / "vq").is_symlink()
    assert (tmp_path / "var" / "vq").resolve() == (tmp_path / "msvq").resolve()
    pipe = VARPipeline.from_pretrained(tmp_path / "var")
    assert pipe.class_names == CLASS_NAMES and not pipe.vq.training
    config = pipe.transformer.config
    assert (config.depth, config.embed_dim, config.num_classes, config.cond_drop_rate) == (
        2,
        32,
        24,
        0.1,
    )
    out = pipe(
        ["red circle", 23], cfg=2.0, generator=[torch.Generator().manual_seed(i) for i in (0, 1)]
    )
    assert [im.size for im in out.images] == [(32, 32)] * 2
    record = json.loads((tmp_path / "var" / "training.json").read_text())
    assert (record["steps"], record["depth"], record["num_images"]) == (2, 2, 16)
    assert len(record["losses"]) == 1 and record["command"].startswith("python -m ")
    assert json.loads((tmp_path / "msvq" / "training.json").read_text())["steps"] == 2


@pytest.fixture
def untrained_msvq(tmp_path):
    """A small, untrained shapes-msvq folder (its tokens are as good as any for the plumbing)."""
    torch.manual_seed(0)
    vq = MultiScaleVQVAE(vq_config(vocab_size=32, z_channels=8))
    vq.config.test_mode = True
    vq.save_pretrained(tmp_path / "msvq")
    return tmp_path / "msvq"


def test_token_cache_is_reused_only_for_the_same_vq_and_data(tmp_path, untrained_msvq):
    cache = tmp_path / "tokens.safetensors"
    maps, labels = cached_token_maps(untrained_msvq, 12, 3, cache)
    assert cache.is_file() and [m.shape for m in maps] == [(12, p * p) for p in PATCH_NUMS]
    assert torch.equal(labels, class_data(12, seed=3)[1])
    stamp = cache.stat().st_mtime_ns
    again, labels_again = cached_token_maps(untrained_msvq, 12, 3, cache)
    assert cache.stat().st_mtime_ns == stamp  # read, not written
    assert all(torch.equal(a, b) for a, b in zip(maps, again)) and torch.equal(labels, labels_again)
    other, _ = cached_token_maps(untrained_msvq, 12, 4, cache)  # other renders: encoded anew
    assert not all(torch.equal(a, b) for a, b in zip(maps, other))


def test_loss_from_scale_trains_only_on_the_late_scales(tmp_path, untrained_msvq):
    """A CoDe refiner's training: the loss ignores the tokens of the scales before it."""
    from decodekit.pipelines.zoo.train_shapes_var import build_var, train_var_model

    vq = MultiScaleVQVAE.from_pretrained(untrained_msvq)
    x, labels = class_data(8, seed=1)
    maps = vq.img_to_idx(x)
    pipe = build_var(vq, depth=1, seed=0, embed_dim=16)
    head_before = pipe.transformer.head.weight.clone()
    # every target before scale 5 is changed: with the loss from scale 5 the update is the same
    scrambled = [(m + 1) % vq.vocab_size if k < 5 else m for k, m in enumerate(maps)]
    weights = []
    inputs_of = vq.teacher_inputs
    for shift, token_maps in ((0, maps), (1, scrambled)):
        # the inputs as of the real maps (the training rows unscrambled): only targets differ
        vq.teacher_inputs = lambda rows, shift=shift: inputs_of(
            [(m - shift) % vq.vocab_size if k < 5 else m for k, m in enumerate(rows)]
        )
        pipe = build_var(vq, depth=1, seed=0, embed_dim=16)
        train_var_model(
            pipe, token_maps, labels, 2, 4, torch.Generator().manual_seed(0), loss_from_scale=5
        )
        weights.append(pipe.transformer.head.weight.clone())
    del vq.teacher_inputs
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)
    assert not torch.equal(weights[0], head_before)
    with pytest.raises(ValueError, match="loss_from_scale"):
        train_var(tmp_path / "v", untrained_msvq, 1, steps=1, num_images=8, loss_from_scale=6)


# --- the committed models -------------------------------------------------------------------


def test_var_zoo_folders_share_one_vq_and_fit_together():
    vq_folder = zoo_path("shapes-msvq")
    large = VARPipeline.from_pretrained(zoo_path("shapes-var-d6"))
    small = VARPipeline.from_pretrained(zoo_path("shapes-var-d3"))
    for name in ("shapes-var-d6", "shapes-var-d3"):
        assert (zoo_path(name) / "vq").resolve() == vq_folder.resolve()
    assert large.transformer.config.depth == 6 and small.transformer.config.depth == 3
    large.check_model(small.transformer)  # same classes, scales and codebook: CoDe can pair them
    assert large.class_names == small.class_names == CLASS_NAMES
    assert large.patch_nums == (1, 2, 3, 4, 6, 8)


def test_var_zoo_model_loads_from_a_yaml_config():
    from decodekit.config import load_config

    config = load_config(
        {
            "pipeline": {"type": "var", "model": "zoo:shapes-var-d3", "device": "cpu"},
            "inputs": {"prompt": ["red circle", "blue star"], "cfg": 3.0, "seed": 0},
        }
    )
    pipe = config.adapter.load(config.source, device="cpu", dtype="float32", options={})
    images = config.adapter.generate(pipe, config.inputs)
    assert len(images) == 2 and images[0].size == (32, 32)


@pytest.fixture(scope="module")
def judge():
    from decodekit.pipelines.zoo.shapes_judge import ShapesJudge

    return ShapesJudge.load()


def test_shapes_msvq_reconstructions_keep_what_the_caption_says(judge):
    scores = evaluate_msvq(num_images=100)
    # measured: shape 0.97, colour 0.93, all four 0.88 on these 100; 0.972, 0.94, 0.902 on 500
    # (docs/zoo.md; gate 0.85 all four)
    assert scores["adherence_overall"] >= 0.84, scores
    assert scores["adherence_shape"] >= 0.93 and scores["adherence_colour"] >= 0.9, scores


def test_shapes_var_d6_passes_the_gate_and_beats_the_refiner_alone(judge):
    """The gate: the 240 gate samples (10 a class, seeds 50000 + i) at the operating point
    (chosen on other seeds), shape and colour each >= 90%."""
    large = evaluate_var("shapes-var-d6", judge=judge)
    assert large["num_images"] == 240 and large["seed"] == 50_000
    assert (large["cfg"], large["temperature"]) == (
        OPERATING_POINT["cfg"],
        OPERATING_POINT["temperature"],
    )
    # measured: shape 0.904, colour 0.9125, both 0.825 (docs/zoo.md)
    assert large["adherence_shape"] >= 0.90 and large["adherence_colour"] >= 0.90, large
    # shapes-var-d3 is trained on the scales from 4x4 on only (CoDe's refiner): alone it
    # also draws the first three scales, which it never learnt to (on the same 240)
    small = evaluate_var("shapes-var-d3", judge=judge)  # measured: both 0.546 (docs/zoo.md)
    assert large["adherence_class"] > small["adherence_class"] + 0.2, (large, small)


def test_widening_doubles_width_and_heads_and_keeps_the_logits():
    """Net2WiderNet for VARTransformer: [x, x] everywhere, the same logits without noise."""
    from decodekit.pipelines.zoo.train_shapes_var import widen_var

    torch.manual_seed(0)
    vq = MultiScaleVQVAE(vq_config(vocab_size=32, z_channels=8))
    pipe = VARPipeline.from_transformer(vq, num_classes=24, depth=2, embed_dim=32, num_heads=2)
    for p in pipe.transformer.parameters():  # off VAR's init (zero biases, tiny gates)
        p.data.add_(0.1 * torch.randn_like(p))
    model = pipe.transformer.double()
    x, labels = class_data(3, seed=2)
    maps = vq.double().img_to_idx(x.double())
    inputs = vq.teacher_inputs(maps)
    wide = widen_var(model, noise=0.0)
    assert (wide.config.embed_dim, wide.config.num_heads) == (64, 4)
    torch.testing.assert_close(wide(labels, inputs), model(labels, inputs), rtol=0, atol=1e-10)
    noisy = widen_var(model, noise=0.01, seed=1)
    assert not torch.equal(noisy.blocks[0].attn.mat_qkv.weight, wide.blocks[0].attn.mat_qkv.weight)
    torch.testing.assert_close(noisy(labels, inputs), model(labels, inputs), rtol=0.2, atol=0.5)
