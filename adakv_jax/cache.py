"""The paged per-head KV cache: the one layout of the full cache and of every compressed cache.

Each (layer, sequence, cache head) owns whole pages of `page_size` entries from its layer's pool and a
length; entry j of a head lives at page `page_table[l, b, h, j // P]`, slot `j % P`, and is live iff
j < lengths[l, b, h]. Entries past the length, and pages a head does not own, are dead: nothing reads
them. Keys are stored after RoPE, so the order of a head's entries is irrelevant to attention.

Every layer has a pool of its own size (a pyramid's lower layers keep more), and pools are sized before
prefill from what the press keeps (`CachePlan`), so memory follows the kept entries, not the largest
layer, head or sequence. Layers stay separate arrays because a decode step that slices one big pool copies
the slice on CPU (measured: twice the bytes a step streams).

Page tables hold page ids local to a mesh shard: the pool of a layer is split evenly over the
("data", "model") mesh shards, and the pages of the heads a shard owns live in its slice of the pool.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels.paged_attention import check_page_size

DEFAULT_PAGE_SIZE = 16


class CacheCapacityError(RuntimeError):
  """A write would run past the pages a head owns; raised on the host before the write."""


def capacity_error(room_needed: int, room_left: int) -> CacheCapacityError:
  return CacheCapacityError(
    f"KV cache capacity exhausted: {room_needed} more token(s) were asked for but the fullest head has "
    f"room for {room_left}; reserve more room when the cache is made (max_new_tokens / question "
    f"length, or CachePlan room)"
  )


# ---- static sizing -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """Static shapes of one cache: hashable, so jitted functions take it as a static argument.

  layer_pages: pages in each layer's pool, summed over mesh shards (each shard holds an equal slice).
  max_pages: page-table width, the most pages one head can own.
  room: entries each head can take past what prefill keeps (questions and generated tokens).
  shards: (data, model) mesh shards the pool is split over; (1, 1) on one device.
  """

  page_size: int
  layer_pages: tuple[int, ...]
  max_pages: int
  room: int
  shards: tuple[int, int] = (1, 1)

  def __post_init__(self):
    check_page_size(self.page_size)
    n = self.shards[0] * self.shards[1]
    if any(p % n for p in self.layer_pages):
      raise ValueError(f"layer_pages {self.layer_pages} must split evenly over {n} shards")

  @property
  def num_layers(self) -> int:
    return len(self.layer_pages)

  def pages_per_shard(self, layer: int) -> int:
    return self.layer_pages[layer] // (self.shards[0] * self.shards[1])


def pages_for(entries, page_size: int):
  """Pages that hold `entries` entries (numpy or jnp ints)."""
  return -(-entries // page_size)


def plan_cache(
  num_layers: int,
  cache_heads: int,
  prompt_lens: Sequence[int],
  *,
  room: int,
  press=None,
  page_size: int = DEFAULT_PAGE_SIZE,
  shards: tuple[int, int] = (1, 1),
) -> CachePlan:
  """Sizes every layer's pool before prefill, from the entries the press keeps.

  Uniform allocation, page granularity and the full cache know each head's kept entries exactly, so
  their pools are exact. Token-granular adaptive allocation knows only each head group's total, so a
  group of H_g heads gets floor((total + H_g * (room + P - 1)) / P) pages: kept + room + at most one
  partial page per head. Sequences and head groups are sized one by one: a ragged batch pays for its
  own entries, and a mesh shard for its own heads (the slice of the fullest shard, times the shards).
  """
  check_page_size(page_size)
  data, model = shards
  lens = np.asarray(prompt_lens, np.int64)
  b = len(lens)
  if b % data or cache_heads % model:
    raise ValueError(f"batch {b} / cache heads {cache_heads} do not split over the mesh {data}x{model}")
  if press is None:
    per_head = pages_for(np.broadcast_to(lens[None, :], (num_layers, b)) + room, page_size)  # [L, B]
    group_pages = np.repeat((per_head * (cache_heads // model))[..., None], model, axis=-1)  # [L, B, model]
    head_max = per_head
  else:
    if press.head_groups % model:
      raise ValueError(
        f"press.head_groups={press.head_groups} must be a multiple of the mesh's model "
        f"shards ({model}): each shard selects within its own heads"
      )
    group_pages, head_max = press.page_needs(num_layers, lens, cache_heads, room, page_size)
  # shard (d, m) holds data slice d's sequences and the head groups of model slice m
  g = group_pages.shape[-1]
  per_shard = group_pages.reshape(num_layers, data, b // data, model, g // model).sum(axis=(2, 4))
  layer_pages = tuple(int(data * model * max(int(per_shard[l].max()), 1)) for l in range(num_layers))
  return CachePlan(
    page_size=page_size,
    layer_pages=layer_pages,
    max_pages=max(int(head_max.max()), 1),
    room=int(room),
    shards=shards,
  )


# ---- the cache pytree --------------------------------------------------------------------------------


@struct.dataclass
class PagedKVCache:
  k_pages: tuple[jax.Array, ...]  # per layer [N_l, P, D]
  v_pages: tuple[jax.Array, ...]  # per layer [N_l, P, D]
  page_table: jax.Array  # [L, B, H', M] int32, page ids local to the shard that owns the head
  num_pages: jax.Array  # [L, B, H'] int32: pages each head owns (its capacity is num_pages * P)
  lengths: jax.Array  # [L, B, H'] int32: live entries per head
  pos: jax.Array  # [B] int32: absolute position (RoPE) of each sequence's next token

  @property
  def page_size(self) -> int:
    return self.k_pages[0].shape[1]

  @property
  def num_layers(self) -> int:
    return len(self.k_pages)

  @property
  def num_heads(self) -> int:
    return self.lengths.shape[2]

  @property
  def entry_bytes(self) -> int:
    """Bytes of one cached entry: its key and its value."""
    return 2 * self.k_pages[0].shape[-1] * self.k_pages[0].dtype.itemsize

  def nbytes(self) -> int:
    """K/V bytes allocated on device: every page of every pool, used or not."""
    return sum(int(k.size) * k.dtype.itemsize for k in self.k_pages + self.v_pages)

  def metadata_bytes(self) -> int:
    return sum(
      int(x.size) * x.dtype.itemsize for x in (self.page_table, self.num_pages, self.lengths, self.pos)
    )

  def kept_bytes(self) -> int:
    """Bytes of the live entries (one device read)."""
    return int(jnp.sum(self.lengths)) * self.entry_bytes

  def pages_used(self) -> int:
    return int(jnp.sum(self.num_pages))

  def pages_allocated(self) -> int:
    return sum(int(k.shape[0]) for k in self.k_pages)

  def room_left(self) -> int:
    """Entries the fullest head can still take (one device read)."""
    return int(jnp.min(self.num_pages * self.page_size - self.lengths))

  def check_room(self, new_tokens: int) -> None:
    """Host-side guard before appending `new_tokens` tokens to every head."""
    left = self.room_left()
    if new_tokens > left:
      raise capacity_error(new_tokens, left)

  def rollback(self, lengths: jax.Array, pos: jax.Array) -> PagedKVCache:
    """Forgets everything appended after a saved (lengths, pos): entries past a head's length are dead.
    Save them on the host (np.asarray): a device copy would be donated with the cache."""
    return self.replace(lengths=jnp.asarray(lengths, jnp.int32), pos=jnp.asarray(pos, jnp.int32))

  def trim(self, shards: int = 1) -> PagedKVCache:
    """Drops the pool pages no head owns, so the pools hold exactly the pages in use (prefill assigns
    each shard's pages contiguously from its first page; `shards`: mesh shards the pools are split over).
    One device read; the result has new shapes, so a jitted step compiles once more for it."""
    used = np.asarray(jax.device_get(self.page_table_max_used()))
    k, v = [], []
    for l in range(self.num_layers):
      n_loc = self.k_pages[l].shape[0] // shards
      keep = max(int(used[l]), 1)
      cut = lambda x: x.reshape(shards, n_loc, *x.shape[1:])[:, :keep].reshape(shards * keep, *x.shape[1:])
      k.append(self.k_pages[l] if keep >= n_loc else cut(self.k_pages[l]))
      v.append(self.v_pages[l] if keep >= n_loc else cut(self.v_pages[l]))
    return self.replace(k_pages=tuple(k), v_pages=tuple(v))

  def page_table_max_used(self) -> jax.Array:
    """[L]: one past the highest page id any head owns, per layer (ids are local to a shard: this is the
    fullest shard's count)."""
    slot = jnp.arange(self.page_table.shape[-1])[None, None, None, :]
    owned = slot < self.num_pages[..., None]
    return jnp.max(jnp.where(owned, self.page_table + 1, 0), axis=(1, 2, 3))


def empty_cache(plan: CachePlan, batch: int, heads: int, head_dim: int, dtype) -> PagedKVCache:
  """A cache whose heads own no pages (lengths 0): the starting point of `assign_pages`."""
  zeros = lambda n: jnp.zeros((n, plan.page_size, head_dim), dtype)
  layers = plan.num_layers
  return PagedKVCache(
    k_pages=tuple(zeros(n) for n in plan.layer_pages),
    v_pages=tuple(zeros(n) for n in plan.layer_pages),
    page_table=jnp.zeros((layers, batch, heads, plan.max_pages), jnp.int32),
    num_pages=jnp.zeros((layers, batch, heads), jnp.int32),
    lengths=jnp.zeros((layers, batch, heads), jnp.int32),
    pos=jnp.zeros((batch,), jnp.int32),
  )


# ---- writing one layer's pages -----------------------------------------------------------------------


def assign_pages(num_pages_BH: jax.Array, max_pages: int) -> jax.Array:
  """Page table [B, H, M] for heads that need num_pages_BH pages each, assigned contiguously in
  (sequence, head) order from page 0; slots past a head's pages hold -1 (never dereferenced)."""
  b, h = num_pages_BH.shape
  first_BH = (jnp.cumsum(num_pages_BH.reshape(-1)) - num_pages_BH.reshape(-1)).reshape(b, h)
  slot_M = jnp.arange(max_pages, dtype=jnp.int32)
  table = first_BH[:, :, None] + slot_M[None, None, :]
  return jnp.where(slot_M[None, None, :] < num_pages_BH[:, :, None], table, -1).astype(jnp.int32)


def kept_positions(keep_BHL: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """Kept positions of each head in ascending order, -1-padded to `width`, and their count."""
  b, h, n = keep_BHL.shape
  slot_BHL = jnp.where(keep_BHL, jnp.cumsum(keep_BHL, axis=-1, dtype=jnp.int32) - 1, width)
  pos_BHL = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, h, n))
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  positions = jnp.full((b, h, width), -1, jnp.int32).at[bi, hi, slot_BHL].set(pos_BHL, mode="drop")
  return positions, jnp.sum(keep_BHL, axis=-1, dtype=jnp.int32)


def page_owners(page_table_BHM: jax.Array, num_pages_BH: jax.Array, pool_pages: int):
  """Inverse of a page table: for each pool page, its owner (b * H + h, or -1) and its index in the
  owner's page list."""
  b, h, m = page_table_BHM.shape
  owned = jnp.arange(m)[None, None, :] < num_pages_BH[:, :, None]
  target = jnp.where(owned, page_table_BHM, pool_pages).reshape(-1)  # unowned slots: dropped
  owner = jnp.broadcast_to(jnp.arange(b * h, dtype=jnp.int32).reshape(b, h, 1), (b, h, m)).reshape(-1)
  index = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, h, m)).reshape(-1)
  owner_N = jnp.full((pool_pages,), -1, jnp.int32).at[target].set(owner, mode="drop")
  index_N = jnp.zeros((pool_pages,), jnp.int32).at[target].set(index, mode="drop")
  return owner_N, index_N


def write_prompt_pages(
  k_BKLD: jax.Array,
  v_BKLD: jax.Array,
  positions_BHC: jax.Array,
  kept_BH: jax.Array,
  *,
  pool_pages: int,
  page_size: int,
  max_pages: int,
  room: int,
):
  """One layer's pages from its full prompt K/V and each cache head's kept positions.

  Cache head h reads KV head h // (H / K) (H > K only at query-head granularity). Each head gets
  ceil((kept + room) / P) pages, assigned contiguously; its entries keep the order of `positions_BHC`.
  Returns (k_pages [N, P, D], v_pages, page_table [B, H, M], num_pages [B, H]). The pool is one gather
  from the prompt's K/V: no per-head intermediate copy.
  """
  b, kh, n, d = k_BKLD.shape
  h = positions_BHC.shape[1]
  num_pages_BH = pages_for(kept_BH + room, page_size).astype(jnp.int32)
  table_BHM = assign_pages(num_pages_BH, max_pages)
  owner_N, index_N = page_owners(table_BHM, num_pages_BH, pool_pages)
  # pool row r: page r // P of its owner's list, slot r % P -> entry j of the owner
  owner_R = jnp.repeat(owner_N, page_size)
  entry_R = jnp.repeat(index_N, page_size) * page_size + jnp.tile(jnp.arange(page_size), pool_pages)
  safe_owner = jnp.maximum(owner_R, 0)
  b_R, h_R = safe_owner // h, safe_owner % h
  width = positions_BHC.shape[2]
  src_R = positions_BHC[b_R, h_R, jnp.minimum(entry_R, width - 1)]
  live_R = (owner_R >= 0) & (entry_R < kept_BH[b_R, h_R]) & (entry_R < width)
  kv_R = h_R // (h // kh)
  flat = lambda x: x.reshape(b * kh * n, d)
  row = (b_R * kh + kv_R) * n + jnp.maximum(src_R, 0)
  live = live_R[:, None]
  k_pages = jnp.where(live, flat(k_BKLD)[row], 0).astype(k_BKLD.dtype).reshape(pool_pages, page_size, d)
  v_pages = jnp.where(live, flat(v_BKLD)[row], 0).astype(v_BKLD.dtype).reshape(pool_pages, page_size, d)
  return k_pages, v_pages, table_BHM, num_pages_BH


def write_new_entries(k_pages_NPD, v_pages_NPD, page_table_BHM, lengths_BH, k_BHTD, v_BHTD, n_valid_B):
  """Appends each sequence's first n_valid_B of T new entries to every head, in place when donated.

  Writes that would land past a head's pages are dropped here; callers check the room on the host first
  (PagedKVCache.check_room), so none happen.
  """
  b, h, t, _ = k_BHTD.shape
  p = k_pages_NPD.shape[1]
  j_BHT = lengths_BH[:, :, None] + jnp.arange(t, dtype=jnp.int32)[None, None, :]
  slot = jnp.minimum(j_BHT // p, page_table_BHM.shape[-1] - 1)
  page_BHT = jnp.take_along_axis(page_table_BHM, slot, axis=2)
  ok = (jnp.arange(t)[None, None, :] < n_valid_B[:, None, None]) & (page_BHT >= 0)
  ok &= j_BHT // p < page_table_BHM.shape[-1]
  page_BHT = jnp.where(ok, page_BHT, k_pages_NPD.shape[0])  # out of range: dropped
  k_pages_NPD = k_pages_NPD.at[page_BHT, j_BHT % p].set(k_BHTD.astype(k_pages_NPD.dtype), mode="drop")
  v_pages_NPD = v_pages_NPD.at[page_BHT, j_BHT % p].set(v_BHTD.astype(v_pages_NPD.dtype), mode="drop")
  return k_pages_NPD, v_pages_NPD


# ---- a cache's live entries, packed (saved contexts) -----------------------------------------------------


def plan_for_lengths(lengths_LBH, *, room: int, page_size: int, max_pages: int | None = None) -> CachePlan:
  """The exact plan of a cache whose heads hold `lengths_LBH` entries and take `room` more: each layer's
  pool is the pages its heads need (host side; a single device). max_pages: a wider page table than
  the fullest head needs (to match another cache's shapes)."""
  lengths = np.asarray(lengths_LBH, np.int64)
  pages_LBH = pages_for(lengths + room, page_size)
  need = max(int(pages_LBH.max()), 1)
  if max_pages is not None and max_pages < need:
    raise ValueError(f"max_pages={max_pages} is fewer than the {need} pages the fullest head needs")
  return CachePlan(
    page_size=page_size,
    layer_pages=tuple(max(int(n), 1) for n in pages_LBH.sum(axis=(1, 2))),
    max_pages=need if max_pages is None else int(max_pages),
    room=int(room),
  )


def live_entries(cache: PagedKVCache):
  """Every head's live entries, packed on the host: (k [E, D], v [E, D], lengths [L, B, H']) with the E
  entries in (layer, sequence, head, storage) order. One device read of the cache (a single device)."""
  lengths = np.asarray(jax.device_get(cache.lengths))
  table = np.asarray(jax.device_get(cache.page_table))
  p = cache.page_size
  rows = []
  for l in range(cache.num_layers):
    j_C = np.arange(max(int(lengths[l].max()), 1))
    live_BHC = j_C[None, None, :] < lengths[l][..., None]
    page_BHC = table[l][..., np.minimum(j_C // p, table.shape[-1] - 1)]
    rows.append((page_BHC * p + j_C % p)[live_BHC])
  k = [
    np.asarray(jax.device_get(cache.k_pages[l])).reshape(-1, cache.k_pages[l].shape[-1])[r]
    for l, r in enumerate(rows)
  ]
  v = [
    np.asarray(jax.device_get(cache.v_pages[l])).reshape(-1, cache.v_pages[l].shape[-1])[r]
    for l, r in enumerate(rows)
  ]
  return np.concatenate(k), np.concatenate(v), lengths


def cache_from_entries(
  k_ED, v_ED, lengths_LBH, pos_B, *, room: int, page_size: int, max_pages: int | None = None
) -> PagedKVCache:
  """The inverse of `live_entries`: a cache holding those entries, laid out as prefill lays out a cache
  of these lengths (pages assigned contiguously, ceil((length + room) / P) per head, `plan_for_lengths`)."""
  lengths = np.asarray(lengths_LBH, np.int64)
  k_ED, v_ED = np.asarray(k_ED), np.asarray(v_ED)
  if k_ED.shape != v_ED.shape or k_ED.ndim != 2 or len(k_ED) != lengths.sum():
    raise ValueError(
      f"packed keys {k_ED.shape} / values {v_ED.shape} must both be [E, D] with E = "
      f"{int(lengths.sum())}, the sum of the lengths"
    )
  plan = plan_for_lengths(lengths, room=room, page_size=page_size, max_pages=max_pages)
  starts = np.concatenate([[0], np.cumsum(lengths.reshape(-1))])[:-1].reshape(lengths.shape)
  ks, vs, tables, counts = [], [], [], []
  for l in range(plan.num_layers):
    j_C = np.arange(max(int(lengths[l].max()), 1))
    idx_BHC = np.where(j_C < lengths[l][..., None], starts[l][..., None] + j_C, 0)
    kept_BH = jnp.asarray(lengths[l], jnp.int32)
    positions_BHC = jnp.broadcast_to(jnp.asarray(j_C, jnp.int32), idx_BHC.shape)
    k_p, v_p, table, num_pages = write_prompt_pages(
      jnp.asarray(k_ED[idx_BHC]),
      jnp.asarray(v_ED[idx_BHC]),
      positions_BHC,
      kept_BH,
      pool_pages=plan.layer_pages[l],
      page_size=page_size,
      max_pages=plan.max_pages,
      room=room,
    )
    ks.append(k_p)
    vs.append(v_p)
    tables.append(table)
    counts.append(num_pages)
  return PagedKVCache(
    k_pages=tuple(ks),
    v_pages=tuple(vs),
    page_table=jnp.stack(tables),
    num_pages=jnp.stack(counts),
    lengths=jnp.asarray(lengths, jnp.int32),
    pos=jnp.asarray(pos_B, jnp.int32),
  )


def with_room(cache: PagedKVCache, room: int, max_pages: int | None = None) -> PagedKVCache:
  """The same live entries in a fresh exact layout with `room` free entries per head (single device)."""
  k, v, lengths = live_entries(cache)
  return cache_from_entries(
    k, v, lengths, jax.device_get(cache.pos), room=room, page_size=cache.page_size, max_pages=max_pages
  )


def cache_bytes_of(plan: CachePlan, head_dim: int, dtype) -> int:
  """Allocated K/V bytes of a cache made from `plan`."""
  return 2 * sum(plan.layer_pages) * plan.page_size * head_dim * jnp.dtype(dtype).itemsize


__all__ = [
  "CacheCapacityError",
  "CachePlan",
  "PagedKVCache",
  "DEFAULT_PAGE_SIZE",
  "plan_cache",
  "empty_cache",
  "assign_pages",
  "kept_positions",
  "page_owners",
  "write_prompt_pages",
  "write_new_entries",
  "pages_for",
  "cache_bytes_of",
  "plan_for_lengths",
  "live_entries",
  "cache_from_entries",
  "with_room",
]
