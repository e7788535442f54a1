"""decodekit convert-llamagen: LlamaGen's c2i GPT and VQ tokenizer as an ar-image folder.

The oracle is tests/fixtures/llamagen_tiny: a tiny random GPT and VQ saved in the
official layout (``{"model": state_dict}``), the greedy tokens LlamaGen's own
``generate`` made from them with and without guidance, its teacher-forced logits,
its sampling probabilities and its VQ decode of codes (fixtures/llamagen_tiny/make.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import decodekit
import pytest
import torch
from decodekit.cli import main as cli_main
from decodekit.pipelines.ar_image import ARImagePipeline
from decodekit.pipelines.convert_llamagen import CheckpointError, convert
from decodekit.pipelines.llamagen import LlamaGenForCausalLM
from decodekit.sampler import Sampler
from safetensors.torch import load_file

FIXTURE = Path(__file__).parent / "fixtures" / "llamagen_tiny"
ORACLE = json.loads((FIXTURE / "oracle.json").read_text())
REF = load_file(FIXTURE / "oracle.safetensors")
SHAPE = {"num_heads": 4, "image_size": 8, "downsample": 2}  # not in the weights
K = ORACLE["gpt"]["vocab_size"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return convert(
        FIXTURE / "gpt.pt", FIXTURE / "vq.pt", tmp_path_factory.mktemp("lg") / "out", **SHAPE
    )


@pytest.fixture(scope="module")
def pipe(folder) -> ARImagePipeline:
    return ARImagePipeline.from_pretrained(folder)


def state(name: str) -> dict:
    return torch.load(FIXTURE / name, weights_only=True)["model"]


def teacher_forced(lm) -> torch.Tensor:
    codes = torch.tensor(ORACLE["tokens"]["1.0"])
    ids = torch.cat([torch.tensor(ORACLE["classes"])[:, None] + K, codes[:, :-1]], dim=1)
    with torch.no_grad():
        return lm(ids).logits


@pytest.mark.parametrize("scale", [1.0, ORACLE["cfg_scale"]])
def test_greedy_tokens_equal_llamagens_generate(pipe, scale):
    out = pipe(ORACLE["classes"], guidance_scale=scale, temperature=0, output_type="codes")
    assert out.codes.tolist() == ORACLE["tokens"][str(float(scale))]


def test_greedy_sjd_equals_llamagens_generate(pipe):
    with decodekit.attach(pipe, [{"name": "sjd", "params": {"window": 4}}]):
        out = pipe(
            ORACLE["classes"],
            guidance_scale=ORACLE["cfg_scale"],
            temperature=0,
            output_type="codes",
        )
    assert out.codes.tolist() == ORACLE["tokens"][str(float(ORACLE["cfg_scale"]))]


def test_teacher_forced_logits_and_sampling_distribution(pipe):
    assert type(pipe.lm) is LlamaGenForCausalLM and pipe.tokenizer is None
    logits = teacher_forced(pipe.lm)
    torch.testing.assert_close(logits, REF["logits"], rtol=1e-5, atol=1e-5)
    # LlamaGen's sampler: temperature, then top-k, then top-p, as decodekit's
    t, k, p = ORACLE["sampling"]
    probs = Sampler(temperature=t, top_k=k, top_p=p).probs(REF["logits"])
    torch.testing.assert_close(probs, REF["probs"], rtol=1e-5, atol=1e-6)


def test_oracle_fails_with_rows_and_columns_swapped(pipe):
    # the control: a rotary table over (column, row) instead of (row, column) is caught
    lm, g = pipe.lm, pipe.lm.config.grid_size
    saved = lm.rope.clone()
    order = torch.arange(g * g).reshape(g, g).T.reshape(-1) + 1
    try:
        lm.rope[1:] = saved[order]
        assert not torch.allclose(teacher_forced(lm), REF["logits"], atol=1e-3)
    finally:
        lm.rope.copy_(saved)


def test_bfloat16_keeps_the_rotary_table_in_float32(folder):
    lm = ARImagePipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).lm
    assert lm.output.weight.dtype == torch.bfloat16 and lm.rope.dtype == torch.float32
    torch.testing.assert_close(teacher_forced(lm), REF["logits"], rtol=0.1, atol=0.1)


def test_vq_decodes_as_llamagens(pipe):
    codes = torch.tensor(ORACLE["tokens"][str(float(ORACLE["cfg_scale"]))])
    vq, g = pipe.vq, pipe.config.image_tokens[0]
    with torch.no_grad():
        quant = vq.quantize.get_codebook_entry(
            codes.reshape(-1), (len(codes), g, g, vq.config.vq_embed_dim)
        )
        pixels = vq.decode(quant, force_not_quantize=True).sample
    torch.testing.assert_close(pixels, REF["pixels"], rtol=1e-4, atol=1e-4)
    images = pipe.decode_codes(codes)
    assert len(images) == len(codes) and images[0].size == (8, 8)
    # quantize of the decoder's own codebook entries gives the codes back
    assert torch.equal(vq.quantize(quant)[2][2].reshape(codes.shape), codes)


def test_class_prompts_are_checked(pipe):
    out = pipe(1, temperature=0, output_type="codes")
    assert out.codes.tolist() == [ORACLE["tokens"]["1.0"][1]]
    with pytest.raises(ValueError, match="class ids"):
        pipe([ORACLE["gpt"]["num_classes"] + 1], temperature=0, output_type="codes")
    with pytest.raises(ValueError, match="class ids"):
        pipe(["a red square"], temperature=0, output_type="codes")


def test_cli(tmp_path, capsys):
    dst = tmp_path / "cli"
    args = [
        "convert-llamagen",
        str(FIXTURE / "gpt.pt"),
        str(FIXTURE / "vq.pt"),
        str(dst),
        "--num-heads",
        "4",
        "--image-size",
        "8",
        "--downsample",
        "2",
    ]
    assert cli_main(args) == 0
    assert "LlamaGenForCausalLM" in capsys.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == ["ar_image.json", "lm", "vq"]
    assert list((dst / "lm").glob("*.safetensors")) and list((dst / "vq").glob("*.safetensors"))
    assert not list(tmp_path.glob("*.partial"))


def assert_refused(tmp_path, gpt=None, vq=None, match="", **kw):
    src_gpt, src_vq = FIXTURE / "gpt.pt", FIXTURE / "vq.pt"
    if gpt is not None:
        src_gpt = tmp_path / "gpt.pt"
        torch.save({"model": gpt}, src_gpt)
    if vq is not None:
        src_vq = tmp_path / "vq.pt"
        torch.save({"model": vq}, src_vq)
    dst = tmp_path / "dst"
    with pytest.raises(CheckpointError, match=match):
        convert(src_gpt, src_vq, dst, **{**SHAPE, **kw})
    assert not dst.exists() and not (tmp_path / "dst.partial").exists()


def test_t2i_checkpoints_are_refused(tmp_path):
    gpt = state("gpt.pt")
    gpt["cls_embedding.cap_proj.fc1.weight"] = torch.zeros(32, 8)
    assert_refused(tmp_path, gpt=gpt, match="only class-conditional")


def test_unknown_keys_and_bad_shapes_are_refused(tmp_path):
    gpt = state("gpt.pt")
    assert_refused(tmp_path, gpt={**gpt, "extra.weight": torch.zeros(1)}, match="unknown keys")
    assert_refused(tmp_path, gpt={**gpt, "norm.weight": torch.zeros(5)}, match="shape")
    assert_refused(tmp_path, match="presets", num_heads=None)  # width 32: no preset, no --num-heads
    assert_refused(tmp_path, match="multiple of 4", num_heads=16)
    assert_refused(tmp_path, match="not divisible", num_heads=3)
    gqa = {k: v[:-4] if k.endswith("wqkv.weight") else v for k, v in gpt.items()}
    assert_refused(tmp_path, gpt=gqa, match="wqkv")
    vq = state("vq.pt")
    assert_refused(tmp_path, vq={**vq, "decoder.foo.weight": torch.zeros(1)}, match="unknown keys")
    assert_refused(
        tmp_path, vq={**vq, "quantize.embedding.weight": torch.zeros(8, 4)}, match="codes"
    )
    assert_refused(tmp_path, match="downsamples by 2", downsample=4, image_size=16)


def test_unsafe_pickles_and_existing_targets_are_refused(tmp_path):
    bad = tmp_path / "pickle.pt"
    torch.save({"model": {"x": object()}}, bad)
    with pytest.raises(CheckpointError, match="weights_only"):
        convert(bad, FIXTURE / "vq.pt", tmp_path / "a", **SHAPE)
    (tmp_path / "b").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        convert(FIXTURE / "gpt.pt", FIXTURE / "vq.pt", tmp_path / "b", **SHAPE)


def test_class_ids_run_from_a_yaml_config(folder, tmp_path):
    """`decodekit run` of a converted c2i folder takes class ids as prompts: the oracle's tokens."""
    import yaml

    config = {
        "pipeline": {"type": "ar-image", "model": str(folder), "dtype": "float32"},
        "inputs": {"prompt": ORACLE["classes"], "guidance_scale": 1.0, "temperature": 0},
        "output": {"dir": str(tmp_path / "out")},
    }
    (tmp_path / "c2i.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(tmp_path / "c2i.yaml")]) == 0
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == [f"{i:03d}-class-{c}.png" for i, c in enumerate(ORACLE["classes"])]
    from decodekit.pipelines.ar_image_adapter import ARImageAdapter, ARImageInputs

    pipe = ARImageAdapter.load(str(folder), device="cpu", dtype="float32", options={})
    images = ARImageAdapter.generate(
        pipe, ARImageInputs(prompt=ORACLE["classes"], guidance_scale=1.0, temperature=0)
    )
    direct = pipe(ORACLE["classes"], temperature=0)
    assert ARImageAdapter.quality(images, direct.images)["identical"] == 1.0
    with pytest.raises(ValueError, match="valid integer"):  # all captions or all class ids
        ARImageInputs(prompt=["a caption", 3])


@pytest.mark.parametrize("prompt", [True, [1, False]])
def test_boolean_prompts_are_refused_and_a_single_id_is_one_prompt(prompt):
    from decodekit.pipelines.ar_image_adapter import ARImageInputs

    with pytest.raises(ValueError, match="not a boolean"):
        ARImageInputs(prompt=prompt)
    assert ARImageInputs(prompt=3).prompt == 3
