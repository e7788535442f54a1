"""load_bidirectional_lm: Dream checkpoints as Qwen2 (no remote code), LLaDA refused with the
converter's command, causal models refused; the YAML adapter loads through it."""

from __future__ import annotations

import json

import decodekit
import pytest
import torch
from decodekit.errors import ConfigError
from decodekit.pipelines.bidirectional_lm import load_bidirectional_lm
from decodekit.pipelines.masked_diffusion import MaskedDiffusionLMPipeline
from decodekit.pipelines.masked_diffusion_adapter import MaskedDiffusionLMAdapter
from transformers import Qwen2Config, Qwen2ForCausalLM

MASK = 120


def tiny_qwen2(rope_theta: float = 1e6) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
    config.is_causal = False
    return Qwen2ForCausalLM(config).double().eval()


def write_dream(model: Qwen2ForCausalLM, folder, **overrides) -> None:
    """``model`` saved with a config as Dream-v0-7B ships it (transformers 4.46 keys)."""
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    config.pop("is_causal", None)
    config.update(
        model_type="Dream",
        architectures=["DreamModel"],
        auto_map={
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        },
        rope_theta=theta,
        rope_scaling=None,
        use_sliding_window=False,
        sliding_window=None,
        mask_token_id=MASK,
        **overrides,
    )
    (folder / "config.json").write_text(json.dumps(config))


def test_dream_loads_as_bidirectional_qwen2_with_its_rope(tmp_path):
    original = tiny_qwen2(rope_theta=1e6)
    write_dream(original, tmp_path)
    model = load_bidirectional_lm(str(tmp_path), dtype=torch.float64).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.is_causal is False and model.config.mask_token_id == MASK
    ids = torch.randint(0, 120, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, want)
        # the control: the same weights under the default RoPE base compute otherwise
        assert not torch.allclose(tiny_qwen2(rope_theta=1e4)(input_ids=ids).logits, want)


def test_dream_with_dkv_cache_and_shift(tmp_path):
    write_dream(tiny_qwen2(), tmp_path)
    pipe = MaskedDiffusionLMPipeline(
        load_bidirectional_lm(str(tmp_path), dtype=torch.float64).eval(), eos_token_id=1
    )
    kw = dict(
        input_ids=torch.tensor([[5, 9, 17, 3, 22]]),
        gen_length=16,
        block_length=8,
        steps=16,
        shift=True,
        schedule="dream",
    )
    base = pipe(**kw).sequences
    every = {"name": "dkv-cache", "params": {"refresh_interval": 1}}
    with decodekit.attach(pipe, [every]):
        assert torch.equal(pipe(**kw).sequences, base)


def test_llada_and_causal_folders_are_refused_with_what_to_do(tmp_path):
    llada = tmp_path / "llada"
    llada.mkdir()
    (llada / "config.json").write_text(json.dumps({"model_type": "llada", "d_model": 32}))
    with pytest.raises(ValueError, match="decodekit convert-llada"):
        load_bidirectional_lm(str(llada))
    causal = tmp_path / "causal"
    model = tiny_qwen2()
    model.config.is_causal = True
    model.save_pretrained(causal)
    with pytest.raises(ValueError, match='set "is_causal": false'):
        load_bidirectional_lm(str(causal))
    with pytest.raises(ConfigError) as e:
        MaskedDiffusionLMAdapter.load(str(llada), device="cpu", dtype="float32", options={})
    assert e.value.path == "pipeline.model" and "convert-llada" in e.value.message
