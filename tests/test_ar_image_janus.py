"""ARImagePipeline over a tiny `JanusForConditionalGeneration` (its own embeddings, LM, head and VQ).

Oracle: Janus's own ``generate(generation_mode="image", do_sample=False)`` (its
loop: static cache, doubled batch with pad-replaced unconditional rows,
``generation_head``, argmax) gives the same greedy codes as decodekit, plain and
with ``sjd`` attached, at several guidance scales.
"""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.pipelines.ar_image_families import from_transformers

G, K, HIDDEN = 4, 16, 32
PROMPTS = ["a red circle", "a blue square", "big red square", "small blue circle"]


def tiny_janus(seed: int = 0):
    """A tiny JanusForConditionalGeneration and a JanusProcessor over a word vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessor,
        JanusProcessor,
        PreTrainedTokenizerFast,
    )

    special = ["<pad>", "<bos>", "<eos>", "<begin_of_image>", "<end_of_image>",
               "<image_placeholder>"]  # fmt: skip
    words = "a red blue circle square big small <unk>".split()
    vocab = {w: i for i, w in enumerate(special + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_placeholder>"},
    )  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": special[3:]})
    processor = JanusProcessor(JanusImageProcessor(), tok, num_image_tokens=G * G)
    config = JanusConfig(
        text_config=dict(
            model_type="llama", vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4, projection_dim=HIDDEN,
                           num_image_tokens=G * G, mlp_ratio=2),
        vq_config=dict(num_embeddings=K, embed_dim=4, latent_channels=8, base_channels=32,
                       channel_multiplier=[1, 1], num_res_blocks=1, num_patches=G,
                       projection_dim=HIDDEN, image_token_embed_dim=HIDDEN),
        image_token_id=vocab["<image_placeholder>"],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger logits: greedy choices far from ties
        for p in model.model.generation_head.parameters():
            p.mul_(8.0)
    gen = model.generation_config
    gen.generation_kwargs = {"boi_token_id": vocab["<begin_of_image>"]}
    gen.pad_token_id, gen.bos_token_id = vocab["<pad>"], vocab["<bos>"]
    return model, processor


@pytest.fixture(scope="module")
def janus():
    return tiny_janus()


@pytest.fixture(scope="module")
def pipe(janus):
    model, processor = janus
    return from_transformers(model, processor, max_prompt_tokens=16)


def janus_generate(model, processor, prompt, scale):
    """Janus's own image-mode loop, greedy."""
    from transformers import LogitsProcessorList

    inputs = processor(text=[prompt], generation_mode="image", return_tensors="pt")
    extra = {}
    if scale == 1:
        extra["logits_processor"] = LogitsProcessorList([lambda ids, s: s[:1].repeat(2, 1)])
        scale = 2.0
    return model.generate(
        **inputs, generation_mode="image", do_sample=False, guidance_scale=scale, **extra
    )


# Janus's generate always runs the doubled batch and only combines it when guidance_scale > 1
# (at 1 it fails on the (2B, K) scores); for guidance off, a logits processor (run before
# Janus's own CFG processor) copies the conditional rows' scores over the unconditional ones,
# so that uncond + s * (cond - uncond) is cond.
@pytest.mark.parametrize("scale", [1.0, 1.5, 2.0, 5.0])
def test_greedy_equals_janus_generate(janus, pipe, scale):
    model, processor = janus
    out = pipe(PROMPTS, temperature=0, guidance_scale=scale, output_type="codes")
    for b, prompt in enumerate(PROMPTS):
        want = janus_generate(model, processor, prompt, scale)[0]
        assert out.codes[b].tolist() == want.tolist(), (prompt, scale)
    assert len(set(out.codes.reshape(-1).tolist())) > 4


def test_the_unconditional_rows_are_janus_pad_replaced_prompts(janus, pipe):
    _, processor = janus
    ids, mask = pipe.encode_prompts(["a red circle"])
    row = processor(text=["a red circle"], generation_mode="image")["input_ids"][0]
    assert ids[0, -len(row) :].tolist() == list(row)
    null, null_mask = pipe.family.unconditional(ids, mask)
    tok = processor.tokenizer
    keep = [tok.bos_token_id, tok.convert_tokens_to_ids(tok.boi_token)]
    assert null[0, -len(row) :].tolist() == [t if t in keep else tok.pad_token_id for t in row]
    assert torch.equal(null_mask, mask)


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("window", [3, 16])
def test_sjd_greedy_equals_plain(pipe, scale, window):
    plain = pipe(PROMPTS, temperature=0, guidance_scale=scale, output_type="codes").codes
    with decodekit.attach(pipe, [{"name": "sjd", "params": {"window": window}}]):
        out = pipe(PROMPTS, temperature=0, guidance_scale=scale, output_type="codes")
    assert torch.equal(out.codes, plain)


def test_images_come_from_decode_image_tokens(janus, pipe):
    import numpy as np

    model, _ = janus
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(PROMPTS[:2], temperature=1.0, guidance_scale=2.0, generator=gens)
    with torch.no_grad():
        pixels = model.decode_image_tokens(out.codes)  # (B, H, W, 3) in [-1, 1]
    want = ((pixels[0].clamp(-1, 1) + 1) / 2 * 255).round().numpy()
    assert np.abs(np.asarray(out.images[0]).astype(float) - want).max() <= 1


def test_a_janus_folder_loads_from_yaml(janus, pipe, tmp_path):
    """A saved Janus model + processor is an ar-image model in YAML; Emu3's option is refused."""
    from decodekit.errors import ConfigError
    from decodekit.pipelines.ar_image_adapter import ARImageAdapter, ARImageInputs

    model, processor = janus
    model.save_pretrained(tmp_path / "janus")
    processor.save_pretrained(tmp_path / "janus")
    opts = {"max_prompt_tokens": 16}
    loaded = ARImageAdapter.load(
        str(tmp_path / "janus"), device="cpu", dtype="float32", options=opts
    )
    inputs = ARImageInputs(prompt=PROMPTS[:2], temperature=0, guidance_scale=2.0)
    want = pipe(PROMPTS[:2], temperature=0, guidance_scale=2.0).images
    assert ARImageAdapter.quality(ARImageAdapter.generate(loaded, inputs), want)["identical"] == 1.0
    with pytest.raises(ConfigError, match="Emu3 folders only"):
        bad = {**opts, "image_area": 1024}
        ARImageAdapter.load(str(tmp_path / "janus"), device="cpu", dtype="float32", options=bad)
