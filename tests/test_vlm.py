"""The vlm adapter (LLaVA through generate, YAML route) and the core token-pruning hook's oracles."""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.errors import ConfigError
from decodekit.pipelines.vlm_adapter import VLMAdapter, VLMInputs, VLMPipeline
from decodekit.testing import assert_restored, fingerprint, tiny_llava
from decodekit.token_pruning import TokenPruner

from tests.tiny import vlm_image

PROMPTS = ["<image> what shape", "<image> which colour is it"]
K = 2


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


def _enc(processor, rows=(0, 1)):
    return processor(
        images=[vlm_image(i) for i in rows],
        text=[PROMPTS[i] for i in rows],
        return_tensors="pt",
        padding=True,
    )


def _gen(model, enc, n=6):
    return model.generate(**enc, max_new_tokens=n, do_sample=False, suppress_tokens=[4])[
        :, enc["input_ids"].shape[1] :
    ]


def _drop_half_images(enc):
    """A fixed kept set: text and padding, and every other image token of each row."""
    image = enc["input_ids"] == 4

    def select(scores, hidden):
        B, L = hidden.shape[:2]
        keep = torch.ones(B, L, dtype=torch.bool)
        img = torch.zeros(B, L, dtype=torch.bool)
        img[:, : image.shape[1]] = image
        for b in range(B):
            pos = img[b].nonzero().flatten()
            keep[b, pos[(b % 2) :: 2]] = False  # rows drop different halves
        return torch.arange(L).expand(B, L)[keep].view(B, -1)

    return select


def _masked_reference(model, enc, keep, layer):
    """The unpruned model whose layers >= ``layer`` cannot attend to the dropped positions."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    B, L = enc["input_ids"].shape
    allowed = torch.zeros(B, L, dtype=torch.bool)
    allowed.scatter_(1, keep, True)
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, **kw):
        if module.layer_idx >= layer:
            if attention_mask is None:  # no padding: sdpa's causal path
                q, k = query.shape[2], key.shape[2]
                attention_mask = torch.ones(q, k, dtype=torch.bool).tril(k - q)[None, None]
            attention_mask = attention_mask & allowed[:, None, None, :]
        return sdpa(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("test_masked_out", attention)
    AttentionMaskInterface.register("test_masked_out", sdpa_mask)
    lm = model.model.language_model
    lm.set_attn_implementation("test_masked_out")
    try:
        return model(**enc).logits
    finally:
        lm.set_attn_implementation("sdpa")


def test_generate_runs_and_adapter_matches(llava):
    model, processor = llava
    enc = _enc(processor)
    out = _gen(model, enc)
    assert out.shape == (2, 6)
    assert VLMAdapter.matches(model) and VLMAdapter.matches(VLMPipeline(model, processor))
    assert not VLMAdapter.matches(torch.nn.Linear(2, 2))
    with decodekit.attach(model, [], pipeline="vlm") as run:
        assert run.adapter.name == "vlm" and run.adapter.model is model
        assert torch.equal(_gen(model, enc), out)
    with decodekit.attach(VLMPipeline(model, processor), []) as run:
        assert run.adapter.name == "vlm" and run.adapter.model is model


def test_yaml_route(tmp_path, llava):
    model, processor = llava
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    for i in range(2):
        vlm_image(i).save(tmp_path / f"{i}.png")
    pipe = VLMAdapter.load(str(folder), device="cpu", dtype="float32", options={})
    inputs = VLMInputs(
        images=[str(tmp_path / "0.png"), str(tmp_path / "1.png")],
        prompt=["what shape", "<image> which colour is it"],
        max_new_tokens=4,
    )
    rows = VLMAdapter.generate(pipe, inputs)
    assert [r["prompt"] for r in rows] == inputs.prompt
    assert all(len(r["tokens"]) <= 4 and isinstance(r["text"], str) for r in rows)
    # the images saved as PNG are the same pixels: the same tokens as in memory
    enc = processor(images=[vlm_image(0)], text=["<image> what shape"], return_tensors="pt")
    alone = VLMAdapter.generate(
        pipe, VLMInputs(images=str(tmp_path / "0.png"), prompt="what shape", max_new_tokens=4)
    )
    expect = model.generate(**enc, max_new_tokens=4, do_sample=False)[
        0, enc["input_ids"].shape[1] :
    ]
    assert alone[0]["tokens"] == [t for t in expect.tolist()][: len(alone[0]["tokens"])]


def test_bad_inputs(tmp_path, llava):
    model, processor = llava
    with pytest.raises(ValueError, match="image list is empty"):
        VLMInputs(images=[], prompt="what shape")
    with pytest.raises(ConfigError, match="3 images for 2 prompts"):
        VLMInputs(images=["a", "b", "c"], prompt=["x", "y"]).rows()
    with pytest.raises(ConfigError, match="no image file"):
        VLMAdapter.generate(
            VLMPipeline(model, processor), VLMInputs(images=str(tmp_path / "none.png"), prompt="x")
        )
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ConfigError, match="not a readable image"):
        VLMAdapter.generate(
            VLMPipeline(model, processor), VLMInputs(images=str(tmp_path / "bad.png"), prompt="x")
        )


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_pruner_keep_all_identical_and_detach_restores(llava, impl):
    model, processor = llava
    lm = model.model.language_model
    lm.set_attn_implementation(impl)
    try:
        enc = _enc(processor)
        base = _gen(model, enc)
        before = fingerprint(model)
        pruner = TokenPruner(
            model,
            K,
            lambda s, h: torch.arange(h.shape[1]).expand(h.shape[0], -1),
            score=lambda w: w,
        )
        pruner.attach()
        assert torch.equal(_gen(model, enc), base)
        pruner.detach()
        assert_restored(before, fingerprint(model))
        assert lm.config._attn_implementation == impl
        assert torch.equal(_gen(model, enc), base)
    finally:
        lm.set_attn_implementation("sdpa")


def test_pruner_refuses_bad_layers_and_chunked_prefill(llava):
    model, processor = llava
    keep_all = lambda s, h: torch.arange(h.shape[1]).expand(h.shape[0], -1)  # noqa: E731
    with pytest.raises(decodekit.AttachError, match=r"in \[1, 3\]"):
        TokenPruner(model, 4, keep_all)
    pruner = TokenPruner(model, K, keep_all)
    pruner.attach()
    try:
        with pytest.raises(decodekit.AttachError, match="already has a token-pruning hook"):
            TokenPruner(model, K, keep_all).attach()
        enc = _enc(processor, (0,))
        with torch.no_grad():
            out = model(**enc, use_cache=True)
            with pytest.raises(RuntimeError, match="one token per step"):
                model(input_ids=torch.tensor([[5, 6]]), past_key_values=out.past_key_values)
    finally:
        pruner.detach()


def test_vlm_refuses_several_rows_per_prompt(tmp_path, llava):
    model, processor = llava
    vlm_image(0).save(tmp_path / "0.png")
    inputs = VLMInputs(
        images=str(tmp_path / "0.png"),
        prompt="what shape",
        max_new_tokens=2,
        extra={"num_beams": 2, "num_return_sequences": 2},
    )
    with pytest.raises(ConfigError, match="one row per prompt"):
        VLMAdapter.generate(VLMPipeline(model, processor), inputs)


@pytest.mark.parametrize("rows", [(0, 1), (1,)])  # padded batch; one row, no mask (is_causal)
def test_pruned_equals_masked_out_from_layer_k(llava, rows):
    model, processor = llava
    enc = _enc(processor, rows)
    select = _drop_half_images(enc)
    pruner = TokenPruner(model, K, select)
    pruner.attach()
    try:
        with torch.no_grad():
            pruned = model(**enc).logits  # (B, Lk, V): the kept positions only
        keep = pruner.keep
    finally:
        pruner.detach()
    with torch.no_grad():
        ref = _masked_reference(model, enc, keep, K)
    ref_kept = torch.gather(ref, 1, keep[..., None].expand(-1, -1, ref.shape[-1]))
    valid = torch.gather(enc["attention_mask"], 1, keep).bool()
    assert keep.shape[1] < enc["input_ids"].shape[1]
    torch.testing.assert_close(pruned[valid], ref_kept[valid], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # and the pruning changed something
        assert not torch.allclose(model(**enc).logits[:, -1], ref[:, -1], atol=1e-4)


@pytest.mark.parametrize("rows", [(0, 1), (1,)])
def test_cached_decode_equals_recompute(llava, rows):
    model, processor = llava
    enc = _enc(processor, rows)
    L = enc["input_ids"].shape[1]
    pruner = TokenPruner(model, K, _drop_half_images(enc))
    pruner.attach()
    try:
        tokens = _gen(model, enc, n=5)
        keep = pruner.keep
        # no cache: the whole sequence each step, the same kept prompt positions plus every new one
        ids, mask = enc["input_ids"], enc["attention_mask"]
        pruner.select = lambda s, h: torch.cat(
            [keep, torch.arange(L, h.shape[1]).expand(h.shape[0], -1)], dim=1
        )
        for t in range(tokens.shape[1]):
            with torch.no_grad():
                out = model(
                    input_ids=ids,
                    attention_mask=mask,
                    pixel_values=enc["pixel_values"],
                    use_cache=False,
                ).logits[:, -1]
            live = (tokens[:, :t] != 2).all(1)  # rows before their end-of-sequence token
            out[:, 4] = -torch.inf  # suppressed in generate too
            assert torch.equal(out.argmax(-1)[live], tokens[live, t]), (t, out.argmax(-1), tokens)
            ids = torch.cat([ids, tokens[:, t : t + 1]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    finally:
        pruner.detach()
