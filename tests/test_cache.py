"""The paged per-head cache: static sizing, page assignment, page writes, appends, bytes, room, trim."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax.cache import (
  CacheCapacityError,
  CachePlan,
  PagedKVCache,
  assign_pages,
  kept_positions,
  page_owners,
  plan_cache,
  write_new_entries,
  write_prompt_pages,
)
from adakv_jax.press import Press

P = 8


def test_plan_sizes_the_full_cache_per_sequence_exactly():
  plan = plan_cache(num_layers=3, cache_heads=2, prompt_lens=[30, 5], room=4, page_size=P)
  # ceil((30 + 4) / 8) = 5 and ceil((5 + 4) / 8) = 2 pages per head: a ragged batch pays for its own
  assert plan.layer_pages == (2 * (5 + 2),) * 3
  assert plan.max_pages == 5 and plan.room == 4


def test_plan_is_exact_for_uniform_and_page_granularity_and_bounds_adaptive_tokens():
  lens = [200, 100]
  uni = plan_cache(2, 3, lens, room=8, page_size=P, press=Press(allocation="uniform", budget=40, window=8))
  assert uni.layer_pages == (2 * 3 * 6,) * 2  # (8 + 32 + 8) / 8 = 6 pages per head, every head
  page = plan_cache(2, 3, lens, room=8, page_size=P, press=Press(budget=40, window=8, granularity="page"))
  # tail = window 8 + (192 % 8 = 0; 92 % 8 = 4): (8 + 8) / 8 = 2 and ceil(20 / 8) = 3 pages per head,
  # plus the layer's 3 * 4 selected pages per sequence
  assert page.layer_pages == (3 * 2 + 12 + 3 * 3 + 12,) * 2
  ada = plan_cache(2, 3, lens, room=8, page_size=P, press=Press(budget=40, window=8))
  # group total 3 * 40 + 3 * 8 room = 144 entries = 18 pages, + at most one partial page per head
  assert ada.layer_pages == (2 * ((144 + 3 * 7) // P),) * 2
  pyr = plan_cache(4, 3, lens, room=8, page_size=P, press=Press(budget=40, window=8, schedule="pyramid"))
  assert pyr.layer_pages[0] > pyr.layer_pages[-1]  # each layer's pool has its own size


def test_plan_splits_the_pool_over_mesh_shards_and_checks_divisibility():
  plan = plan_cache(1, 4, [30, 30, 10, 10], room=2, page_size=P, shards=(2, 2))
  # data shard 0 holds the two 30-token prompts: 2 seq x 2 heads x 4 pages = 16 pages, the fullest shard
  assert plan.layer_pages == (4 * 16,) and plan.pages_per_shard(0) == 16
  with pytest.raises(ValueError, match="do not split over the mesh 2x2"):
    plan_cache(1, 3, [5, 5], room=1, page_size=P, shards=(2, 2))
  with pytest.raises(ValueError, match="head_groups=1 must be a multiple of the mesh's model shards"):
    plan_cache(1, 4, [5, 5], room=1, page_size=P, shards=(1, 2), press=Press(budget=40, window=8))


@pytest.mark.parametrize("bad", [0, 12, 4, 512, 16.0, True])
def test_page_sizes_the_kernels_cannot_use_are_refused(bad):
  with pytest.raises(ValueError, match=r"must be a power of two in \[8, 256\]"):
    plan_cache(1, 1, [4], room=1, page_size=bad)


def test_pages_are_assigned_contiguously_and_inverted_by_page_owners():
  num = jnp.asarray([[2, 0, 1], [3, 1, 0]], jnp.int32)
  table = np.asarray(assign_pages(num, max_pages=3))
  np.testing.assert_array_equal(
    table, [[[0, 1, -1], [-1, -1, -1], [2, -1, -1]], [[3, 4, 5], [6, -1, -1], [-1, -1, -1]]]
  )
  owner, index = (np.asarray(x) for x in page_owners(jnp.asarray(table), num, pool_pages=8))
  np.testing.assert_array_equal(owner, [0, 0, 2, 3, 3, 3, 4, -1])
  np.testing.assert_array_equal(index[:7], [0, 1, 0, 0, 1, 2, 0])


def _prompt(b=2, k=2, n=20, d=4, seed=0):
  r = np.random.default_rng(seed)
  return (
    jnp.asarray(r.normal(size=(b, k, n, d)), jnp.float32),
    jnp.asarray(r.normal(size=(b, k, n, d)), jnp.float32),
  )


@pytest.mark.parametrize("heads", [2, 4])  # 4 cache heads over 2 KV heads: query-head granularity
def test_prompt_pages_hold_each_heads_kept_entries_where_the_table_says(heads):
  k, v = _prompt()
  r = np.random.default_rng(1)
  keep = jnp.asarray(r.random((2, heads, 20)) < 0.4)
  positions, kept = kept_positions(keep, width=32)
  k_p, v_p, table, num = (
    np.asarray(x)
    for x in write_prompt_pages(k, v, positions, kept, pool_pages=40, page_size=P, max_pages=4, room=3)
  )
  kept, positions = np.asarray(kept), np.asarray(positions)
  np.testing.assert_array_equal(num, -(-(kept + 3) // P))
  used = set()
  for b in range(2):
    for h in range(heads):
      src = h // (heads // 2)
      for j in range(kept[b, h]):
        page, slot = table[b, h, j // P], j % P
        used.add(int(page))
        np.testing.assert_array_equal(k_p[page, slot], np.asarray(k)[b, src, positions[b, h, j]])
        np.testing.assert_array_equal(v_p[page, slot], np.asarray(v)[b, src, positions[b, h, j]])
      assert np.all(table[b, h, num[b, h] :] == -1)
  owned = {int(p) for b in range(2) for h in range(heads) for p in table[b, h, : num[b, h]]}
  assert not np.any(k_p[sorted(set(range(40)) - owned)])  # pages nobody owns stay zero


def _cache(lengths, num_pages, page_size=P, pool=12, d=4):
  lengths = jnp.asarray(lengths, jnp.int32)[None]
  num_pages = jnp.asarray(num_pages, jnp.int32)[None]
  table = assign_pages(num_pages[0], max_pages=int(num_pages.max()))[None]
  zeros = jnp.zeros((pool, page_size, d), jnp.float32)
  return PagedKVCache(
    k_pages=(zeros,),
    v_pages=(zeros + 0,),
    page_table=table,
    num_pages=num_pages,
    lengths=lengths,
    pos=jnp.asarray(lengths[0, :, 0]),
  )


def test_new_entries_land_after_each_heads_length_and_writes_past_its_pages_are_dropped():
  cache = _cache([[7, 8]], [[1, 2]])
  new_k = jnp.arange(1 * 2 * 3 * 4, dtype=jnp.float32).reshape(1, 2, 3, 4) + 1
  k_p, _ = write_new_entries(
    cache.k_pages[0], cache.v_pages[0], cache.page_table[0], cache.lengths[0], new_k, new_k, jnp.asarray([3])
  )
  k_p = np.asarray(k_p)
  np.testing.assert_array_equal(k_p[0, 7], np.asarray(new_k)[0, 0, 0])  # head 0: slot 7 of its one page
  np.testing.assert_array_equal(k_p[2, 0:3], np.asarray(new_k)[0, 1])  # head 1: entries 8, 9, 10 -> page 2
  # head 0 owns one page: its entries 8 and 9 have nowhere to go and are dropped, not written elsewhere
  assert not k_p[3:].any() and not k_p[1].any()
  n_valid = write_new_entries(
    cache.k_pages[0], cache.v_pages[0], cache.page_table[0], cache.lengths[0], new_k, new_k, jnp.asarray([1])
  )[0]
  assert not np.asarray(n_valid)[2, 1:3].any()  # only the first n_valid tokens are written


def test_bytes_room_rollback_and_the_host_side_guard():
  cache = _cache([[7, 8]], [[1, 2]])
  assert cache.nbytes() == 2 * 12 * P * 4 * 4
  assert cache.kept_bytes() == 15 * 2 * 4 * 4
  assert cache.pages_used() == 3 and cache.pages_allocated() == 12
  assert cache.room_left() == 1  # head 0 holds 7 of 8 slots
  cache.check_room(1)
  with pytest.raises(
    CacheCapacityError,
    match=r"2 more token\(s\) were asked for but the fullest head has "
    "room for 1",
  ):
    cache.check_room(2)
  back = cache.rollback(np.asarray([[[3, 4]]]), np.asarray([4]))
  assert back.room_left() == 5 and back.lengths.tolist() == [[[3, 4]]]


def test_trim_keeps_exactly_the_owned_pages_and_their_contents():
  cache = _cache([[7, 8]], [[1, 2]], pool=12)
  k = cache.k_pages[0].at[:3].set(1.0)
  cache = cache.replace(k_pages=(k,))
  trimmed = cache.trim()
  assert trimmed.k_pages[0].shape[0] == 3 and trimmed.v_pages[0].shape[0] == 3
  np.testing.assert_array_equal(np.asarray(trimmed.k_pages[0]), np.asarray(k[:3]))
  assert trimmed.room_left() == cache.room_left()


def test_a_cache_plan_is_a_static_hashable_value():
  plan = CachePlan(page_size=16, layer_pages=(4, 6), max_pages=3, room=2)
  assert hash(plan) == hash(CachePlan(page_size=16, layer_pages=(4, 6), max_pages=3, room=2))
  with pytest.raises(ValueError, match="must split evenly over 4 shards"):
    CachePlan(page_size=16, layer_pages=(6,), max_pages=1, room=0, shards=(2, 2))
  jax.jit(lambda x, plan: x + plan.room, static_argnums=1)(1, plan)
