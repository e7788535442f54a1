"""fastv: keep ratio 1.0 changes nothing, the kept set is FastV's ranking, batch rows equal rows alone."""

from __future__ import annotations

import decodekit
import pytest
import torch
from decodekit.pipelines.vlm_adapter import VLMPipeline
from decodekit.plugins.fastv import FastV, prefill_flops
from decodekit.testing import StrategyTesterMixin, tiny_llava

from tests.tiny import VLM_IMAGE_ID as IMAGE
from tests.tiny import vlm_enc as _enc
from tests.tiny import vlm_generate as _generate


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=1)


def test_keep_ratio_one_identical_tokens(llava):
    model, processor = llava
    enc = _enc(processor, [0, 1])
    base, base_logits = _generate(model, enc)
    for score in ("last", "text-mean"):
        with decodekit.attach(model, [FastV(layer=2, keep_ratio=1.0, score=score)]) as run:
            tokens, logits = _generate(model, enc)
            stats = run.strategies[0].stats()
        assert torch.equal(tokens, base)
        torch.testing.assert_close(logits, base_logits, atol=1e-5, rtol=1e-5)
        assert stats["image_tokens_kept"] == stats["image_tokens"] == 32
        assert stats["prefill_flops_ratio"] == 1.0


@pytest.mark.parametrize("score", ["last", "text-mean"])
def test_kept_set_is_the_attention_ranking(llava, score):
    """The kept image tokens are the top ones by layer K-1's attention of the unpruned eager model."""
    model, processor = llava
    enc = _enc(processor, [0, 1])
    K, ratio = 2, 0.25
    with decodekit.attach(model, [FastV(layer=K, keep_ratio=ratio, score=score)]) as run:
        _generate(model, enc, n=2)
        strategy = run.strategies[0]
        keep = strategy.pruner.keep
        stats = strategy.stats()
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            weights = model(**enc, output_attentions=True).attentions[K - 1].mean(1)  # (B, L, L)
    finally:
        model.set_attn_implementation("sdpa")
    ids, valid = enc["input_ids"], enc["attention_mask"].bool()
    image = ids == IMAGE
    for b in range(ids.shape[0]):
        if score == "last":
            s = weights[b, -1]
        else:
            s = weights[b][valid[b] & ~image[b]].mean(0)
        img = image[b].nonzero().flatten()
        top = img[s[img].topk(4).indices]  # 25% of 16 image tokens
        expect = torch.cat([(~image[b]).nonzero().flatten(), top]).sort().values
        assert torch.equal(keep[b], expect)
    assert stats["image_tokens"] == 32 and stats["image_tokens_kept"] == 8
    assert stats["prefill_flops"] < stats["prefill_flops_full"]


def test_pruning_changes_the_output_and_detach_restores(llava):
    model, processor = llava
    enc = _enc(processor, [0, 1])
    _, base_logits = _generate(model, enc)
    with decodekit.attach(model, [FastV(layer=1, keep_ratio=0.25)]):
        _, logits = _generate(model, enc)
    assert not torch.allclose(logits, base_logits, atol=1e-3)
    _, again = _generate(model, enc)
    assert torch.equal(again, base_logits)


def test_prefill_flops_formula():
    # FastV's estimate: 4 n d^2 + 2 n^2 d + 2 n d m per layer
    assert prefill_flops(2, [10, 5], 8, 16) == (4 * 10 * 64 + 2 * 100 * 8 + 2 * 10 * 8 * 16) + (
        4 * 5 * 64 + 2 * 25 * 8 + 2 * 5 * 8 * 16
    )


def test_bad_params_and_models(llava):
    model, _ = llava
    with pytest.raises(decodekit.ConfigError, match="keep_ratio"):
        FastV(keep_ratio=0.0)
    with pytest.raises(decodekit.ConfigError, match="score"):
        FastV(score="first")
    with pytest.raises(decodekit.AttachError, match="below the language model's 4 layers"):
        decodekit.attach(model, [FastV(layer=4)])
    from decodekit.testing import tiny_llama

    with pytest.raises(decodekit.AttachError, match="image_token_id"):
        decodekit.attach(tiny_llama(), [FastV()])


class TestFastVContract(StrategyTesterMixin):
    strategies = [{"name": "fastv", "params": {"layer": 2, "keep_ratio": 0.5}}]

    def make_pipeline(self):
        pipe = VLMPipeline(*tiny_llava(seed=2))
        # transformers installs its output-capturing hooks on the vision tower at the first
        # forward (an attribute left behind): run one before any fingerprint is taken
        _generate(pipe.model, _enc(pipe.processor, [0]), n=1)
        return pipe

    def sample_inputs(self):
        return [0, 1, 2]

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        model, processor = pipe.model, pipe.processor
        torch.manual_seed(seed)
        return _generate(model, _enc(processor, inputs), n=4)[1]  # (rows, steps, vocab) logits

    def broken_call(self, pipe):
        model, processor = pipe.model, pipe.processor
        model.generate(**_enc(processor, [0]), max_new_tokens=2, num_beams=0)


def test_beam_search_rows_keep_their_own_sets(llava):
    """Beams reorder cache rows within a prompt; rows of one prompt share its kept set."""
    model, processor = llava
    enc = _enc(processor, [0, 1])
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=3, suppress_tokens=[IMAGE])
    base = model.generate(**enc, **kw)
    with decodekit.attach(model, [FastV(keep_ratio=1.0)], pipeline="vlm"):
        assert torch.equal(model.generate(**enc, **kw), base)
    with decodekit.attach(model, [FastV(keep_ratio=0.5)], pipeline="vlm") as run:
        batch = model.generate(**enc, **kw)[:, enc["input_ids"].shape[1] :]
        assert run.strategies[0].stats()["image_tokens"] == 2 * 3 * 16  # rows x beams x tokens
        for b in range(2):
            one = _enc(processor, [b])
            alone = model.generate(**one, **kw)[0, one["input_ids"].shape[1] :]
            assert torch.equal(alone, batch[b])
