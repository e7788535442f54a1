"""VAR's multi-scale residual VQ-VAE (decodekit.pipelines.var_vq) against VAR's own code.

The oracle is tests/fixtures/var_tiny (made by its make.py from FoundationVision/VAR):
a tiny random VQ-VAE in the official layout and what VAR's ``img_to_idxBl``,
``idxBl_to_img``, ``get_next_autoregressive_input``, ``idxBl_to_var_input``,
``fhat_to_img`` and bare ``VectorQuantizer2``s in other configurations compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from decodekit.errors import ConfigError
from decodekit.pipelines.convert_llada import CheckpointError
from decodekit.pipelines.var_vq import (
    MultiScaleVQConfig,
    MultiScaleVQVAE,
    VQInputError,
    phi_index,
)
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "var_tiny"
META = json.loads((FIXTURE / "oracle.json").read_text())
REF = load_file(FIXTURE / "oracle.safetensors")
PNS = tuple(META["vae"]["v_patch_nums"])
K = len(PNS)
B = META["batch"]
C = META["vae"]["z_channels"]
TOL = dict(rtol=1e-5, atol=1e-5)


def fixture_state() -> dict[str, torch.Tensor]:
    state = torch.load(FIXTURE / "vae.pt", weights_only=True)
    state.pop("quantize.ema_vocab_hit_SV")
    return {k: v.float() for k, v in state.items()}


@pytest.fixture(scope="module")
def vq() -> MultiScaleVQVAE:
    model = MultiScaleVQVAE(MultiScaleVQConfig(**META["vae"]))
    model.load_weights(fixture_state())
    return model


def ref_maps(name: str) -> list[torch.Tensor]:
    return [REF[f"vae.{name}.{si}"] for si in range(K)]


def walk(model: MultiScaleVQVAE, idx: list[torch.Tensor]):
    """``next_scale_input`` over every scale from zeros: [(f_hat, next), ...]."""
    side = model.patch_nums[-1]
    f_hat = torch.zeros(idx[0].shape[0], model.embed_dim, side, side)
    out = []
    for si, (t, pn) in enumerate(zip(idx, model.patch_nums)):
        h = model.embed(t).transpose(1, 2).reshape(-1, model.embed_dim, pn, pn)
        f_hat, nxt = model.next_scale_input(si, f_hat, h)
        out.append((f_hat, nxt))
    return out


def test_shape_properties(vq):
    assert vq.patch_nums == PNS and vq.vocab_size == META["vae"]["vocab_size"]
    assert vq.embed_dim == C and vq.downsample == 2 and vq.image_size == REF["vae.img"].shape[-1]
    assert not vq.training and not any(p.requires_grad for p in vq.parameters())  # test_mode


def test_img_to_idx_and_back_match_var(vq):
    with torch.no_grad():
        idx = vq.img_to_idx(REF["vae.img"])
        assert [t.tolist() for t in idx] == [t.tolist() for t in ref_maps("img_idx")]
        assert all(t.dtype == torch.long for t in idx)
        torch.testing.assert_close(vq.idx_to_img(idx), REF["vae.img_rec"], **TOL)
        torch.testing.assert_close(vq.idx_to_img(ref_maps("rnd_idx")), REF["vae.rnd_img"], **TOL)


def test_next_scale_input_at_every_scale_matches_var(vq):
    idx = ref_maps("rnd_idx")
    with torch.no_grad():
        steps = walk(vq, idx)
        for si, (f_hat, nxt) in enumerate(steps):
            torch.testing.assert_close(f_hat, REF[f"vae.ar_fhat.{si}"], **TOL)
            torch.testing.assert_close(nxt, REF[f"vae.ar_next.{si}"], **TOL)
        assert steps[-1][0] is steps[-1][1]  # after the last scale: (f_hat, f_hat)
        torch.testing.assert_close(vq.fhat_to_img(steps[-1][0]), REF["vae.ar_img"], **TOL)
        torch.testing.assert_close(vq.idx_to_fhat(idx), steps[-1][0], **TOL)


def test_next_scale_input_leaves_its_input_alone(vq):
    f_hat = torch.randn(B, C, PNS[-1], PNS[-1])
    before = f_hat.clone()
    vq.next_scale_input(1, f_hat, torch.randn(B, C, PNS[1], PNS[1]))
    assert torch.equal(f_hat, before)


def test_teacher_inputs_match_var(vq):
    with torch.no_grad():
        inputs = vq.teacher_inputs(ref_maps("rnd_idx"))
    assert inputs.shape == (B, sum(p * p for p in PNS) - PNS[0] ** 2, C)
    torch.testing.assert_close(inputs, REF["vae.rnd_var_input"], **TOL)


def quantizer(name: str) -> MultiScaleVQVAE:
    """A VQ-VAE whose quantiser is the fixture's bare VAR quantiser ``name``."""
    args = META["quant_variants"][name]
    cfg = MultiScaleVQConfig(
        vocab_size=META["vae"]["vocab_size"],
        z_channels=C,
        ch=32,
        ch_mult=(1,),
        num_res_blocks=1,
        v_patch_nums=PNS,
        **args,
    )
    model = MultiScaleVQVAE(cfg)
    prefix = f"quant.{name}.weight."
    weights = {k[len(prefix) :]: v for k, v in REF.items() if k.startswith(prefix)}
    weights.pop("ema_vocab_hit_SV")
    model.quantize.load_state_dict(weights, strict=True)
    return model


@pytest.mark.parametrize("name", sorted(META["quant_variants"]))
def test_quantiser_configurations_match_var(name):
    model = quantizer(name)
    ref = {
        k.removeprefix(f"quant.{name}."): v
        for k, v in REF.items()
        if k.startswith(f"quant.{name}.")
    }
    with torch.no_grad():
        idx = model.features_to_idx(ref["f"])
        assert [t.tolist() for t in idx] == [ref[f"idx.{si}"].tolist() for si in range(K)]
        for si, (f_hat, _) in enumerate(walk(model, idx)):
            torch.testing.assert_close(f_hat, ref[f"fhat.{si}"], **TOL)
        torch.testing.assert_close(model.idx_to_fhat(idx), ref["embed_fhat"], **TOL)
        torch.testing.assert_close(model.teacher_inputs(idx), ref["var_input"], **TOL)


def test_oracle_catches_a_wrong_phi_choice(monkeypatch):
    # the control: giving each scale its neighbour's phi changes what VAR's code computes
    model = quantizer("nonshared")
    bank = model.quantize.quant_resi
    original = bank.for_scale
    monkeypatch.setattr(bank, "for_scale", lambda si, n: original(K - 1 - si, n))
    idx = [REF[f"quant.nonshared.idx.{si}"] for si in range(K)]
    with torch.no_grad():
        assert not torch.allclose(
            model.teacher_inputs(idx), REF["quant.nonshared.var_input"], atol=1e-3
        )


def test_phi_choice_matches_var_for_every_count_and_scale_number():
    for key, picks in META["phi_choices"].items():
        count, scales = map(int, key.split(","))
        assert [phi_index(si, scales, count) for si in range(scales)] == picks, key


def test_phi_layouts_use_the_checkpoint_names():
    def keys(**kw):
        cfg = MultiScaleVQConfig(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=4, **kw)
        return sorted(k for k in MultiScaleVQVAE(cfg).state_dict() if ".quant_resi." in k)

    assert keys(share_quant_resi=1) == [
        "quantize.quant_resi.qresi.bias",
        "quantize.quant_resi.qresi.weight",
    ]
    assert len(keys(share_quant_resi=0)) == 2 * 10 and keys(share_quant_resi=0)[0].startswith(
        "quantize.quant_resi.0."
    )
    assert len(keys(share_quant_resi=0, default_qresi_counts=3)) == 6
    assert keys(share_quant_resi=4)[0] == "quantize.quant_resi.qresi_ls.0.bias"
    assert keys(quant_resi=0.0) == []


def test_save_and_load_round_trip(vq, tmp_path):
    vq.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    loaded = MultiScaleVQVAE.from_pretrained(tmp_path / "vq")
    assert loaded.config == vq.config
    own = vq.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        idx = loaded.img_to_idx(REF["vae.img"])
        assert [t.tolist() for t in idx] == [t.tolist() for t in ref_maps("img_idx")]
    half = MultiScaleVQVAE.from_pretrained(tmp_path / "vq", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        img = half.idx_to_img(ref_maps("rnd_idx"))
    assert img.dtype == torch.bfloat16
    torch.testing.assert_close(img.float(), REF["vae.rnd_img"], rtol=0.1, atol=0.1)


def test_from_pretrained_refuses_bad_folders(vq, tmp_path):
    with pytest.raises(CheckpointError, match="convert-var"):
        MultiScaleVQVAE.from_pretrained(tmp_path / "nothing")
    vq.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 64}))
    with pytest.raises(CheckpointError, match="shape"):
        MultiScaleVQVAE.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "share_quant_resi": 1}))
    with pytest.raises(CheckpointError, match="missing quantize.quant_resi.qresi"):
        MultiScaleVQVAE.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "depth": 3}))
    with pytest.raises(ConfigError, match="unknown VQ-VAE config key"):
        MultiScaleVQVAE.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "model_type": "vqgan"}))
    with pytest.raises(ConfigError, match="model_type"):
        MultiScaleVQVAE.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MultiScaleVQVAE.from_pretrained(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        MultiScaleVQVAE.from_pretrained(tmp_path / "a")


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"ch": 48}, "multiples of 32"),
        ({"v_patch_nums": (1, 3, 2)}, "increasing"),
        ({"v_patch_nums": (4,)}, "at least two"),
        ({"quant_conv_ks": 2}, "odd"),
        ({"quant_resi": 1.5}, r"\[-1, 1\]"),
        ({"share_quant_resi": -1}, "non-negative"),
        ({"ch_mult": 2}, "list of integers"),
        ({"v_patch_nums": (1, 2.5, 4)}, "v_patch_nums.1: must be a positive integer"),
        ({"quant_resi": "half"}, "number"),
        ({"using_znorm": "yes"}, "true or false"),
        ({"ch_mult": ()}, "at least one resolution"),
    ],
)
def test_config_refuses_bad_values(fields, match):
    with pytest.raises(ConfigError, match=match):
        MultiScaleVQConfig(**fields)


def test_bad_inputs_get_clear_errors(vq):
    side = vq.image_size
    with pytest.raises(VQInputError, match=f"\\(B, 3, {side}, {side}\\)"):
        vq.img_to_idx(torch.zeros(1, 3, side + 2, side))
    idx = ref_maps("rnd_idx")
    with pytest.raises(VQInputError, match=f"list of {K} token maps"):
        vq.idx_to_img(idx[:-1])
    with pytest.raises(VQInputError, match="token map 1 should be integer ids"):
        vq.teacher_inputs([idx[0], idx[2], idx[1], idx[3]])
    with pytest.raises(VQInputError, match="outside"):
        vq.idx_to_fhat([idx[0], idx[1] + vq.vocab_size, idx[2], idx[3]])
    f_hat = torch.zeros(B, C, PNS[-1], PNS[-1])
    with pytest.raises(VQInputError, match="h_BChw of scale 1"):
        vq.next_scale_input(1, f_hat, torch.zeros(B, C, PNS[2], PNS[2]))
    with pytest.raises(VQInputError, match="scale index"):
        vq.next_scale_input(K, f_hat, torch.zeros(B, C, PNS[-1], PNS[-1]))
    with pytest.raises(VQInputError, match="f_hat should be a float tensor"):
        vq.fhat_to_img(torch.zeros(B, C, PNS[-2], PNS[-2]))
    with pytest.raises(VQInputError, match="token map 0 is on meta, the VQ-VAE on cpu"):
        vq.idx_to_fhat([t.to("meta") for t in idx])
    with pytest.raises(VQInputError, match="images is on meta"):
        vq.img_to_idx(torch.zeros(1, 3, side, side, device="meta"))
