"""Tests of decodekit.transformers_cache: a transformers model on a PositionalKVCache.

Generation, beam search, crop and eviction are compared with transformers' own
``DynamicCache`` (or a fresh generation) on a tiny random Llama in float64.
"""

from __future__ import annotations

import pytest
import torch
from decodekit.kv_cache import CacheError, PositionalKVCache
from decodekit.testing import tiny_llama
from decodekit.transformers_cache import TransformersKVCache

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama():
    """A tiny random LlamaForCausalLM in float64."""
    return tiny_llama(dtype=torch.float64)


def cache_kwarg(model) -> str:
    """The name under which this transformers version takes a cache in a forward."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefilled(model, ids: torch.Tensor):
    """The cache kwarg's name, then our cache and a ``DynamicCache``, each after a forward over ``ids``."""
    from transformers import DynamicCache

    name = cache_kwarg(model)
    ours, theirs = TransformersKVCache(config=model.config), DynamicCache(config=model.config)
    model(ids, **{name: ours}, use_cache=True)
    model(ids, **{name: theirs}, use_cache=True)
    return name, ours, theirs


GREEDY = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)


def test_generate_matches_dynamic_cache(llama):
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    name = cache_kwarg(llama)
    baseline = llama.generate(ids, attention_mask=mask, **GREEDY)
    ours = TransformersKVCache(config=llama.config)
    out = llama.generate(ids, attention_mask=mask, **{name: ours}, **GREEDY)
    assert torch.equal(out.sequences, baseline.sequences)
    for mine, ref in zip(out.scores, baseline.scores, strict=True):
        torch.testing.assert_close(mine, ref)
    # The store holds the prompt and all but the last generated token, per layer.
    assert ours.get_seq_length() == ours.store.length(1) == 5 + 8 - 1


def test_generate_left_padded_batch_matches_dynamic_cache(llama):
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # row 1 is left-padded
    name = cache_kwarg(llama)
    baseline = llama.generate(ids, attention_mask=mask, **GREEDY)
    out = llama.generate(
        ids, attention_mask=mask, **{name: TransformersKVCache(config=llama.config)}, **GREEDY
    )
    assert torch.equal(out.sequences, baseline.sequences)
    for mine, ref in zip(out.scores, baseline.scores, strict=True):
        torch.testing.assert_close(mine, ref)


def test_beam_search_reorders_through_the_store(llama):
    ids = torch.randint(1, 64, (2, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    beams = dict(num_beams=3, max_new_tokens=6, do_sample=False)
    baseline = llama.generate(ids, attention_mask=mask, **beams)
    ours = TransformersKVCache(config=llama.config)
    calls = []
    original = ours.reorder_cache
    ours.reorder_cache = lambda idx: (calls.append(idx.clone()), original(idx))[1]
    out = llama.generate(ids, attention_mask=mask, **{cache_kwarg(llama): ours}, **beams)
    assert torch.equal(out, baseline)
    assert calls, "beam search never reordered the cache"


def test_crop_then_continue_equals_regenerating_from_the_prefix(llama):
    ids = torch.randint(1, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    name = cache_kwarg(llama)
    ours = TransformersKVCache(config=llama.config)
    first = llama.generate(ids, attention_mask=torch.ones_like(ids), **{name: ours}, **GREEDY)
    prefix = first.sequences[:, :8]  # keep 8 tokens; the cache must hold only 7 of them
    ours.crop(-(ours.get_seq_length() - 7))
    assert ours.get_seq_length() == 7
    resumed = llama.generate(
        prefix, attention_mask=torch.ones_like(prefix), **{name: ours}, **GREEDY
    )
    fresh = llama.generate(prefix, attention_mask=torch.ones_like(prefix), **GREEDY)
    assert torch.equal(resumed.sequences, fresh.sequences)
    for mine, ref in zip(resumed.scores, fresh.scores, strict=True):
        torch.testing.assert_close(mine, ref)


def test_reorder_matches_dynamic_cache(llama):
    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(5))
    name, ours, theirs = prefilled(llama, ids)
    order = torch.tensor([2, 0, 0])
    ours.reorder_cache(order)
    theirs.reorder_cache(order)
    for layer in range(2):
        torch.testing.assert_close(ours.layers[layer].keys, theirs.layers[layer].keys)
        torch.testing.assert_close(ours.layers[layer].values, theirs.layers[layer].values)
    nxt = torch.tensor([[7], [8], [9]])
    mine = llama(nxt, **{name: ours}, use_cache=True).logits
    ref = llama(nxt, **{name: theirs}, use_cache=True).logits
    torch.testing.assert_close(mine, ref)
    ours.batch_select_indices(torch.tensor([1]))
    assert ours.store.batch_size == 1 and ours.layers[0].keys.shape[0] == 1


def test_evict_equals_masking_those_positions_with_original_position_ids(llama):
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    name, ours, theirs = prefilled(llama, ids)
    evicted = [2, 5]
    ours.store.evict(evicted)
    assert ours.get_seq_length() == 8  # positions continue after the evicted ones
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[:, evicted] = 0
    # A 2-token chunk (so the causal mask among new tokens matters), then single tokens.
    # Our cache gets an all-ones 2-D mask over its logical length, as `generate` would give.
    start = 8
    for chunk in ([11, 12], [13], [14]):
        nxt = torch.tensor([chunk, chunk])
        mask = torch.cat([mask, torch.ones(2, len(chunk), dtype=torch.long)], dim=1)
        position_ids = torch.arange(start, start + len(chunk)).expand(2, -1)
        start += len(chunk)
        mine = llama(
            nxt, attention_mask=torch.ones_like(mask), **{name: ours}, use_cache=True
        ).logits
        ref = llama(
            nxt, attention_mask=mask, position_ids=position_ids, **{name: theirs}, use_cache=True
        ).logits
        torch.testing.assert_close(mine, ref)
    # Sanity: eviction changed the outcome (otherwise the test would prove nothing).
    _, ours2, plain = prefilled(llama, ids)
    unmasked = llama(torch.full((2, 1), 11), **{name: plain}, use_cache=True).logits
    ours2.store.evict(evicted)
    assert not torch.allclose(
        llama(torch.full((2, 1), 11), **{name: ours2}, use_cache=True).logits, unmasked
    )


def test_eviction_rows_or_layers_that_disagree_is_a_clear_error(llama):
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(7))
    name = cache_kwarg(llama)
    ours = TransformersKVCache(config=llama.config)
    llama(ids, **{name: ours}, use_cache=True)
    ours.store.evict(torch.tensor([[1], [-1]]))  # row 0 only
    with pytest.raises(CacheError, match="rows hold different positions"):
        llama(torch.full((2, 1), 3), **{name: ours}, use_cache=True)
    ours = TransformersKVCache(config=llama.config)
    llama(ids, **{name: ours}, use_cache=True)
    ours.store.evict([1], layer=1)
    with pytest.raises(CacheError, match="evict the same positions in every layer"):
        llama(torch.full((2, 1), 3), **{name: ours}, use_cache=True)


def test_decodekit_ops_and_hf_share_tensors(llama):
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(8))
    store = PositionalKVCache(num_layers=2)
    ours = TransformersKVCache(store)
    llama(ids, **{cache_kwarg(llama): ours}, use_cache=True)
    assert store.length() == 6 and ours.layers[1].keys is store.gather(1).keys
    store.crop(4)
    assert ours.get_seq_length() == 4 and ours.layers[0].keys.shape[2] == 4
    ours.reset()
    assert store.batch_size is None and ours.get_seq_length() == 0
