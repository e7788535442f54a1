"""Decode-time K/V admission in the core token pruner: oracles against a masked full recompute."""

from __future__ import annotations

import pytest
import torch
from decodekit.testing import assert_restored, fingerprint, tiny_llama, tiny_llava
from decodekit.token_pruning import TokenPruner, text_decoder

from tests.tiny import VLM_IMAGE_ID as IMAGE
from tests.tiny import vlm_generate
from tests.tiny import vlm_image as _image

PROMPTS = ["<image> what shape", "<image> which colour is it where"]
N = 8  # new tokens per call: N - 1 decode forwards
# per-row admission of the N - 1 decoded inputs: rows differ, steps where no row and every row
# admits, so the cache sees removal, empty slots and compaction
PATTERN = torch.tensor(
    [
        [1, 0, 0, 1, 0, 1, 0],
        [0, 1, 0, 1, 0, 0, 0],
    ],
    dtype=torch.bool,
)


def _warm(model, enc):
    """One forward: transformers installs its output-capturing hooks lazily at the first one, so
    the attach/detach fingerprints compare like with like."""
    with torch.no_grad():
        model(**enc)


@pytest.fixture(scope="module")
def llava():
    out = tiny_llava(seed=2)
    _warm(out[0], _llava_case(out, (0,))[1])
    return out


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(seed=3)
    _warm(model, _llama_case(model, (0,))[1])
    return model


def _llava_case(llava, rows):
    model, processor = llava
    enc = processor(
        images=[_image(i) for i in rows],
        text=[PROMPTS[i] for i in rows],
        return_tensors="pt",
        padding=True,
    )
    return model, dict(enc), 2


def _llama_case(llama, rows, padded=True):
    """Prompts for the two-layer Llama (K = 1), of different lengths (left-padded) or of one
    length (no padding: sdpa gets no mask); `_drop_some` drops four tokens of each."""
    prompts = [[1, 7, 9, 11, 13, 15, 17, 19, 21], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38]]
    if not padded:
        prompts[0] = [*prompts[0], 23]
    width = max(len(prompts[r]) for r in rows)
    ids = torch.tensor([[0] * (width - len(prompts[r])) + prompts[r] for r in rows])
    mask = torch.tensor([[0] * (width - len(prompts[r])) + [1] * len(prompts[r]) for r in rows])
    return llama, {"input_ids": ids, "attention_mask": mask}, 1


def _drop_some(enc, rows=(0, 1)):
    """A fixed kept set: padding, the last position, and prompt ``rows[b]`` drops every other
    image token (the plain LM: inner token), starting at its parity."""
    ids = enc["input_ids"]

    def select(scores, hidden):
        B, L = hidden.shape[:2]
        keep = torch.ones(B, L, dtype=torch.bool)
        for b in range(B):
            real = (ids[b] == IMAGE).nonzero().flatten()
            if real.numel() == 0:  # the plain LM: its real tokens but the first and last
                real = enc["attention_mask"][b].nonzero().flatten()[1:-1]
            keep[b, real[(rows[b] % 2) :: 2]] = False
        keep[:, -1] = True
        assert bool((keep.sum(1) == keep.sum(1)[0]).all()), "the prompts drop as many"
        return torch.arange(L).expand(B, L)[keep].view(B, -1)

    return select


def _keep_all(scores, hidden):
    return torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)


class _Pattern:
    """``admit`` from a fixed ``(B, steps)`` table; records the hidden states it saw."""

    def __init__(self, table: torch.Tensor):
        self.table, self.step, self.shapes = table, 0, []

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(hidden.shape))
        out = self.table[:, self.step]
        self.step += 1
        return out


def _generate(model, enc, n=N, sample=False, seed=0):
    return vlm_generate(model, enc, n, sample=sample, seed=seed, with_cache=True)


def _pruned(model, K, enc, select, table=None, slack=4, **generate):
    admit = None if table is None else _Pattern(table)
    pruner = TokenPruner(model, K, select, admit=admit, slack=slack)
    before = fingerprint(model)
    pruner.attach()
    try:
        tokens, logits, cache = _generate(model, enc, **generate)
        return tokens, logits, cache, pruner.keep, pruner.cache_stats(), pruner
    finally:
        pruner.detach()
        assert_restored(before, fingerprint(model))


def _masked_recompute(model, enc, tokens, keep, admitted, K):
    """No cache, the unpruned model on the whole sequence, whose layers >= K let a query see the
    kept prompt positions, the admitted decoded tokens and itself only (causal and padding rules
    as the model's). Returns the logits ``(B, n, V)`` at the positions generate decoded from."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    L = enc["input_ids"].shape[1]
    B, n = tokens.shape
    ids = torch.cat([enc["input_ids"], tokens[:, :-1]], 1)
    T = ids.shape[1]
    attend = torch.zeros(B, T, dtype=torch.bool)
    attend.scatter_(1, keep, True)
    attend[:, L:] = admitted
    allowed = attend[:, None, :] | torch.eye(T, dtype=torch.bool)  # (B, T, T): itself too
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, attention_mask, **kw):
        if module.layer_idx >= K:
            if attention_mask is None:
                causal = torch.ones(T, T, dtype=torch.bool).tril()
                attention_mask = causal[None, None]
            attention_mask = attention_mask & allowed[:, None]
        return sdpa(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("test_admission_masked", attention)
    AttentionMaskInterface.register("test_admission_masked", sdpa_mask)
    inputs = dict(enc, input_ids=ids)
    inputs["attention_mask"] = torch.cat(
        [enc["attention_mask"], torch.ones(B, n - 1, dtype=enc["attention_mask"].dtype)], 1
    )
    lm = text_decoder(model)
    lm.set_attn_implementation("test_admission_masked")
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
    finally:
        lm.set_attn_implementation("sdpa")
    return logits[:, L - 1 :]


def _case(request, name, rows):
    if name == "llava":
        return _llava_case(request.getfixturevalue("llava"), rows)
    return _llama_case(request.getfixturevalue("llama"), rows, padded=name == "llama")


@pytest.mark.parametrize("name", ["llava", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_admit_all_is_the_pruner_without_admit(request, name, impl):
    model, enc, K = _case(request, name, (0, 1))
    model.set_attn_implementation(impl)
    try:
        all_true = torch.ones(2, N - 1, dtype=torch.bool)
        base, base_logits, *_ = _generate(model, enc)
        same, same_logits, *_ = _pruned(model, K, enc, _keep_all, all_true)
        assert torch.equal(same, base)
        torch.testing.assert_close(same_logits, base_logits, atol=1e-5, rtol=1e-5)
        select = _drop_some(enc)
        plain, plain_logits, *_ = _pruned(model, K, enc, select)
        admitted, admitted_logits, _, _, stats, _ = _pruned(model, K, enc, select, all_true)
        assert torch.equal(admitted, plain)
        torch.testing.assert_close(admitted_logits, plain_logits, atol=1e-6, rtol=1e-6)
        assert stats["admitted"] == stats["decoded"] == 2 * (N - 1)
        # sampling draws the same tokens too
        drawn = _pruned(model, K, enc, select, sample=True, seed=5)[0]
        drawn_admit = _pruned(model, K, enc, select, all_true, sample=True, seed=5)[0]
        assert torch.equal(drawn_admit, drawn)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("name", ["llava", "llama", "llama-unpadded"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("sample,slack", [(False, 4), (False, 0), (True, 1)])
def test_admission_equals_masked_recompute(request, name, impl, sample, slack):
    """Each decode step's logits equal the masked full recompute (slack 0 and 1 compact the
    cache during the run, slack 4 leaves empty slots in it)."""
    model, enc, K = _case(request, name, (0, 1))
    model.set_attn_implementation(impl)
    try:
        tokens, logits, cache, keep, stats, pruner = _pruned(
            model, K, enc, _drop_some(enc), PATTERN, slack, sample=sample, seed=1
        )
    finally:
        model.set_attn_implementation("sdpa")
    assert pruner.admit.shapes == [(2, 1, model.config.get_text_config().hidden_size)] * (N - 1)
    assert keep.shape[1] < enc["input_ids"].shape[1]
    length, filled = _slots_by_hand(keep.shape[1], PATTERN, slack)
    above = model.config.get_text_config().num_hidden_layers - K  # layers >= K
    assert [lay.keys.shape[2] for lay in cache.layers[K:]] == [length] * above
    assert stats["kv_attended"] == above * sum(filled)
    ref = _masked_recompute(model, enc, tokens, keep, PATTERN, K)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)
    # negative control: one non-admitted token admitted in the reference is seen
    wrong = PATTERN.clone()
    wrong[1, 0] = True
    bad = _masked_recompute(model, enc, tokens, keep, wrong, K)
    assert not torch.allclose(logits[1, 2:], bad[1, 2:], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(logits[0], bad[0], atol=1e-5, rtol=1e-4)  # row 0 untouched
    # and admission changed the logits against admitting everything
    every = _masked_recompute(model, enc, tokens, keep, torch.ones_like(PATTERN), K)
    assert not torch.allclose(logits, every, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["llava", "llama"])
def test_batch_rows_equal_rows_alone(request, name):
    model, enc, K = _case(request, name, (0, 1))
    tokens, logits, *_ = _pruned(model, K, enc, _drop_some(enc), PATTERN)
    for r in (0, 1):
        _, alone_enc, _ = _case(request, name, (r,))
        alone, alone_logits, *_ = _pruned(
            model, K, alone_enc, _drop_some(alone_enc, (r,)), PATTERN[r : r + 1]
        )
        assert torch.equal(alone[0], tokens[r])
        torch.testing.assert_close(alone_logits[0], logits[r], atol=1e-5, rtol=1e-4)


def _slots_by_hand(kept: int, table: torch.Tensor, slack: int) -> tuple[int, list[int]]:
    """The cache length of layers >= K and each row's filled slots after the decode steps."""
    filled = [kept] * table.shape[0]
    length = kept
    for step in table.T.tolist():
        if any(step):
            length += 1
            filled = [f + a for f, a in zip(filled, step, strict=True)]
            if length - max(filled) > slack:
                length = max(filled)
    return length, filled


@pytest.mark.parametrize("slack", [0, 1, 4])
def test_cache_shrinks_and_stats_match_a_hand_count(llava, slack):
    model, enc, K = _llava_case(llava, (0, 1))
    rows, L = enc["input_ids"].shape
    table = torch.zeros(2, 15, dtype=torch.bool)
    table[0, ::2] = True  # row 0 admits every other token, row 1 every fourth one
    table[1, 1::4] = True
    pruner = TokenPruner(model, K, _drop_some(enc), admit=_Pattern(table), slack=slack)
    pruner.attach()
    try:
        tokens, logits, cache = _generate(model, enc, n=16)
        stats = pruner.cache_stats()
        keep = pruner.keep
    finally:
        pruner.detach()
    ref = _masked_recompute(model, enc, tokens, keep, table, K)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)
    length, filled = _slots_by_hand(keep.shape[1], table, slack)
    assert max(filled) <= length <= max(filled) + slack
    layers = model.config.text_config.num_hidden_layers
    full = L + 15
    assert [lay.keys.shape[2] for lay in cache.layers] == [full] * K + [length] * (layers - K)
    heads, dim = model.config.text_config.num_key_value_heads, model.config.text_config.head_dim
    slot_bytes = rows * heads * dim * 4 * 2  # keys and values, float32
    assert stats == {
        "kv_slots": (layers - K) * rows * length,
        "kv_attended": (layers - K) * sum(filled),
        "kv_slots_full": (layers - K) * rows * full,
        "kv_bytes": slot_bytes * (K * full + (layers - K) * length),
        "kv_bytes_full": slot_bytes * layers * full,
        "admitted": int(table.sum()),
        "decoded": rows * 15,
    }
    assert stats["kv_bytes"] == sum(
        t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values)
    )
    # memory shrinks for real: layers >= K hold far fewer slots than an unpruned cache
    assert stats["kv_slots"] <= 0.8 * stats["kv_slots_full"]


def test_no_row_admits_removes_the_slot_and_reset_between_calls(llama):
    model, enc, K = _llama_case(llama, (0, 1))
    none = torch.zeros(2, N - 1, dtype=torch.bool)
    pruner = TokenPruner(model, K, _drop_some(enc), admit=_Pattern(none))
    pruner.attach()
    try:
        first, first_logits, cache = _generate(model, enc)
        keep = pruner.keep
        kept = keep.shape[1]
        assert [lay.keys.shape[2] for lay in cache.layers[K:]] == [kept]
        assert pruner.cache_stats()["admitted"] == 0
        pruner.reset()
        pruner.admit.step = 0
        again, again_logits, _ = _generate(model, enc)
        pruner.reset()
        pruner.admit.step = 0
        model.generate(**enc, max_new_tokens=N, min_new_tokens=N, do_sample=False)
        stats = pruner.cache_stats()  # counted after generate dropped its cache too
        layers = model.config.num_hidden_layers
        slot = 2 * 2 * model.config.num_key_value_heads * model.config.head_dim * 4  # rows, K+V
        L = enc["input_ids"].shape[1]
        assert stats["kv_slots"] == stats["kv_attended"] == (layers - K) * 2 * kept
        assert stats["kv_bytes"] == slot * (K * (L + N - 1) + (layers - K) * kept)
        assert stats["admitted"] == 0 and stats["decoded"] == 2 * (N - 1)
    finally:
        pruner.detach()
    assert torch.equal(again, first)
    torch.testing.assert_close(again_logits, first_logits, atol=0, rtol=0)
    ref = _masked_recompute(model, enc, first, keep, none, K)
    torch.testing.assert_close(first_logits, ref, atol=1e-5, rtol=1e-4)


def test_clear_errors(llama):
    from transformers import StaticCache

    model, enc, K = _llama_case(llama, (0, 1))
    bad = TokenPruner(model, K, _keep_all, admit=lambda h: torch.ones(h.shape[0]))
    bad.attach()
    try:
        with pytest.raises(RuntimeError, match=r"admit must return a \(2,\) bool tensor"):
            _generate(model, enc, n=2)
    finally:
        bad.detach()
    pruner = TokenPruner(model, K, _keep_all, admit=_Pattern(PATTERN.repeat(2, 4)))
    pruner.attach()
    try:
        with pytest.raises(RuntimeError, match="beam search"):
            model.generate(**enc, max_new_tokens=6, num_beams=2, do_sample=False)
        pruner.reset()
        cache = StaticCache(config=model.config, max_cache_len=32)
        with pytest.raises(RuntimeError, match="needs transformers' DynamicCache"):
            model.generate(**enc, max_new_tokens=3, past_key_values=cache)
    finally:
        pruner.detach()
    with pytest.raises(Exception, match="slack must be >= 0"):
        TokenPruner(model, K, _keep_all, slack=-1)
