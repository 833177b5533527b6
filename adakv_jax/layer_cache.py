"""One attention layer's compressed paged cache, for any model: the press and the cache without ModelConfig.

A model brings, for each attention layer, the arrays it already computes (queries and keys after its
positional encoding, values); head counts, head dim and dtype are read off them:

    plan = plan_layers(press, num_layers, num_heads, num_kv_heads, prompt_lens, room=new_tokens)
    cache_l, info = compress_prompt(press, q_win_BHWD, k_BKLD, v_BKLD, len_B, plan=plan, layer=l)
    cache_l = append_kv(cache_l, k_BKTD, v_BKTD, n_valid_B)    # T new tokens of each sequence
    o_BHTD = attend(cache_l, q_BHTD, n_valid_B)                 # their queries over the cache

The Llama-family model (model.py) runs its own layers through the same functions. `LayerCache` is one
layer of `PagedKVCache` (`layer_of`, `stack_layers` convert), so anything built on the library's cache
(saving a context, the byte counts) takes a model's own cache too. Positions (RoPE) stay the model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from adakv_jax import press as press_lib
from adakv_jax.cache import (
  DEFAULT_PAGE_SIZE,
  CachePlan,
  PagedKVCache,
  capacity_error,
  kept_positions,
  plan_cache,
  write_new_entries,
  write_prompt_pages,
)
from pallas_kernels.paged_attention import paged_attention


@struct.dataclass
class LayerCache:
  """One layer's paged cache; each cache head owns whole pages of the pool (see cache.py)."""

  k_pages: jax.Array  # [N, P, D] (keys after the model's positional encoding)
  v_pages: jax.Array  # [N, P, D]
  page_table: jax.Array  # [B, H', M] int32, -1 past a head's pages
  num_pages: jax.Array  # [B, H'] int32
  lengths: jax.Array  # [B, H'] int32: live entries per head

  @property
  def page_size(self) -> int:
    return self.k_pages.shape[1]

  @property
  def num_heads(self) -> int:
    return self.lengths.shape[1]

  def room_left(self) -> int:
    """Entries the fullest head can still take (one device read)."""
    return int(jnp.min(self.num_pages * self.page_size - self.lengths))

  def check_room(self, new_tokens: int) -> None:
    """Host-side guard before appending: a write past a head's pages would be dropped."""
    left = self.room_left()
    if new_tokens > left:
      raise capacity_error(new_tokens, left)


def plan_layers(
  press,
  num_layers: int,
  num_heads: int,
  num_kv_heads: int,
  prompt_lens: Sequence[int],
  *,
  room: int,
  page_size: int = DEFAULT_PAGE_SIZE,
) -> CachePlan:
  """Static pool sizes of every layer (cache.plan_cache) for a model with these head counts: room is the
  entries each head takes after the prompt (question and generated tokens). Host side, before jit."""
  if num_heads % num_kv_heads:
    raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
  heads = press.cache_heads(num_heads, num_kv_heads) if press is not None else num_kv_heads
  return plan_cache(num_layers, heads, prompt_lens, room=room, press=press, page_size=page_size)


def window_queries(q_BHLD: jax.Array, len_B: jax.Array, window: int) -> jax.Array:
  """The last `window` queries of each right-padded prompt [B, H, window, D] (slots before position 0 are
  clipped; the press masks them by position)."""
  idx_BW = jnp.clip(len_B[:, None] - window + jnp.arange(window)[None, :], 0, q_BHLD.shape[2] - 1)
  return jnp.take_along_axis(q_BHLD, idx_BW[:, None, :, None], axis=2)


def compress_prompt(
  press,
  q_win_BHWD: jax.Array | None,
  k_BKLD: jax.Array,
  v_BKLD: jax.Array,
  len_B: jax.Array,
  *,
  plan: CachePlan,
  layer: int,
  rng: jax.Array | None = None,
  colsum_BHL: jax.Array | None = None,
):
  """Layer `layer`'s cache from its right-padded prompt K/V [B, K, L, D] and the prompt lengths [B].

  q_win_BHWD: the last W >= press.window queries of each prompt (`window_queries`), H a multiple of K;
  None with press=None (the full cache keeps every entry). colsum_BHL: attention summed over the prompt's
  queries, for presses that score with it (H2O). The layer's share of the budget comes from the press's
  schedule over plan.num_layers layers; its pool and page-table width from the plan (`plan_layers`).
  Returns (LayerCache with kept + room capacity per head, info) with info["budgets"] [B, H'] kept entries,
  info["positions"] [B, H', C] kept prompt positions in storage order (-1 = none) and, with a press,
  info["retained_mass"] [B]. Jit-friendly (plan, layer and press static).
  """
  b, kh, n, d = k_BKLD.shape
  if v_BKLD.shape != k_BKLD.shape:
    raise ValueError(f"keys {k_BKLD.shape} and values {v_BKLD.shape} must both be [B, K, L, D]")
  if jnp.shape(len_B) != (b,):
    raise ValueError(f"len_B has shape {jnp.shape(len_B)}, expected [B={b}]")
  if plan.shards != (1, 1):
    raise ValueError(
      f"compress_prompt writes a single-device pool; the plan is split over {plan.shards} "
      "mesh shards (use model.prefill on a mesh)"
    )
  if not 0 <= layer < plan.num_layers:
    raise ValueError(f"layer {layer} is outside the plan's {plan.num_layers} layers")
  len_B = jnp.asarray(len_B, jnp.int32)
  if press is None:
    units_B = jnp.zeros((b,), jnp.int32)
  else:
    press.check_page_size(plan.page_size)
    units_B = press.layer_units(plan.num_layers, len_B, plan.page_size)[layer]
    if q_win_BHWD is None or q_win_BHWD.ndim != 4 or q_win_BHWD.shape[2] < press.window:
      shape = None if q_win_BHWD is None else q_win_BHWD.shape
      raise ValueError(
        f"q_win_BHWD {shape} must hold the last >= {press.window} queries (the press's "
        "window) of each prompt, [B, H, W, D]"
      )
    q_win_BHWD = q_win_BHWD[:, :, q_win_BHWD.shape[2] - press.window :]
    if press.needs_colsum and colsum_BHL is None:
      raise ValueError(
        f"the {press.scorer} scorer needs colsum_BHL: attention summed over the prompt's queries [B, H, L]"
      )
  cache, positions, info = select_and_write(
    press,
    q_win_BHWD,
    k_BKLD,
    v_BKLD,
    colsum_BHL,
    len_B,
    units_B,
    rng,
    pool_pages=plan.layer_pages[layer],
    page_size=plan.page_size,
    max_pages=plan.max_pages,
    room=plan.room,
    groups=None if press is None else press.head_groups,
  )
  return cache, dict(info, budgets=cache.lengths, positions=positions)


def select_and_write(
  press,
  q_win_BHWD,
  k_BKLD,
  v_BKLD,
  colsum_BHL,
  len_B,
  units_B,
  rng,
  *,
  pool_pages: int,
  page_size: int,
  max_pages: int,
  room: int,
  groups: int | None,
):
  """The press's kept entries of one layer (every live entry with press=None) written into a pool of
  `pool_pages` pages: (LayerCache, kept positions [B, H', max_pages * P], press info)."""
  b, kh, n, _ = k_BKLD.shape
  if press is None:
    live_BL = jnp.arange(n, dtype=jnp.int32)[None, :] < len_B[:, None]
    keep, info = jnp.broadcast_to(live_BL[:, None, :], (b, kh, n)), {}
  else:
    keep, info = press_lib.select(
      press,
      q_win_BHWD,
      k_BKLD,
      len_B,
      units_B,
      page_size=page_size,
      colsum_BHL=colsum_BHL if press.needs_colsum else None,
      rng=rng,
      groups=groups,
    )
  positions, kept = kept_positions(keep, max_pages * page_size)
  k_pages, v_pages, table, num_pages = write_prompt_pages(
    k_BKLD,
    v_BKLD,
    positions,
    kept,
    pool_pages=pool_pages,
    page_size=page_size,
    max_pages=max_pages,
    room=room,
  )
  cache = LayerCache(k_pages=k_pages, v_pages=v_pages, page_table=table, num_pages=num_pages, lengths=kept)
  return cache, positions, info


def append_kv(
  cache: LayerCache, k_BKTD: jax.Array, v_BKTD: jax.Array, n_valid_B: jax.Array | None = None
) -> LayerCache:
  """Writes each sequence's first n_valid_B (default all T) new keys/values [B, K, T, D] to every cache
  head and advances the lengths. K may be fewer than the cache heads H' (a query-head cache: each KV head
  serves H'/K of them). Writes past a head's pages are dropped: check the room first (check_room)."""
  b, kh, t, d = k_BKTD.shape
  hc = cache.num_heads
  if v_BKTD.shape != k_BKTD.shape or hc % kh or cache.lengths.shape[0] != b or cache.k_pages.shape[2] != d:
    raise ValueError(
      f"new keys {k_BKTD.shape} / values {v_BKTD.shape} must be [B, K, T, D] with B = "
      f"{cache.lengths.shape[0]}, K dividing the {hc} cache heads and D = "
      f"{cache.k_pages.shape[2]}"
    )
  n_valid_B = _n_valid(n_valid_B, b, t)
  if hc != kh:
    k_BKTD, v_BKTD = jnp.repeat(k_BKTD, hc // kh, axis=1), jnp.repeat(v_BKTD, hc // kh, axis=1)
  k_pages, v_pages = write_new_entries(
    cache.k_pages, cache.v_pages, cache.page_table, cache.lengths, k_BKTD, v_BKTD, n_valid_B
  )
  return cache.replace(k_pages=k_pages, v_pages=v_pages, lengths=cache.lengths + n_valid_B[:, None])


def attend(
  cache: LayerCache, q_BHTD: jax.Array, n_valid_B: jax.Array | None = None, *, backend: str = "auto"
) -> jax.Array:
  """Attention [B, H, T, D] of the T newest tokens' queries over each head's live entries, after
  `append_kv` wrote those tokens: token t of a sequence sees its head's entries up to and including its
  own (causal within the T). Queries past a sequence's n_valid_B give unspecified rows. H is a multiple
  of the cache heads H' (grouped queries share their head's entries)."""
  b, h, t, d = q_BHTD.shape
  hc = cache.num_heads
  if h % hc or cache.lengths.shape[0] != b or cache.k_pages.shape[2] != d:
    raise ValueError(
      f"queries {q_BHTD.shape} must be [B, H, T, D] with B = {cache.lengths.shape[0]}, H a "
      f"multiple of the {hc} cache heads and D = {cache.k_pages.shape[2]}"
    )
  n_valid_B = _n_valid(n_valid_B, b, t)
  # the kernel's chunk of T rows ends at its length; padded tokens were not written, so end it at T
  lengths = cache.lengths - n_valid_B[:, None] + t
  # fresh pages are zeros and only model outputs are written: dead entries are finite
  o = paged_attention(
    q_BHTD.reshape(b, hc, h // hc, t, d),
    cache.k_pages,
    cache.v_pages,
    cache.page_table,
    lengths,
    backend=backend,
    finite_dead=True,
  )
  return o.reshape(b, h, t, d)


def _n_valid(n_valid_B, b: int, t: int) -> jax.Array:
  if n_valid_B is None:
    return jnp.full((b,), t, jnp.int32)
  n_valid_B = jnp.asarray(n_valid_B, jnp.int32)
  if n_valid_B.shape != (b,):
    raise ValueError(f"n_valid_B has shape {n_valid_B.shape}, expected [B={b}]")
  return n_valid_B


# ---- a model's layers <-> the library's cache ----------------------------------------------------------


def layer_of(cache: PagedKVCache, layer: int) -> LayerCache:
  return LayerCache(
    k_pages=cache.k_pages[layer],
    v_pages=cache.v_pages[layer],
    page_table=cache.page_table[layer],
    num_pages=cache.num_pages[layer],
    lengths=cache.lengths[layer],
  )


def stack_layers(layers: Sequence[LayerCache], pos_B: jax.Array) -> PagedKVCache:
  """A PagedKVCache of a model's per-layer caches; pos_B: each sequence's next position."""
  if len({(c.page_table.shape, c.page_size) for c in layers}) != 1:
    raise ValueError("layers differ in page-table shape or page size: make them from one plan")
  stack = lambda name: jnp.stack([getattr(c, name) for c in layers])
  return PagedKVCache(
    k_pages=tuple(c.k_pages for c in layers),
    v_pages=tuple(c.v_pages for c in layers),
    page_table=stack("page_table"),
    num_pages=stack("num_pages"),
    lengths=stack("lengths"),
    pos=jnp.asarray(pos_B, jnp.int32),
  )


__all__ = [
  "LayerCache",
  "plan_layers",
  "window_queries",
  "compress_prompt",
  "append_kv",
  "attend",
  "layer_of",
  "stack_layers",
  "select_and_write",
]
