"""Tests of decodekit.kv_cache: K/V by absolute position, delayed commit, crop, rows, eviction."""

from __future__ import annotations

import pytest
import torch
from decodekit.kv_cache import CacheError, PositionalKVCache

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


def test_append_continues_after_the_last_slot():
    cache = PositionalKVCache(num_layers=2)
    keys, values = kv(q_len=3)
    assert cache.append(1, keys, values).tolist() == [0, 1, 2]
    assert cache.append(1, keys[:, :, :1], values[:, :, :1]).tolist() == [3]
    assert cache.length(1) == 4 and cache.length(0) == 0 and cache.length() == 4
    assert cache.holds_kv(1) and not cache.holds_kv(0)
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


def test_prompt_marked_at_step_minus_one_is_reusable_from_step_one():
    cache = PositionalKVCache(num_layers=2)
    keys, values = kv(q_len=3)
    cache.mark_decoded(torch.tensor([[True, True, False]] * B), step=-1)
    for layer in range(2):
        cache.store(layer, keys, values, [0, 1, 2], step=0)
    assert not cache.reusable(0).any()  # stored by this very step's forward
    assert cache.reusable(1).tolist() == [[True, True, False]] * B


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
    cache.crop(10)  # longer than held: nothing changes
    assert cache.length(0) == 3
    cache.store(0, keys, values, list(range(5)), step=1)  # positions 3 and 4 come back...
    assert cache.reusable(2).tolist() == [[True] * 3 + [False] * 2] * B  # ...undecoded


def test_crop_per_row_lengths():
    cache = PositionalKVCache(num_layers=1)
    keys, values = kv(q_len=5)
    cache.store(0, keys, values, list(range(5)), step=0)
    cache.mark_decoded(list(range(5)), step=-1)
    cache.crop(torch.tensor([2, 4]))
    assert cache.length(0) == 4
    assert cache.key_mask(0).tolist() == [[True, True, False, False], [True] * 4]
    # A cropped position must be stored again before it can be reused...
    assert not cache.reusable(1)[0, 2:].any()
    # ...and it lost its decoded record with its K/V.
    cache.store(0, keys[:, :, :4], values[:, :, :4], list(range(4)), step=1)
    assert cache.reusable(2).tolist() == [[True, True, False, False], [True] * 4]


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
    # The decoded records moved with the rows: store every position again, then ask.
    cache.store(0, *kv(batch=4, q_len=2), [0, 1], step=3)
    assert cache.reusable(4).tolist() == [
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
    cache.crop(torch.tensor([1, 3]))  # row 0 keeps position 0 only; the slots stay
    with pytest.raises(CacheError, match="position 1 of row 0 in layer 0: it holds no K/V"):
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
