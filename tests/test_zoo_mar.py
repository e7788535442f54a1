"""The MAR zoo: shapes-mar and shapes-mar-small (trainer pieces and the committed gates)."""

from __future__ import annotations

import json

import pytest
import torch
from decodekit.pipelines.mar_pipeline import MARPipeline
from decodekit.pipelines.zoo import zoo_path
from decodekit.pipelines.zoo.train_shapes_mar import (
    PATCH_SIZE,
    latent_moments,
    mar_config,
    sample_latents,
    train_mar,
)
from decodekit.pipelines.zoo.train_shapes_var import CLASS_NAMES, class_data
from diffusers import AutoencoderKL


@pytest.fixture(scope="module")
def vae():
    return AutoencoderKL.from_pretrained(zoo_path("shapes-sd") / "vae").eval()


# --- trainer pieces -----------------------------------------------------------------------


def test_latent_moments_are_the_vae_posterior_and_the_cache_reads_back(vae, tmp_path):
    cache = tmp_path / "moments.safetensors"
    folder = zoo_path("shapes-sd") / "vae"
    mean, std, labels = latent_moments(folder, 6, seed=3, cache=cache)
    images, expected_labels = class_data(6, seed=3)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    assert mean.shape == std.shape == (6, 4, 8, 8) and torch.equal(labels, expected_labels)
    torch.testing.assert_close(mean, posterior.mean, atol=2e-3, rtol=1e-3)  # float16 cache
    torch.testing.assert_close(std, posterior.std, atol=2e-3, rtol=1e-3)
    again = latent_moments(folder, 6, seed=3, cache=cache)
    assert all(torch.equal(a, b) for a, b in zip((mean, std, labels), again))
    other = latent_moments(folder, 5, seed=3, cache=cache)  # other renders: computed afresh
    assert other[0].shape[0] == 5
    g = torch.Generator().manual_seed(0)
    x = sample_latents(mean, std, vae.config.scaling_factor, g)
    assert x.shape == mean.shape and not torch.equal(x, mean * vae.config.scaling_factor)


def test_configs_tokenise_the_shapes_latents_in_patches():
    for size in ("small", "base"):
        config = mar_config(size)
        assert config.patch_size == PATCH_SIZE == 2
        assert (config.seq_len, config.token_embed_dim, config.class_num) == (16, 16, 24)
    assert mar_config("small").encoder_embed_dim < mar_config("base").encoder_embed_dim


def test_trainer_writes_a_mar_folder_that_links_shapes_sd_vae(tmp_path):
    out = tmp_path / "mar"
    dims = dict(encoder_embed_dim=16, decoder_embed_dim=16, diffloss_w=16, diffloss_d=1)
    train_mar(out, "small", steps=2, batch_size=4, num_images=16, measure=False, **dims)
    assert (out / "vae").is_symlink()
    assert (out / "vae").resolve() == (zoo_path("shapes-sd") / "vae").resolve()
    pipe = MARPipeline.from_pretrained(out)
    assert pipe.class_names == CLASS_NAMES and pipe.model.config.encoder_embed_dim == 16
    gens = [torch.Generator().manual_seed(i) for i in (0, 1)]
    images = pipe(["red circle", 23], num_iter=4, cfg=2.0, generator=gens).images
    assert [im.size for im in images] == [(32, 32)] * 2
    record = json.loads((out / "training.json").read_text())
    assert (record["steps"], record["num_images"]) == (2, 16) and record["torch_threads"] >= 1
    assert len(record["losses"]) == 1 and record["command"].startswith("python -m ")
    # continuing keeps the folder's model config
    train_mar(out, "base", steps=1, batch_size=4, num_images=16, init_from=out, measure=False)
    assert MARPipeline.from_pretrained(out).model.config.encoder_embed_dim == 16
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 1 and [r["steps"] for r in record["earlier_runs"]] == [2]
