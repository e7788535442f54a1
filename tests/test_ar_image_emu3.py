"""ARImagePipeline over a tiny `Emu3ForConditionalGeneration` (its own LM, cache, mapping and VQ).

Oracle: transformers' own ``model.generate`` in image mode (prompts from
``Emu3Processor(return_for_image_generation=True)``, transformers'
``PrefixConstrainedLogitsProcessor`` through ``prefix_allowed_tokens_fn`` as in
Emu3's image-generation example) gives the same greedy tokens as decodekit,
plain and with ``sjd`` attached; with guidance, against transformers'
``UnbatchedClassifierFreeGuidanceLogitsProcessor`` (``guidance_scale`` and
``negative_prompt_ids`` of ``generate``), batch 1.
"""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.pipelines.ar_image_families import from_transformers

K = 16
IMAGE_AREA = 32 * 32  # 4 x 4 codes at the processor's downsample of 8
PROMPTS = ["a red circle", "a blue square", "big red square", "small blue circle"]


def tiny_emu3(seed: int = 0):
    """A tiny Emu3ForConditionalGeneration (text model + VQ) and an Emu3Processor over a word vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Emu3Config,
        Emu3ForConditionalGeneration,
        Emu3ImageProcessor,
        Emu3Processor,
        PreTrainedTokenizerFast,
    )

    special = ["<|endoftext|>", "<|begin_of_text|>", "<|image start|>", "<|image end|>",
               "<|image token|>", "<|extra_201|>", "<|extra_200|>", "<image>"]  # fmt: skip
    words = "a red blue circle square big small <unk>".split() + list("0123456789*")
    vocab = {w: i for i, w in enumerate(special + words)}
    # visual tokens out of order in the vocabulary, so the mapping is exercised
    for k in reversed(range(K)):
        vocab[f"<|visual token {k:06d}|>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|begin_of_text|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<|image start|>",
            "eoi_token": "<|image end|>",
            "image_wrapper_token": "<|image token|>",
            "eof_token": "<|extra_201|>",
            "image_token": "<image>",
        },
    )
    tok.add_special_tokens({"additional_special_tokens": [t for t in vocab if t.startswith("<|")]})
    processor = Emu3Processor(Emu3ImageProcessor(), tok)
    config = Emu3Config(
        vocabulary_map=vocab,
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=0, attention_dropout=0.0,
        ),
        vq_config=dict(
            codebook_size=K, embed_dim=4, latent_channels=4, base_channels=32,
            channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32,
            num_attention_heads=1,
        ),
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger logits: greedy choices far from ties
        model.lm_head.weight.mul_(8.0)
    return model, processor


@pytest.fixture(scope="module")
def emu3():
    return tiny_emu3()


@pytest.fixture(scope="module")
def pipe(emu3):
    model, processor = emu3
    return from_transformers(model, processor, image_area=IMAGE_AREA, max_prompt_tokens=32)


def hf_generate(model, processor, prompt, *, scale=1.0):
    """transformers' own image-mode greedy generate: the image span's LM ids (H*(W+1))."""
    from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor

    tok = processor.tokenizer
    inputs = processor(
        text=[prompt], return_for_image_generation=True, image_area=IMAGE_AREA, return_tensors="pt"
    )
    height, width = inputs.pop("image_sizes")[0]
    mapping = model.vocabulary_mapping
    visual = tuple(mapping.image_tokens)
    eol = mapping.eol_token_id
    wrapper = tok.convert_tokens_to_ids(tok.image_wrapper_token)
    eof, eoi = tok.convert_tokens_to_ids(tok.eof_token), tok.convert_tokens_to_ids(tok.eoi_token)

    def prefix_allowed_tokens_fn(batch_id, input_ids):  # Emu3's image-generation constraint
        position = torch.nonzero(input_ids == wrapper, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (width + 1) == 0:
            return (eol,)
        if offset == (width + 1) * height + 1:
            return (eof,)
        if offset == (width + 1) * height + 2:
            return (eoi,)
        if offset > (width + 1) * height + 2:
            return (tok.eos_token_id,)
        return visual

    extra = {}
    if scale > 1:
        neg = processor(
            text=[""], return_for_image_generation=True, image_area=IMAGE_AREA, return_tensors="pt"
        )
        extra = {"guidance_scale": scale, "negative_prompt_ids": neg["input_ids"],
                 "negative_prompt_attention_mask": neg["attention_mask"]}  # fmt: skip
    out = model.generate(
        **inputs,
        max_new_tokens=height * (width + 1),
        do_sample=False,
        logits_processor=LogitsProcessorList(
            [PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, num_beams=1)]
        ),
        **extra,
    )
    return out[:, inputs["input_ids"].shape[1] :]


def lm_ids(pipe, codes):
    return pipe.family.token_ids[codes]


def test_layout_from_the_model_and_its_processor(pipe):
    assert pipe.config.image_tokens == (4, 5) and pipe.config.codebook_size == K + 1
    ids, mask = pipe.encode_prompts(["a red circle"])
    row = pipe.family.prompt_ids(["a red circle"])[0]
    assert ids[0, -len(row) :].tolist() == row and int(mask.sum()) == len(row)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_greedy_equals_transformers_generate(emu3, pipe, scale):
    model, processor = emu3
    prompts = PROMPTS if scale == 1 else PROMPTS[:1]
    out = pipe(prompts, temperature=0, guidance_scale=scale, output_type="codes")
    for b, prompt in enumerate(prompts):
        want = hf_generate(model, processor, prompt, scale=scale)[0]
        assert lm_ids(pipe, out.codes[b]).tolist() == want.tolist(), prompt
    if scale > 1:  # guidance changed the image: the comparison is not vacuous
        plain = pipe(prompts, temperature=0, output_type="codes").codes
        assert not torch.equal(plain, out.codes)
    assert len(set(out.codes[0].tolist())) > 4
    # end-of-line exactly at each row's end
    eol = out.codes.view(len(prompts), 4, 5)[..., -1]
    assert bool((eol == K).all()) and bool((out.codes.view(-1, 4, 5)[..., :-1] < K).all())


@pytest.mark.parametrize("scale", [1.0, 3.0])
@pytest.mark.parametrize("window", [3, 20])
def test_sjd_greedy_equals_plain(pipe, scale, window):
    plain = pipe(PROMPTS, temperature=0, guidance_scale=scale, output_type="codes").codes
    with decodekit.attach(pipe, [{"name": "sjd", "params": {"window": window}}]):
        out = pipe(PROMPTS, temperature=0, guidance_scale=scale, output_type="codes")
    assert torch.equal(out.codes, plain)


def test_sampling_keeps_the_layout_and_images_come_from_decode_image_tokens(emu3, pipe):
    model, _ = emu3
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(PROMPTS[:2], temperature=1.0, generator=gens)
    grid = out.codes.view(2, 4, 5)
    assert bool((grid[..., -1] == K).all()) and bool((grid[..., :-1] < K).all())
    side = 4 * model.model.vqmodel.spatial_scale_factor
    assert len(out.images) == 2 and out.images[0].size == (side, side)
    bpe = torch.cat([lm_ids(pipe, out.codes), torch.zeros(2, 3, dtype=torch.long)], 1)
    pixels = model.decode_image_tokens(image_tokens=bpe, height=4, width=4)
    import numpy as np

    want = ((pixels[0].clamp(-1, 1) + 1) / 2 * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(out.images[0]).astype(float) - want).max() <= 1


def test_unsupported_models_are_refused_with_what_is_supported():
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    cfg = ChameleonConfig(vocab_size=64, vocabulary_map={"<image>": 63}, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2,
                          vq_config=dict(embed_dim=4, num_embeddings=8, base_channels=32,
                                         channel_multiplier=[1], num_res_blocks=1,
                                         attn_resolutions=[]))  # fmt: skip
    model = ChameleonForConditionalGeneration(cfg)
    with pytest.raises(ValueError, match="cannot generate images.*Emu3ForConditionalGeneration"):
        from_transformers(model, None)
    with pytest.raises(ValueError, match="not an image-token model.*Supported"):
        from_transformers(torch.nn.Linear(1, 1), None)


def test_an_emu3_folder_loads_from_yaml(emu3, pipe, tmp_path):
    """A saved Emu3 model + processor is an ar-image model in YAML (options.image_area)."""
    from decodekit.errors import ConfigError
    from decodekit.pipelines.ar_image_adapter import ARImageAdapter, ARImageInputs

    model, processor = emu3
    model.save_pretrained(tmp_path / "emu3")
    processor.save_pretrained(tmp_path / "emu3")
    opts = {"image_area": IMAGE_AREA, "max_prompt_tokens": pipe.config.max_prompt_tokens}
    loaded = ARImageAdapter.load(
        str(tmp_path / "emu3"), device="cpu", dtype="float32", options=opts
    )
    inputs = ARImageInputs(prompt=PROMPTS[:2], temperature=0)
    want = pipe(PROMPTS[:2], temperature=0).images
    assert ARImageAdapter.quality(ARImageAdapter.generate(loaded, inputs), want)["identical"] == 1.0
    with pytest.raises(ConfigError, match="image_area"):
        ARImageAdapter.load(str(tmp_path / "emu3"), device="cpu", dtype="float32", options={})
