"""decodekit convert-var: VAR's released VQ-VAE checkpoint as a MultiScaleVQVAE folder.

The oracle is tests/fixtures/var_tiny: a tiny random VQ-VAE saved by VAR's own code in
the official layout (a flat state dict, as ``vae_ch160v4096z32.pth``), and what VAR
computes with it (fixtures/var_tiny/make.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decodekit.cli import main as cli_main
from decodekit.pipelines.convert_llada import CheckpointError
from decodekit.pipelines.convert_var import convert_var_vae, vae_config
from decodekit.pipelines.var_vq import MultiScaleVQConfig, MultiScaleVQVAE
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "var_tiny"
META = json.loads((FIXTURE / "oracle.json").read_text())
REF = load_file(FIXTURE / "oracle.safetensors")
PNS = tuple(META["vae"]["v_patch_nums"])


def state() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "vae.pt", weights_only=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return convert_var_vae(
        FIXTURE / "vae.pt", tmp_path_factory.mktemp("var") / "vq", v_patch_nums=PNS
    )


def test_converted_folder_reproduces_var(folder):
    vq = MultiScaleVQVAE.from_pretrained(folder)
    assert vq.config == MultiScaleVQConfig(**META["vae"])
    raw = state()
    assert set(vq.state_dict()) == set(raw) - {"quantize.ema_vocab_hit_SV"}
    assert all(torch.equal(v, raw[k].float()) for k, v in vq.state_dict().items())
    with torch.no_grad():
        idx = vq.img_to_idx(REF["vae.img"])
        assert [t.tolist() for t in idx] == [
            REF[f"vae.img_idx.{si}"].tolist() for si in range(len(PNS))
        ]
        torch.testing.assert_close(vq.idx_to_img(idx), REF["vae.img_rec"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fields",
    [
        dict(share_quant_resi=1),
        dict(share_quant_resi=0),
        dict(share_quant_resi=0, default_qresi_counts=3),
        dict(share_quant_resi=2, quant_conv_ks=1, ch_mult=(1, 2), num_res_blocks=3),
    ],
)
def test_layouts_are_read_off_the_weights(tmp_path, fields):
    small = dict(vocab_size=16, z_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1)
    cfg = MultiScaleVQConfig(**{**small, **fields})
    src = tmp_path / "vae.pth"
    torch.save(MultiScaleVQVAE(cfg).state_dict(), src)
    out = convert_var_vae(src, tmp_path / "vq")
    assert MultiScaleVQVAE.from_pretrained(out).config == cfg


def test_release_layout_is_read_and_built_exactly():
    # the names and shapes of vae_ch160v4096z32.pth, from VAR's own VQVAE (make.py)
    layout = json.loads((FIXTURE / "release_vae_layout.json").read_text())
    shapes = {k: torch.empty(v, device="meta") for k, v in layout.items()}
    assert MultiScaleVQConfig(**vae_config(shapes)) == MultiScaleVQConfig()
    with torch.device("meta"):
        own = MultiScaleVQVAE().state_dict()
    del layout["quantize.ema_vocab_hit_SV"]
    assert {k: list(v.shape) for k, v in own.items()} == layout


def test_identity_phi_is_read_as_quant_resi_zero():
    cfg = MultiScaleVQConfig(ch=32, ch_mult=(1,), num_res_blocks=1, quant_resi=0.0)
    fields = vae_config(MultiScaleVQVAE(cfg).state_dict())
    assert fields["quant_resi"] == 0.0 and MultiScaleVQConfig(**fields) == cfg


def test_cli(tmp_path, capsys):
    dst = tmp_path / "out"
    args = [
        "convert-var",
        "--vae",
        str(FIXTURE / "vae.pt"),
        "--out",
        str(dst),
        "--patch-nums",
        "1,2,3,5",
    ]
    assert cli_main(args) == 0
    assert "vq/" in capsys.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == ["vq"]
    assert MultiScaleVQVAE.from_pretrained(dst / "vq").patch_nums == PNS
    assert not list(tmp_path.glob("*.partial"))


def test_cli_refusals(tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli_main(["convert-var", "--var", str(FIXTURE / "vae.pt"), "--out", str(dst)]) == 2
    assert "not a transformer; give it as --vae" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["convert-var", "--out", str(dst)])
    assert "give --vae, --var or both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["convert-var", "--vae", "x.pth", "--out", str(dst), "--patch-nums", "1,a"])
    assert "comma-separated integers" in capsys.readouterr().err
    assert not dst.exists() and not list(tmp_path.iterdir())


def assert_refused(tmp_path, raw, match, **kw):
    src = tmp_path / "vae.pth"
    torch.save(raw, src)
    dst = tmp_path / "dst"
    with pytest.raises(CheckpointError, match=match):
        convert_var_vae(src, dst, **{"v_patch_nums": PNS, **kw})
    assert not dst.exists() and not (tmp_path / "dst.partial").exists()


def test_foreign_or_damaged_checkpoints_are_refused(tmp_path):
    raw = state()
    assert_refused(
        tmp_path, {**raw, "decoder.foo.weight": torch.zeros(1)}, "unexpected decoder.foo"
    )
    no_out = {k: v for k, v in raw.items() if not k.startswith("decoder.conv_out.")}
    assert_refused(tmp_path, no_out, "missing decoder.conv_out")
    bad = {**raw, "post_quant_conv.bias": torch.zeros(5)}
    assert_refused(tmp_path, bad, r"post_quant_conv.bias has shape \(5,\) where")
    partial = {k: v for k, v in raw.items() if k != "quantize.embedding.weight"}
    assert_refused(tmp_path, partial, "not a VAR VQ-VAE.*quantize.embedding")
    transformer = {"word_embed.weight": torch.zeros(4, 8), "head.weight": torch.zeros(8, 4)}
    assert_refused(tmp_path, transformer, "transformer checkpoint.*--var")
    assert_refused(tmp_path, {"model": raw}, "flat state dict")
    assert_refused(tmp_path, [1, 2], "flat state dict")
    assert_refused(tmp_path, raw, "v_patch_nums", v_patch_nums=(2, 1))
    assert_refused(tmp_path, raw, "turns off", quant_resi=0.0)
    flat = {**raw, "quantize.embedding.weight": torch.zeros(32 * 8)}
    assert_refused(tmp_path, flat, "2-dimensional")


def test_unsafe_pickles_missing_files_and_existing_targets_are_refused(tmp_path):
    bad = tmp_path / "pickle.pth"
    torch.save({"x": object()}, bad)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert_var_vae(bad, tmp_path / "a")
    with pytest.raises(CheckpointError, match="not a file"):
        convert_var_vae(tmp_path / "missing.pth", tmp_path / "a")
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        convert_var_vae(FIXTURE / "vae.pt", tmp_path / "b")
    (tmp_path / "c.partial").mkdir()
    with pytest.raises(CheckpointError, match="killed"):
        convert_var_vae(FIXTURE / "vae.pt", tmp_path / "c")
    assert not (tmp_path / "a").exists()
