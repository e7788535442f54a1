"""decodekit convert-llada: a LLaDA checkpoint as a bidirectional transformers Llama.

The oracle is tests/fixtures/llada_tiny: a tiny random LLaDA checkpoint and the
logits LLaDA's own modeling code computed from it (fixtures/llada_tiny/make.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import decodekit
import pytest
import torch
from decodekit.cli import main as cli_main
from decodekit.errors import AttachError
from decodekit.pipelines.convert_llada import CheckpointError, convert, llama_config, llama_key
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

FIXTURE = Path(__file__).parent / "fixtures" / "llada_tiny"
LLADA = json.loads((FIXTURE / "config.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    return convert(FIXTURE, tmp_path_factory.mktemp("conv") / "llama")


def reference():
    ref = load_file(FIXTURE / "reference_logits.safetensors")
    return ref["input_ids"], ref["logits"]


def test_converted_llama_computes_llada_logits(converted):
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.is_causal is False
    assert model.config.num_key_value_heads == 2  # GQA kept
    ids, want = reference()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    # same float32 operations in the same order as LLaDA's code: equal up to rounding
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_oracle_fails_when_gate_and_up_are_swapped(converted, tmp_path):
    # the control: the fixture tells apart the two MLP inputs the renaming must not confuse
    bad = tmp_path / "swapped"
    shutil.copytree(converted, bad)
    weights = load_file(bad / "model.safetensors")
    for k in [k for k in weights if "gate_proj" in k]:
        up = k.replace("gate_proj", "up_proj")
        weights[k], weights[up] = weights[up], weights[k]
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(bad).eval()
    ids, want = reference()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - want).abs().max() > 1e-3


def test_keys_and_config_mapping():
    assert llama_key("model.transformer.blocks.3.ff_proj.weight") == (
        "model.layers.3.mlp.gate_proj.weight"
    )
    assert llama_key("model.transformer.blocks.0.attn_out.weight") == (
        "model.layers.0.self_attn.o_proj.weight"
    )
    assert llama_key("model.transformer.ff_out.weight") == "lm_head.weight"
    assert llama_key("model.transformer.wte.weight") == "model.embed_tokens.weight"
    config = llama_config(LLADA)
    assert config["mask_token_id"] == 63 and config["is_causal"] is False
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    with pytest.raises(CheckpointError, match="not a weight of a LLaDA Llama block"):
        llama_key("model.transformer.blocks.0.q_norm.weight")


@pytest.mark.parametrize(
    "option, value",
    [
        ("activation_type", "swiglu"),
        ("layer_norm_type", "default"),
        ("alibi", True),
        ("include_bias", True),
        ("include_qkv_bias", True),
        ("attention_layer_norm", True),
        ("scale_logits", True),
        ("input_emb_norm", True),
        ("block_group_size", 2),
        ("block_type", "sequential"),
    ],
)
def test_variants_that_would_compute_otherwise_are_refused_by_option(option, value, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    (src / "config.json").write_text(json.dumps({**LLADA, option: value}))
    with pytest.raises(CheckpointError, match=f"{option}={value!r}"):
        convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()


def test_bad_folders_are_refused_and_leave_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        convert(tmp_path, tmp_path / "dst")
    with pytest.raises(CheckpointError, match="exists; give a new folder"):
        convert(FIXTURE, tmp_path)
    (tmp_path / "new.partial").mkdir()  # a killed conversion's leftover is not deleted
    with pytest.raises(CheckpointError, match="new.partial exists, left by a conversion"):
        convert(FIXTURE, tmp_path / "new")
    assert (tmp_path / "new.partial").is_dir() and not (tmp_path / "new").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llada'"):
        convert(other, tmp_path / "dst")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(FIXTURE / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin, a pickle format"):
        convert(pickled, tmp_path / "dst")
    # a checkpoint missing a layer's weight fails after reading, and leaves no folder
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(FIXTURE / "config.json", partial)
    weights = load_file(FIXTURE / "model.safetensors")
    del weights["model.transformer.blocks.1.up_proj.weight"]
    save_file(weights, partial / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks weights for model.layers.1.mlp.up_proj"):
        convert(partial, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()


def test_sharded_checkpoint_and_tokenizer_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(FIXTURE / "config.json", src)
    weights = load_file(FIXTURE / "model.safetensors")
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, keys in shards.items():
        save_file({k: weights[k] for k in keys}, src / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "auto_map": {"x": "y"}})
    )
    dst = convert(src, tmp_path / "dst")
    assert "auto_map" not in json.loads((dst / "tokenizer_config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    ids, want = reference()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


def test_dkv_cache_attaches_to_the_converted_model(converted):
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float64).eval()
    pipe = MaskedDiffusionLMPipeline(model, eos_token_id=1, pad_token_id=0)
    assert pipe.mask_token_id == 63  # from the converted config
    prompts = torch.tensor([[5, 9, 17, 3, 22, 8], [0, 0, 4, 40, 11, 7]])
    mask = (prompts != 0).long()
    mask[0] = 1
    kw = dict(input_ids=prompts, attention_mask=mask, gen_length=16, block_length=8, steps=16)
    base = pipe(**kw).sequences
    every = {"name": "dkv-cache", "params": {"variant": "decode", "refresh_interval": 1}}
    with decodekit.attach(pipe, [every]):
        assert torch.equal(pipe(**kw).sequences, base)
    with decodekit.attach(pipe, [{"name": "dkv-cache", "params": {"refresh_interval": 4}}]) as run:
        pipe(**kw)
    stats = run.stats["strategies"]["dkv-cache"]
    assert stats["tokens_computed"] < stats["tokens_full"]


def test_dkv_cache_on_llada_code_points_to_the_converter():
    class LLaDAModelLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "llada", "mask_token_id": 63})()

        def forward(self, input_ids):  # pragma: no cover - never called
            raise AssertionError

    pipe = MaskedDiffusionLMPipeline(LLaDAModelLM())
    with pytest.raises(AttachError, match="decodekit convert-llada SRC DST"):
        with decodekit.attach(pipe, ["dkv-cache"]):
            pass


def test_cli(tmp_path, capsys):
    assert cli_main(["convert-llada", str(FIXTURE), str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert cli_main(["convert-llada", str(FIXTURE), str(tmp_path / "out")]) == 2
    assert "exists; give a new folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["convert-llada", "--help"])
    assert e.value.code == 0
    assert "usage: decodekit convert-llada" in capsys.readouterr().out


def test_tied_embeddings_convert_to_a_tied_llama(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**LLADA, "weight_tying": True}))
    weights = load_file(FIXTURE / "model.safetensors")
    del weights["model.transformer.ff_out.weight"]  # a tied LLaDA has no output layer
    save_file(weights, src / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(convert(src, tmp_path / "dst"))
    assert model.config.tie_word_embeddings is True
    wte = weights["model.transformer.wte.weight"]
    assert torch.equal(model.lm_head.weight, wte)
    assert torch.equal(model.get_input_embeddings().weight, wte)
