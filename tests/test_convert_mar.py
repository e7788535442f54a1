"""``decodekit convert-mar`` and the MAR model against LTH14/mar's own code.

The oracle is tests/fixtures/mar_tiny (fixtures/mar_tiny/make.py): a tiny random MAR
(patch 2, a 4 x 4 token grid of 16 numbers, 5 head steps) and a tiny LDM KL autoencoder
in the official layout, with what LTH14/mar's code computed from them: the encoder and
decoder's conditions, ``DiffLoss.sample`` and its training terms, ``sample_tokens`` end to
end (its orders and every head draw recorded as the per-position noise table decodekit's
loop reads), the VAE's encoding and decoding; and the names and shapes of the released
``mar_base`` / ``mar_large`` / ``mar_huge`` and KL-16 state dicts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decodekit.pipelines.convert_llada import CheckpointError
from decodekit.pipelines.convert_mar import (
    MAR_LATENT_SCALE,
    convert_kl_vae,
    convert_mar_model,
    kl_vae_to_diffusers,
    mar_config,
)
from decodekit.pipelines.mar import MARConfig, MARModel
from decodekit.pipelines.mar_pipeline import MARPipeline
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "mar_tiny"
META = json.loads((FIXTURE / "oracle.json").read_text())
TINY = dict(
    img_size=16,
    vae_stride=2,
    patch_size=2,
    num_heads=2,
    num_sampling_steps="5",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors (see conftest)


@pytest.fixture(scope="module")
def oracle() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "oracle.safetensors")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> MARPipeline:
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("mar")
    convert_mar_model(FIXTURE / "mar.pt", root / "model", **TINY)
    convert_kl_vae(FIXTURE / "kl.pt", root / "vae")
    return MARPipeline(
        MARModel.from_pretrained(root / "model"), AutoencoderKL.from_pretrained(root / "vae")
    )


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# -- the model against MAR's code ------------------------------------------------------------------
def test_converted_config_is_the_fixtures(pipe):
    config = pipe.model.config
    for key, value in META["mar"].items():
        assert getattr(config, key) == value, key
    assert config.norm_eps == 1e-6 and config.mlp_ratio == 4.0


def test_conditions_equal_mars_encoder_and_decoder(pipe, oracle):
    model = pipe.model
    tokens, mask, labels = oracle["cond.tokens"], oracle["cond.mask"], oracle["cond.labels"]
    with torch.no_grad():
        z = model.conditions(tokens, mask, model.class_embedding(labels))
        z_null = model.conditions(tokens, mask, model.class_embedding(torch.full((2,), 3)))
    assert_close(z, oracle["cond.z"])
    assert_close(z_null, oracle["cond.z_null"])
    assert torch.equal(model.patchify(oracle["patchify.latents"]), oracle["patchify.tokens"])


@pytest.mark.parametrize("case, cfg", [("head", 1.0), ("head_cfg", 2.5)])
def test_head_samples_equal_difflosss_with_its_noise(pipe, oracle, case, cfg):
    head = pipe.model.diffloss
    z_null = oracle["head.z_null"] if cfg != 1.0 else None
    with torch.no_grad():
        x = head.sample(oracle["head.z"], 0.9, cfg, z_uncond=z_null, noise=oracle[f"{case}.noise"])
    assert_close(x, oracle[f"{case}.sample"], rtol=1e-4, atol=1e-3)


def test_loss_terms_equal_the_hybrid_training_loss(pipe, oracle):
    head = pipe.model.diffloss
    with torch.no_grad():
        mse, vb = head.loss_terms(
            oracle["loss.target"], oracle["loss.z"], oracle["loss.t"], oracle["loss.noise"]
        )
    assert_close(mse, oracle["loss.mse"])
    assert_close(vb, oracle["loss.vb"], rtol=1e-4, atol=1e-4)
    assert_close(mse + vb, oracle["loss.loss"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", list(META["loops"]))
def test_the_loop_equals_sample_tokens_with_its_orders_and_noise(pipe, oracle, case):
    labels, num_iter, cfg, schedule, temperature = META["loops"][case]
    decoder = pipe.decoder_for(
        labels,
        num_iter=num_iter,
        cfg=cfg,
        cfg_schedule=schedule,
        temperature=temperature,
        generator=[torch.Generator().manual_seed(0) for _ in labels],
    )
    decoder.orders, decoder.noise = oracle[f"{case}.orders"], oracle[f"{case}.noise"]
    with torch.no_grad():
        while decoder.step < num_iter:
            decoder.run_step()
    assert not decoder.mask.any()
    # The random tiny head's tokens reach about 1.5e5, and float32 rounds at about 1e-7 of
    # that, differently on different CPUs' kernels: compare at the tensor's scale (the
    # negative control below differs by far more).
    tokens = oracle[f"{case}.tokens"]
    scale = 1e-5 * float(tokens.abs().max())
    assert_close(decoder.tokens, tokens, rtol=1e-4, atol=scale)
    assert_close(
        pipe.model.unpatchify(decoder.tokens), oracle[f"{case}.latents"], rtol=1e-4, atol=scale
    )


def test_the_loop_oracle_fails_with_another_order(pipe, oracle):
    labels, num_iter, cfg, schedule, temperature = META["loops"]["loop_linear"]
    decoder = pipe.decoder_for(
        labels, num_iter=num_iter, cfg=cfg, cfg_schedule=schedule, temperature=temperature,
        generator=[torch.Generator().manual_seed(0) for _ in labels],
    )  # fmt: skip
    decoder.orders = oracle["loop_linear.orders"].flip(1)
    decoder.noise = oracle["loop_linear.noise"]
    with torch.no_grad():
        while decoder.step < num_iter:
            decoder.run_step()
    tokens = oracle["loop_linear.tokens"]  # not close even at the positive test's tolerance
    assert not torch.allclose(
        decoder.tokens, tokens, rtol=1e-4, atol=1e-5 * float(tokens.abs().max())
    )


def test_ema_weights_by_default_and_raw_weights_on_request(tmp_path):
    with torch.serialization.safe_globals([__import__("argparse").Namespace]):
        ckpt = torch.load(FIXTURE / "mar.pt", weights_only=True)
    convert_mar_model(FIXTURE / "mar.pt", tmp_path / "raw", weights="model", **TINY)
    raw = MARModel.from_pretrained(tmp_path / "raw").state_dict()
    assert all(torch.equal(raw[k], v) for k, v in ckpt["model"].items())
    convert_mar_model(FIXTURE / "mar.pt", tmp_path / "ema", **TINY)
    ema = load_file(tmp_path / "ema" / "model.safetensors")
    assert set(ema) == set(ckpt["model_ema"]) and all(
        torch.equal(ema[k], v) for k, v in ckpt["model_ema"].items()
    )
    assert not torch.equal(ema["z_proj.weight"], ckpt["model"]["z_proj.weight"])


# -- the VAE -----------------------------------------------------------------------------------------
def test_vae_encodes_and_decodes_as_the_ldm_autoencoder(pipe, oracle):
    vae = pipe.vae
    assert vae.config.scaling_factor == MAR_LATENT_SCALE
    assert list(vae.config.down_block_types) == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    with torch.no_grad():
        mean = vae.encode(oracle["vae.image"]).latent_dist.mean
        decoded = vae.decode(oracle["vae.z"]).sample
    assert_close(mean, oracle["vae.mean"], rtol=1e-4, atol=1e-4)
    assert_close(decoded, oracle["vae.decoded"], rtol=1e-4, atol=1e-4)


# -- the released layouts ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mar_base", "mar_large", "mar_huge"])
def test_released_mar_layouts_load_strictly(name):
    layout = json.loads((FIXTURE / "release_layout.json").read_text())[name]
    state = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    config = MARConfig(**mar_config(state))
    widths = {
        "mar_base": (768, 12, 12, 6, 1024),
        "mar_large": (1024, 16, 16, 8, 1280),
        "mar_huge": (1280, 20, 16, 12, 1536),
    }
    assert (
        config.encoder_embed_dim, config.encoder_depth, config.encoder_num_heads,
        config.diffloss_d, config.diffloss_w,
    ) == widths[name]  # fmt: skip
    assert (config.seq_len, config.token_embed_dim, config.buffer_size, config.class_num) == (
        256,
        16,
        64,
        1000,
    )
    with torch.device("meta"):
        model = MARModel(config)
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert mine == layout


def test_released_kl16_layout_maps_onto_diffusers():
    from diffusers import AutoencoderKL

    layout = json.loads((FIXTURE / "release_layout.json").read_text())["kl16"]
    config, state = kl_vae_to_diffusers(
        {k: torch.empty(s, device="meta") for k, s in layout.items()}
    )
    assert (
        config["block_out_channels"] == [128, 128, 256, 256, 512]
        and config["latent_channels"] == 16
    )
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert config["layers_per_block"] == 2
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    want = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == want


# -- the command and its refusals --------------------------------------------------------------------
def test_convert_mar_cli_writes_a_mar_folder_that_samples(tmp_path, capsys):
    from decodekit.cli import main

    names = tmp_path / "names.json"
    names.write_text(json.dumps(["a", "b", "c"]))
    args = ["convert-mar", "--mar", str(FIXTURE / "mar.pt"), "--vae", str(FIXTURE / "kl.pt")]
    args += ["--out", str(tmp_path / "m"), "--num-heads", "2", "--img-size", "16"]
    args += ["--vae-stride", "2", "--patch-size", "2", "--num-sampling-steps", "5"]
    assert main([*args, "--class-names", str(names)]) == 0
    assert "model/: MAR ema" in capsys.readouterr().out
    pipe = MARPipeline.from_pretrained(tmp_path / "m")
    out = pipe(
        ["c", 0], num_iter=4, cfg=2.0, generator=[torch.Generator().manual_seed(s) for s in (1, 2)]
    )
    assert len(out.images) == 2 and out.images[0].size == (16, 16)
    assert main([*args]) != 0  # the folder exists
    assert "exists" in capsys.readouterr().err


def _save(tmp_path: Path, data, name: str = "bad.pt") -> Path:
    path = tmp_path / name
    torch.save(data, path)
    return path


def test_checkpoints_that_do_not_fit_are_refused_by_name(tmp_path):
    with torch.serialization.safe_globals([__import__("argparse").Namespace]):
        ema = torch.load(FIXTURE / "mar.pt", weights_only=True)["model_ema"]
    cases = [
        (
            {"model_ema": {k: v for k, v in ema.items() if k != "mask_token"}},
            "Missing key.*mask_token",
        ),
        ({"model_ema": {**ema, "extra.weight": torch.zeros(1)}}, "Unexpected key.*extra.weight"),
        ({"model_ema": {**ema, "z_proj.bias": torch.zeros(3)}}, "z_proj.bias"),
        ({"model": ema}, "no 'model_ema' state dict"),
        ({"model_ema": {"z_proj.weight": torch.zeros(2, 2)}}, "not a MAR state dict"),
    ]
    for i, (data, message) in enumerate(cases):
        with pytest.raises(CheckpointError, match=message):
            convert_mar_model(_save(tmp_path, data, f"{i}.pt"), tmp_path / f"out{i}", **TINY)
        assert not (tmp_path / f"out{i}").exists()
    with pytest.raises(CheckpointError, match="give it \\(--num-heads\\)"):
        convert_mar_model(FIXTURE / "mar.pt", tmp_path / "o", **{**TINY, "num_heads": None})
    with pytest.raises(CheckpointError, match="the checkpoint has 16 tokens"):
        convert_mar_model(FIXTURE / "mar.pt", tmp_path / "o", **{**TINY, "img_size": 32})
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert_mar_model(
            _save(tmp_path, {"model_ema": ema, "x": Path("x")}), tmp_path / "o", **TINY
        )
    with pytest.raises(CheckpointError, match="is not a file"):
        convert_mar_model(tmp_path / "none.pt", tmp_path / "o", **TINY)


def test_vae_checkpoints_that_do_not_fit_are_refused(tmp_path):
    state = torch.load(FIXTURE / "kl.pt", weights_only=True)["model"]
    bad = {k: v for k, v in state.items() if k != "encoder.mid.attn_1.q.bias"}
    with pytest.raises(CheckpointError, match="lacks encoder.mid.attn_1.q.bias"):
        kl_vae_to_diffusers(bad)
    with pytest.raises(CheckpointError, match="do not map onto diffusers"):
        kl_vae_to_diffusers({**state, "encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not an LDM KL autoencoder"):
        kl_vae_to_diffusers({"quant_conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        convert_kl_vae(_save(tmp_path, {"state_dict": state}), tmp_path / "v")
