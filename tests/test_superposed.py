"""superposed: k drafts from one forward per step, superposed embeddings, n-gram rescoring."""

from __future__ import annotations

import functools
import tempfile

import decodekit
import pytest
import torch
from decodekit.plugins.ngram import NGramModel
from decodekit.plugins.superposed import draft_weights, superposed_embedding
from decodekit.testing import StrategyTesterMixin, tiny_llama
from transformers import DynamicCache, LogitsProcessorList, SuppressTokensLogitsProcessor

PROMPTS = [[1, 5, 6, 7], [1, 9, 3, 4], [1, 30, 31, 8]]
EOS_OFTEN = 18  # a token the tiny random model picks often, used as EOS


@functools.lru_cache(maxsize=1)
def toy_ngram_dir() -> str:
    """An n-gram model over the tiny model's vocabulary (64), from a fixed random corpus."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 64, (40,), generator=g).tolist() for _ in range(30)]
    docs += [p + [17, 11, 33, 40] for p in PROMPTS]
    folder = tempfile.mkdtemp(prefix="dk-ngram-")
    NGramModel.build(docs, vocab_size=64, max_order=6).save(folder)
    return folder


def sup(**params):
    return {"name": "superposed", "params": params}


GREEDY_LIKE = dict(k=1, alpha=0.0, n_token_sample=1)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(dtype=torch.float64)


def gen(model, rows, **kw):
    kw.setdefault("pad_token_id", 0)
    kw.setdefault("do_sample", False)
    return model.generate(torch.tensor(rows), **kw)


@pytest.mark.parametrize("eos", [None, EOS_OFTEN])
def test_one_draft_no_ngram_one_token_is_greedy(llama, eos):
    kw = dict(max_new_tokens=8) | ({"eos_token_id": eos} if eos else {})
    base = gen(llama, PROMPTS, **kw)
    with decodekit.attach(llama, [sup(**GREEDY_LIKE)]) as run:
        out = gen(llama, PROMPTS, **kw)
    assert torch.equal(out, base)
    if eos:
        assert (base[:, 4:] == eos).any()  # a row finished early and was padded
    assert run.last["nfe"] == base.shape[1] - 4 or eos


def test_greedy_equivalence_keeps_logits_processors(llama):
    kw = dict(max_new_tokens=8, repetition_penalty=3.0, no_repeat_ngram_size=2)
    base = gen(llama, PROMPTS, **kw)
    assert not torch.equal(base, gen(llama, PROMPTS, max_new_tokens=8))
    with decodekit.attach(llama, [sup(**GREEDY_LIKE)]):
        out = gen(llama, PROMPTS, **kw)
    assert torch.equal(out, base)


def test_processors_built_for_a_padded_batch_see_that_batch(llama):
    # generate builds the repetition penalty with one prompt length per input row (from
    # the attention mask); the drafts must be processed on that shape, k times, not k*B rows
    rows = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 9, 3, 4, 8, 2]])
    mask = (rows != 0).long()
    kw = dict(
        attention_mask=mask,
        max_new_tokens=6,
        repetition_penalty=3.0,
        pad_token_id=0,
        do_sample=False,
    )
    base = llama.generate(rows, **kw)
    assert not torch.equal(base, llama.generate(rows, **(kw | {"repetition_penalty": 1.0})))
    with decodekit.attach(llama, [sup(**GREEDY_LIKE)]):
        assert torch.equal(llama.generate(rows, **kw), base)
    with decodekit.attach(llama, [sup(k=3, alpha=0.0)]):
        out = llama.generate(rows, **kw)
        plain = llama.generate(rows, **(kw | {"repetition_penalty": 1.0}))
    assert out.shape == plain.shape == (6, 12)
    assert not torch.equal(out, plain)  # the penalty reached the drafts


def test_one_forward_per_step_on_one_row_per_input(llama):
    shapes = []

    def record(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        shapes.append(tuple(x.shape[:2]) if x is not None else tuple(kwargs["input_ids"].shape))

    handle = llama.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with decodekit.attach(llama, [sup(k=4, alpha=0.5, ngram=toy_ngram_dir())]) as run:
            out = gen(llama, PROMPTS[:2], max_new_tokens=7)
    finally:
        handle.remove()
    assert out.shape == (2 * 4, 4 + 7)  # k drafts per input
    assert run.last["nfe"] == 7  # one forward per new token, whatever k
    assert shapes == [(2, 4)] + [(2, 1)] * 6  # prefill, then one superposed row per input
    assert len({tuple(r) for r in out[:4].tolist()}) == 4  # the drafts differ


def test_one_hot_superposition_is_the_token(llama):
    embed = llama.get_input_embeddings()
    prompt = torch.tensor(PROMPTS[:2])
    tokens = torch.tensor([[11, 12, 13], [40, 41, 42]])
    weights = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    mixed = superposed_embedding(embed, tokens, weights)
    assert torch.equal(mixed, embed(torch.tensor([[12], [42]])))
    outs = []
    for kw in ({"input_ids": torch.tensor([[12], [42]])}, {"inputs_embeds": mixed}):
        cache = DynamicCache(config=llama.config)
        llama(prompt, cache=cache)
        outs.append(llama(cache=cache, **kw).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_superposition_is_the_weighted_sum(llama):
    embed = llama.get_input_embeddings()
    scores = torch.tensor([[-1.0, -2.0, float("-inf")]], dtype=torch.float64)
    w = draft_weights(scores)
    e = 1 / (1 + torch.exp(torch.tensor(-1.0, dtype=torch.float64)))
    torch.testing.assert_close(w, torch.tensor([[e, 1 - e, 0.0]], dtype=torch.float64))
    tokens = torch.tensor([[5, 7, 9]])
    want = w[0, 0] * embed.weight[5] + w[0, 1] * embed.weight[7]
    torch.testing.assert_close(superposed_embedding(embed, tokens, w)[0, 0], want)
    assert torch.isfinite(draft_weights(torch.full((1, 3), float("-inf")))).all()


def test_first_step_scores_by_hand(llama):
    """One step, k=2, α=0.5, 4 tokens: scores = (1-α) log p_LM + α log Σ w_n P_n, best two kept."""
    folder = toy_ngram_dir()
    ng = NGramModel.load(folder)
    weights = (0.1, 0.2, 0.3, 0.2, 0.2)
    prompt = PROMPTS[0]
    with decodekit.attach(
        llama,
        [
            sup(
                k=2,
                alpha=0.5,
                ngram=folder,
                n_token_sample=4,
                temperature=1.0,
                ngram_weights=weights,
            )
        ],
    ):
        out = gen(llama, [prompt], max_new_tokens=1, return_dict_in_generate=True)
    logits = llama(torch.tensor([prompt])).logits[0, -1].float().double()
    top_p, top_t = torch.topk(torch.softmax(logits, -1), 4)
    top_p = top_p / top_p.sum()
    p_ng = ng.interpolate(torch.tensor([prompt]), top_t[None], weights)[0]
    assert (p_ng > 0).any()  # the corpus continues this prompt, so the n-grams matter
    score = 0.5 * torch.log(top_p) + 0.5 * torch.log(p_ng)
    best = torch.topk(score, 2)
    assert out.sequences[:, -1].tolist() == top_t[best.indices].tolist()
    torch.testing.assert_close(out.sequences_scores.double(), best.values, rtol=1e-6, atol=1e-6)


def test_ngram_pulls_drafts_to_the_corpus(llama):
    # The corpus continues PROMPTS[1] with 17 11 33 40; with alpha near 1 and the LM's whole
    # vocabulary as candidates, the best draft is that continuation.
    with decodekit.attach(
        llama,
        [sup(k=3, alpha=0.95, ngram=toy_ngram_dir(), n_token_sample=64, temperature=1.0)],
    ):
        out = gen(llama, [PROMPTS[1]], max_new_tokens=4)
    assert out[0, 4:].tolist() == [17, 11, 33, 40]
    assert gen(llama, [PROMPTS[1]], max_new_tokens=4)[0, 4:].tolist() != [17, 11, 33, 40]


def Ban(token: int):
    """A user's logits processor that bans one token (transformers' own)."""
    return SuppressTokensLogitsProcessor([token])


def test_composes_with_logits_processors(llama):
    with decodekit.attach(llama, [sup(k=3, alpha=0.0)]):
        free = gen(llama, PROMPTS[:1], max_new_tokens=5)
        banned = int(free[0, 4])
        out = gen(
            llama,
            PROMPTS[:1],
            max_new_tokens=5,
            logits_processor=LogitsProcessorList([Ban(banned)]),
        )
    assert banned not in out[:, 4:].flatten().tolist()


def test_refusals_are_clear(llama):
    from transformers import T5Config, T5ForConditionalGeneration

    with pytest.raises(decodekit.ConfigError, match="n-gram model"):
        decodekit.attach(llama, [sup(k=2)])  # alpha > 0 without an n-gram model
    with decodekit.attach(llama, [sup(k=2, alpha=0.0)]):
        with pytest.raises(decodekit.ConfigError, match="set k in the params"):
            gen(llama, PROMPTS[:1], max_new_tokens=2, num_beams=2)
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=32,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
        )
    ).eval()
    with decodekit.attach(t5, [sup(k=2, alpha=0.0)]):
        with pytest.raises(decodekit.AttachError, match="decoder-only"):
            t5.generate(torch.tensor([[3, 4, 1]]), max_new_tokens=2)
    big = tempfile.mkdtemp(prefix="dk-ngram-big-")
    NGramModel.build([[1, 2, 3]], vocab_size=500).save(big)
    with decodekit.attach(llama, [sup(k=2, ngram=big)]):
        with pytest.raises(decodekit.ConfigError, match="tokenizer"):
            gen(llama, PROMPTS[:1], max_new_tokens=2)


class TestSuperposedContract(StrategyTesterMixin):
    atol = 0

    @property
    def strategies(self):
        return [sup(k=3, alpha=0.5, ngram=toy_ngram_dir())]

    def make_pipeline(self):
        return tiny_llama(dtype=torch.float64)

    def sample_inputs(self):
        return PROMPTS

    def run_pipeline(self, pipe, inputs, seed, row_offset=0):
        torch.manual_seed(seed)
        out = gen(pipe, inputs, max_new_tokens=5, eos_token_id=EOS_OFTEN)
        return torch.nn.functional.pad(out, (0, 9 - out.shape[1]), value=0)

    def broken_call(self, pipe):
        gen(pipe, [[1, 200]], max_new_tokens=2)


def test_model_without_input_embeddings_is_refused(llama, monkeypatch):
    monkeypatch.setattr(llama, "get_input_embeddings", lambda: None)
    with decodekit.attach(llama, [sup(k=2, alpha=0.0)]):
        with pytest.raises(decodekit.AttachError, match="no input embeddings"):
            gen(llama, PROMPTS[:1], max_new_tokens=2)
