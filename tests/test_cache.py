"""Tests of the shared cache interfaces: PositionalKVCache, StepFeatureMemo, TransformersKVCache."""

from __future__ import annotations

import pytest
import torch
from decodekit.cache import (
    CacheError,
    PositionalKVCache,
    StepFeatureMemo,
    TransformersKVCache,
)

torch.set_num_threads(1)

B, H, D = 2, 2, 4


def kv(batch: int = B, q_len: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys and values (B, H, Q, D)."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, H, q_len, D, generator=gen),
        torch.randn(batch, H, q_len, D, generator=gen),
    )


# ----------------------------------------------------------------------------- store / gather


def test_store_by_index_places_keys_at_absolute_positions():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=2)
    cache.store(0, keys, values, torch.tensor([3, 1]))
    view = cache.gather(0)
    assert view.keys.shape == (B, H, 4, D)
    assert torch.equal(view.keys[:, :, 3], keys[:, :, 0])
    assert torch.equal(view.values[:, :, 1], values[:, :, 1])
    assert view.key_mask.tolist() == [[False, True, False, True]] * B


def test_prepared_positions_store_like_the_spec_without_host_reads():
    from decodekit.testing import HostReads

    spec = torch.tensor([[4, 0, -1], [2, 5, 1]])  # ragged: row 0 names two positions
    keys, values = kv(q_len=3)
    plain, fast = PositionalKVCache(num_layers=3), PositionalKVCache(num_layers=3)
    prepared = fast.prepare(spec, 3)
    assert prepared.end == 6 and prepared.rows.numel() == 5
    with HostReads() as reads:
        for layer in range(3):
            fast.store(layer, keys, values, prepared, step=2)
    assert reads.total == 0
    for layer in range(3):
        plain.store(layer, keys, values, spec, step=2)
        a, b = plain.gather(layer), fast.gather(layer)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert torch.equal(a.key_mask, b.key_mask)
    assert torch.equal(plain.reusable(5), fast.reusable(5))
    # the control: the same stores from the spec read back every layer
    with HostReads() as reads:
        for layer in range(3):
            plain.store(layer, keys, values, spec, step=3)
    assert reads.total >= 3


def test_positions_built_by_the_caller_are_flattened_with_one_read():
    # prepare(..., end=L): the caller vouches for -1-or-distinct positions below L (dkv-cache
    # builds them from a sort); the result equals the checked one, after a single read
    from decodekit.testing import HostReads

    spec = torch.tensor([[4, 0, -1], [2, 5, 1]])
    checked = PositionalKVCache(num_layers=2).prepare(spec, 3)
    trusted_cache = PositionalKVCache(num_layers=2)
    with HostReads() as reads:
        trusted = trusted_cache.prepare(spec, 3, end=8)
    assert reads.total == 1  # which entries are real
    for name in ("rows", "positions", "columns"):
        assert torch.equal(getattr(trusted, name), getattr(checked, name))
    assert (checked.end, trusted.end) == (6, 8)
    keys, values = kv(q_len=3)
    trusted_cache.store(0, keys, values, trusted, step=0)
    assert trusted_cache.length(0) == 8 and trusted_cache.key_mask(0).sum() == 5
    with pytest.raises(CacheError, match=r"takes a \(B, Q\) = \(2, 3\) long tensor"):
        trusted_cache.prepare(spec.bool(), 3, end=8)
    with pytest.raises(CacheError, match="end must be an int"):
        trusted_cache.prepare(spec, 3, end=-1)
    with pytest.raises(CacheError, match="out of range"):
        PositionalKVCache(num_layers=1, max_length=6).prepare(spec, 3, end=8)


def test_marking_a_mask_decoded_reads_nothing_back():
    from decodekit.testing import HostReads

    mask = torch.tensor([[True, False, True, False, False], [False, False, False, False, True]])
    dense, indexed = PositionalKVCache(num_layers=1), PositionalKVCache(num_layers=1)
    with HostReads() as reads:
        dense.mark_decoded(mask, step=3)
        dense.mark_decoded(mask & False, step=4)  # nothing new: no change
        dense.mark_decoded(torch.tensor([[False, True], [False, False]]), step=5)
    assert reads.total == 0
    indexed.mark_decoded(torch.tensor([[0, 2], [4, -1]]), step=3)  # the same, as indices
    indexed.mark_decoded(torch.tensor([[1], [-1]]), step=5)
    assert torch.equal(dense._decoded(5)[:, :5], indexed._decoded(5)[:, :5])
    assert dense._decoded(5)[0, :3].tolist() == [3, 5, 3]


def test_prepared_positions_are_checked_once_and_must_fit_the_keys():
    cache = PositionalKVCache(num_layers=1)
    with pytest.raises(CacheError, match="batch size is known"):
        cache.prepare(torch.tensor([0, 1]), 2)
    with pytest.raises(CacheError, match="names a position twice"):
        cache.prepare(torch.tensor([[0, 0], [1, 2]]), 2)
    prepared = cache.prepare(torch.tensor([[0, 1], [1, 2]]), 2)
    keys, values = kv(q_len=3)
    with pytest.raises(CacheError, match=r"prepared for \(B, Q\) = \(2, 2\)"):
        cache.store(0, keys, values, prepared)


def test_store_with_dense_bool_mask_writes_only_masked_positions():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=4)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True]])
    cache.store(0, keys, values, mask)
    assert torch.equal(cache.key_mask(0), mask)
    assert torch.equal(cache.gather(0).keys[1, :, 3], keys[1, :, 3])
    assert torch.equal(cache.gather(0).keys[0, :, 1], torch.zeros(H, D))


def test_ragged_rows_hold_different_positions_and_compact_view_packs_them():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=3)
    # Row 0 stores positions 0, 2, 5; row 1 stores only 4 (the -1 entries are padding).
    cache.store(0, keys, values, torch.tensor([[0, 2, 5], [4, -1, -1]]))
    assert cache.key_mask(0).sum(dim=1).tolist() == [3, 1]
    view = cache.gather(0, compact=True)
    assert view.keys.shape == (B, H, 3, D)
    assert view.key_positions.tolist() == [[0, 2, 5], [4, -1, -1]]
    assert view.key_mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(view.keys[0], keys[0])
    assert torch.equal(view.keys[1, :, 0], keys[1, :, 0])
    bias = view.additive_mask()
    assert bias.shape == (B, 1, 1, 3) and bias[1, 0, 0, 1] < -1e30 and bias[1, 0, 0, 0] == 0


def test_append_continues_after_the_last_slot():
    cache = PositionalKVCache(num_layers=2)
    keys, values = kv(q_len=3)
    assert cache.append(1, keys, values).tolist() == [0, 1, 2]
    assert cache.append(1, keys[:, :, :1], values[:, :, :1]).tolist() == [3]
    assert cache.length(1) == 4 and cache.length(0) == 0 and cache.length() == 4
    assert torch.equal(cache.gather(1).keys[:, :, 3], keys[:, :, 0])


# ----------------------------------------------------------------------------- delayed commit


def test_delayed_commit_position_decoded_at_t_is_reusable_from_t_plus_2():
    cache = PositionalKVCache(num_layers=1)  # commit_delay=1
    keys, values = kv(q_len=4)
    t = 3
    cache.store(0, keys, values, [0, 1, 2, 3], step=t)  # forward of step t: position 2 still masked
    cache.mark_decoded([2], step=t)  # position 2 gets its token at the end of step t
    assert not cache.reusable(t + 1)[:, 2].any()  # its K/V are from the mask token
    cache.store(0, keys[:, :, 2:3], values[:, :, 2:3], [2], step=t + 1)  # recomputed at t+1
    assert not cache.reusable(t + 1)[:, 2].any()  # written in this very step: not "cached"
    assert cache.reusable(t + 2)[:, 2].all()
    assert not cache.reusable(t + 2)[:, [0, 1, 3]].any()  # never decoded: still masked


def test_delayed_commit_without_recompute_stays_unusable():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=2)
    cache.store(0, keys, values, [0, 1], step=0)
    cache.mark_decoded([1], step=0)
    assert not cache.reusable(5)[:, 1].any()  # stale K/V of the mask token are never reused


def test_commit_delay_zero_reuses_from_next_step():
    cache = PositionalKVCache(num_layers=1, commit_delay=0)
    keys, values = kv(q_len=2)
    cache.store(0, keys, values, [0, 1], step=4)
    cache.mark_decoded([1], step=4)
    assert cache.reusable(5)[:, 1].all()


def test_prompt_marked_at_step_minus_one_is_reusable_from_step_one_and_refresh_clears():
    cache = PositionalKVCache(num_layers=2)
    keys, values = kv(q_len=3)
    cache.mark_decoded(torch.tensor([[True, True, False]] * B), step=-1)
    for layer in range(2):
        cache.store(layer, keys, values, [0, 1, 2], step=0)
    assert cache.reusable(1).tolist() == [[True, True, False]] * B
    cache.refresh()
    assert not cache.reusable(1).any()
    assert cache.decoded_mask().tolist() == [[True, True, False]] * B  # records stay
    for layer in range(2):
        cache.store(layer, keys, values, [0, 1, 2], step=6)
    assert cache.reusable(7).tolist() == [[True, True, False]] * B


def test_reusable_over_all_layers_needs_every_layer():
    cache = PositionalKVCache(num_layers=2)
    keys, values = kv(q_len=2)
    cache.mark_decoded(torch.tensor([[0, 1]] * B), step=-1)
    cache.store(0, keys, values, [0, 1], step=0)
    cache.store(1, keys[:, :, :1], values[:, :, :1], [0], step=0)  # layer 1 lacks position 1
    assert cache.reusable(1, layer=0).tolist() == [[True, True]] * B
    assert cache.reusable(1).tolist() == [[True, False]] * B


def test_per_row_decoding_steps():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=2)
    cache.mark_decoded(torch.tensor([[0, -1], [1, -1]]), step=0)  # row 0 decodes 0, row 1 decodes 1
    cache.store(0, keys, values, [0, 1], step=1)
    assert cache.reusable(2).tolist() == [[True, False], [False, True]]


# ----------------------------------------------------------------------------- crop / rows


def test_crop_drops_positions_and_records():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=5)
    cache.store(0, keys, values, list(range(5)), step=0)
    cache.mark_decoded(list(range(5)), step=-1)
    cache.crop(3)
    assert cache.length(0) == 3
    assert torch.equal(cache.gather(0).keys, keys[:, :, :3])
    assert cache.decoded_mask().shape == (B, 3)
    cache.crop(10)  # longer than held: nothing changes
    assert cache.length(0) == 3


def test_crop_per_row_lengths():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=5)
    cache.store(0, keys, values, list(range(5)), step=0)
    cache.mark_decoded(list(range(5)), step=-1)
    cache.crop(torch.tensor([2, 4]))
    assert cache.length(0) == 4
    assert cache.key_mask(0).tolist() == [[True, True, False, False], [True] * 4]
    assert cache.decoded_mask().tolist() == [[True, True, False, False], [True] * 4]
    # A cropped position must be stored again before it can be reused.
    assert not cache.reusable(1)[0, 2:].any()


def test_select_rows_reorders_and_repeats():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(batch=3, q_len=2)
    cache.store(0, keys, values, torch.tensor([[0, 1], [0, -1], [1, -1]]))
    cache.mark_decoded(torch.tensor([[0], [1], [0]]), step=2)
    cache.select_rows(torch.tensor([2, 0, 0, 1]))
    assert cache.batch_size == 4
    view = cache.gather(0)
    assert torch.equal(view.keys[0, :, 1], keys[2, :, 0])
    assert torch.equal(view.keys[2], keys[0])
    assert view.key_mask.tolist() == [[False, True], [True, True], [True, True], [True, False]]
    assert cache.decoded_mask().tolist() == [
        [True, False],
        [True, False],
        [True, False],
        [False, True],
    ]


# ----------------------------------------------------------------------------- evict / admit


def test_evict_and_admit_keep_absolute_positions():
    cache = PositionalKVCache(num_layers=2)
    keys, values = kv(q_len=5)
    for layer in range(2):
        cache.store(layer, keys, values, list(range(5)))
    cache.evict([1, 3], layer=1)
    assert cache.key_mask(0).all()
    assert cache.key_mask(1).tolist() == [[True, False, True, False, True]] * B
    view = cache.gather(1, compact=True)
    assert view.key_positions.tolist() == [[0, 2, 4]] * B
    assert torch.equal(view.keys, keys[:, :, [0, 2, 4]])  # K/V untouched, positions kept
    cache.admit([3], layer=1)
    assert cache.gather(1, compact=True).key_positions.tolist() == [[0, 2, 3, 4]] * B
    # Per-row eviction: row 1 drops position 0 only.
    cache.evict(torch.tensor([[-1], [0]]))
    assert cache.key_mask(0).tolist() == [[True] * 5, [False, True, True, True, True]]


def test_store_over_an_evicted_position_makes_it_valid_again():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=2)
    cache.store(0, keys, values, [0, 1])
    cache.evict([1])
    cache.store(0, keys[:, :, :1], values[:, :, :1], [1])
    assert cache.key_mask(0).all()


def test_admit_needs_stored_kv():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=3)
    cache.store(0, keys, values, [0, 1, 2])
    cache.refresh()
    with pytest.raises(CacheError, match="holds no K/V"):
        cache.admit([1])


# ----------------------------------------------------------------------------- errors


def test_clear_errors_for_bad_input():
    cache = PositionalKVCache(num_layers=2, max_length=8)
    keys, values = kv(q_len=2)
    with pytest.raises(CacheError, match=r"out of range.*\[0, 8\)"):
        cache.store(0, keys, values, [7, 8])
    with pytest.raises(CacheError, match="must be >= 0"):
        cache.store(0, keys, values, [-1, 2])
    with pytest.raises(CacheError, match="keys have Q=2"):
        cache.store(0, keys, values, [0, 1, 2])
    with pytest.raises(CacheError, match=r"\(B, H, Q, D\)"):
        cache.store(0, keys[0], values[0], [0, 1])
    with pytest.raises(CacheError, match="layer must be an int in"):
        cache.store(2, keys, values, [0, 1])
    with pytest.raises(CacheError, match="names a position twice"):
        cache.store(0, keys, values, [1, 1])
    cache.store(0, keys, values, [0, 1])
    with pytest.raises(CacheError, match="select_rows"):
        cache.store(0, *kv(batch=3, q_len=2), [0, 1])
    with pytest.raises(
        CacheError, match=r"cannot evict position 5: layer 0 holds positions \[0, 2\)"
    ):
        cache.evict([5], layer=0)
    with pytest.raises(CacheError, match="row indices must lie in"):
        cache.select_rows([0, 2])
    with pytest.raises(CacheError, match="crop length must be an int >= 0"):
        cache.crop(-1)
    with pytest.raises(CacheError, match="step index as an int"):
        cache.mark_decoded([0], step=torch.tensor(981))
    with pytest.raises(CacheError, match="integer indices or a bool mask"):
        cache.evict(torch.tensor([0.5]))
    with pytest.raises(CacheError, match="commit_delay"):
        PositionalKVCache(num_layers=1, commit_delay=-1)


# ----------------------------------------------------------------------------- memo


def test_memo_is_keyed_by_step_index_not_timestep_value():
    memo = StepFeatureMemo()
    timesteps = [999, 500, 500, 1]  # a repeated timestep value, as in some schedulers
    for i, _timestep in enumerate(timesteps):
        memo.put(i, "mid", torch.full((1,), float(i)))
    assert memo.get(1, "mid").item() == 1.0 and memo.get(2, "mid").item() == 2.0
    assert memo.steps() == [0, 1, 2, 3]
    with pytest.raises(CacheError, match="not the timestep"):
        memo.put(torch.tensor(500), "mid", torch.zeros(1))
    with pytest.raises(CacheError, match="step index"):
        memo.get(500.0, "mid")


def test_memo_get_latest_cap_and_clear():
    memo = StepFeatureMemo(max_steps=2)
    memo.put(0, "down", "a")
    memo.put(0, "mid", "b")
    memo.put(3, "down", "c")
    assert memo.latest("down", at_or_before=2) == (0, "a")
    assert memo.latest("down", at_or_before=7) == (3, "c")
    memo.put(5, "down", "d")  # over the cap: step 0 goes
    assert memo.steps() == [3, 5] and not memo.has(0, "mid")
    assert memo.get(0, "mid", default=None) is None
    with pytest.raises(KeyError, match=r"steps holding it: \[3, 5\]"):
        memo.get(4, "down")
    memo.clear(3)
    assert memo.steps() == [5]
    memo.clear()
    assert len(memo) == 0
    with pytest.raises(KeyError):
        memo.latest("down", at_or_before=9)


# ----------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def llama():
    """A tiny random LlamaForCausalLM in float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).double().eval()


def cache_kwarg(model) -> str:
    """The name under which this transformers version takes a cache in a forward."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
    from transformers import DynamicCache

    ids = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(5))
    name = cache_kwarg(llama)
    ours, theirs = TransformersKVCache(config=llama.config), DynamicCache(config=llama.config)
    llama(ids, **{name: ours}, use_cache=True)
    llama(ids, **{name: theirs}, use_cache=True)
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
    from transformers import DynamicCache

    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    name = cache_kwarg(llama)
    ours, theirs = TransformersKVCache(config=llama.config), DynamicCache(config=llama.config)
    llama(ids, **{name: ours}, use_cache=True)
    llama(ids, **{name: theirs}, use_cache=True)
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
    plain = DynamicCache(config=llama.config)
    llama(ids, **{name: plain}, use_cache=True)
    unmasked = llama(torch.full((2, 1), 11), **{name: plain}, use_cache=True).logits
    ours2 = TransformersKVCache(config=llama.config)
    llama(ids, **{name: ours2}, use_cache=True)
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
