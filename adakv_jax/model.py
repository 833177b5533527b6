"""The Llama-family forward pass as pure functions over a params pytree.

    embed -> [rmsnorm -> attention(rope) -> rmsnorm -> swiglu mlp] x L -> rmsnorm -> logits

One layer body, two drivers:
  * `run_prefill`: the one `lax.scan` over layers for a right-padded batch of prompts. Each layer hands
    what it computed (window queries, K, V, column sums) to a tap; `prefill` taps it to write the paged
    cache (compressed by a press right after the layer's attention, so no layer's full K/V outlives its
    layer), and experiments tap the same scan to capture per-layer tensors (`CaptureTap`).
  * `append`: T new tokens against the paged cache (T = 1 is a decode step; T > 1 appends a question to a
    compressed context). Layers are unrolled here: each layer's pool is its own array of its own size,
    which a decode step reads in place, where slicing one stacked pool would copy each layer's slice.
Params layout: adakv_jax/params.py describes each parameter once (weights [in, out], layers stacked on a
leading axis).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from adakv_jax import layer_cache, sharding
from adakv_jax.attention import causal_prefill_attention
from adakv_jax.cache import CachePlan, PagedKVCache, capacity_error
from adakv_jax.config import ModelConfig, rope_frequencies
from adakv_jax.layer_cache import window_queries
from adakv_jax.params import init_params, param_dtype  # noqa: F401  (init_params: part of this API)

Params = dict[str, Any]


def rms_norm(x, w, eps):
  x32 = x.astype(jnp.float32)
  x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (w.astype(jnp.float32) * x32).astype(x.dtype)


def apply_rope(x_BLHD, pos_BL, cfg: ModelConfig):
  """HF convention (rotate_half over the two halves of head_dim)."""
  inv = jnp.asarray(rope_frequencies(cfg), jnp.float32)
  ang = pos_BL.astype(jnp.float32)[..., None] * inv  # [B, L, D/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHD.dtype)


def attention_inputs(lp, x_BLE, pos_BL, cfg: ModelConfig):
  """Queries, keys (both after RoPE) and values of one layer, head-major: [B, H|K, L, D]."""
  b, l, _ = x_BLE.shape
  h = rms_norm(x_BLE, lp["attn_norm"], cfg.rms_norm_eps)
  q = h @ lp["wq"]
  k = h @ lp["wk"]
  v = h @ lp["wv"]
  if cfg.attention_bias:
    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
  q = apply_rope(q.reshape(b, l, cfg.num_heads, cfg.head_dim), pos_BL, cfg)
  k = apply_rope(k.reshape(b, l, cfg.num_kv_heads, cfg.head_dim), pos_BL, cfg)
  v = v.reshape(b, l, cfg.num_kv_heads, cfg.head_dim)
  return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def attention_output_and_mlp(lp, x_BLE, attn_BHLD, cfg: ModelConfig):
  """The rest of the layer: output projection and residual, then the SwiGLU MLP and residual."""
  b, h, l, d = attn_BHLD.shape
  x = x_BLE + attn_BHLD.transpose(0, 2, 1, 3).reshape(b, l, h * d).astype(x_BLE.dtype) @ lp["wo"]
  y = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
  y = (jax.nn.silu(y @ lp["w_gate"]) * (y @ lp["w_up"])) @ lp["w_down"]
  return x + y


def logits_of(params, x_BE, cfg: ModelConfig):
  x = rms_norm(x_BE, params["final_norm"], cfg.rms_norm_eps)
  w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  return (x @ w).astype(jnp.float32)


def prompt_chunk(max_len: int) -> int:
  """Prefill query-chunk size for prompts up to max_len tokens (prompts pad to a multiple of it)."""
  return min(512, max(16, 1 << (max(max_len, 1) - 1).bit_length()))


def padded_length(max_len: int) -> int:
  chunk = prompt_chunk(max_len)
  return -(-max_len // chunk) * chunk


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def forward_full(params: Params, tokens_BL: jax.Array, cfg: ModelConfig, chunk: int | None = None):
  """Plain causal forward of unpadded prompts: logits [B, L, V] (float32). No cache."""
  b, l = tokens_BL.shape
  chunk = chunk or l
  pad = (-l) % chunk
  toks = jnp.pad(tokens_BL, ((0, 0), (0, pad)))
  len_B = jnp.full((b,), l, jnp.int32)
  x = run_prefill(params, toks, len_B, cfg=cfg, chunk=chunk, tap=None, all_hidden=True)[0]
  return logits_of(params, x[:, :l], cfg)


# ---- prefill: the one scan over layers, with a tap ----------------------------------------------------


@struct.dataclass
class LayerOutputs:
  """What one layer hands its tap during prefill."""

  q_win_BHWD: jax.Array | None  # the last `window` queries (after RoPE)
  k_BKLD: jax.Array  # keys (after RoPE) of the whole padded prompt
  v_BKLD: jax.Array
  colsum_BHL: jax.Array | None  # attention summed over the valid queries (when the tap asks for it)


def run_prefill(
  params: Params,
  tokens_BL: jax.Array,
  len_B: jax.Array,
  *,
  cfg: ModelConfig,
  chunk: int,
  tap,
  tap_xs=None,
  all_hidden: bool = False,
):
  """The scan over layers. tap(layer_inputs_xs, LayerOutputs) -> per-layer outputs (stacked by the scan);
  tap_xs: a pytree with a leading layer axis handed to the tap layer by layer (budgets, keys).

  tap.window (queries to hand over) and tap.with_colsum say what the tap needs. Returns (last-token
  hidden states [B, E] (all of them [B, L, E] with all_hidden), stacked tap outputs).
  """
  b, l = tokens_BL.shape
  pos_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  x = params["embed"][tokens_BL].astype(param_dtype(cfg))
  window = getattr(tap, "window", 0)
  with_colsum = bool(getattr(tap, "with_colsum", False))

  def layer(x, xs):
    lp, extra = xs
    q, k, v = attention_inputs(lp, x, pos_BL, cfg)
    o, colsum = causal_prefill_attention(q, k, v, len_B, chunk=chunk, with_colsum=with_colsum)
    x = attention_output_and_mlp(lp, x, o, cfg)
    if tap is None:
      return x, None
    out = LayerOutputs(
      q_win_BHWD=window_queries(q, len_B, window) if window else None, k_BKLD=k, v_BKLD=v, colsum_BHL=colsum
    )
    return x, tap(extra, out)

  x, ys = lax.scan(layer, x, (params["layers"], tap_xs))
  if all_hidden:
    return x, ys
  last_BE = jnp.take_along_axis(x, (len_B - 1)[:, None, None], axis=1)[:, 0]
  return last_BE, ys


@dataclasses.dataclass(frozen=True)
class CaptureTap:
  """Keeps every layer's window queries, K, V and column sums: one prefill serves any number of presses
  (compress them later with `cache_from_capture`)."""

  window: int
  with_colsum: bool = True

  def __call__(self, extra, out: LayerOutputs):
    del extra
    return out


@dataclasses.dataclass(frozen=True)
class PagesTap:
  """Writes one layer's pages: selection by a press (None keeps every entry), then the page pool."""

  cfg: ModelConfig
  press: Any
  plan: CachePlan

  @property
  def window(self) -> int:
    return self.press.window if self.press is not None else 0

  @property
  def with_colsum(self) -> bool:
    return self.press is not None and self.press.needs_colsum

  def __call__(self, extra, out: LayerOutputs):
    len_B, units_B, rng = extra
    return layer_pages(self.cfg, self.press, self.plan, out, len_B, units_B, rng)


def layer_pages(cfg: ModelConfig, press, plan: CachePlan, out: LayerOutputs, len_B, units_B, rng):
  """One layer's selection and pages, computed per mesh shard when traced under a mesh.

  Returns a dict of k_pages/v_pages (every layer padded to the largest layer's pool: a scan stacks
  them), page_table, num_pages, lengths, positions and the press's info, local to the owning shard.
  """
  pool_pages = max(plan.pages_per_shard(l) for l in range(plan.num_layers))

  def local(q_win, k, v, colsum, len_B, units_B):
    groups = None if press is None else press.head_groups // plan.shards[1]
    cache, positions, info = layer_cache.select_and_write(
      press,
      q_win,
      k,
      v,
      colsum,
      len_B,
      units_B,
      rng,
      pool_pages=pool_pages,
      page_size=plan.page_size,
      max_pages=plan.max_pages,
      room=plan.room,
      groups=groups,
    )
    return dict(
      k_pages=cache.k_pages,
      v_pages=cache.v_pages,
      page_table=cache.page_table,
      num_pages=cache.num_pages,
      lengths=cache.lengths,
      positions=positions,
      info=info,
    )

  info_axes = {} if press is None else {"budgets": ("batch", "kv_heads"), "retained_mass": ("batch",)}
  fn = sharding.per_shard(
    local,
    in_axes=(
      ("batch", "heads", None, None),
      ("batch", "kv_heads", None, None),
      ("batch", "kv_heads", None, None),
      ("batch", "heads", None),
      ("batch",),
      ("batch",),
    ),
    out_axes=dict(
      k_pages=("pages", None, None),
      v_pages=("pages", None, None),
      page_table=("batch", "kv_heads", None),
      num_pages=("batch", "kv_heads"),
      lengths=("batch", "kv_heads"),
      positions=("batch", "kv_heads", None),
      info=info_axes,
    ),
  )
  b = out.k_BKLD.shape[0]
  colsum = out.colsum_BHL if out.colsum_BHL is not None else jnp.zeros((b, cfg.num_heads, 1), jnp.float32)
  q_win = out.q_win_BHWD
  if q_win is None:  # the full cache scores nothing
    q_win = jnp.zeros((b, cfg.num_heads, 1, cfg.head_dim), out.k_BKLD.dtype)
  return fn(q_win, out.k_BKLD, out.v_BKLD, colsum, len_B, units_B)


@functools.partial(jax.jit, static_argnames=("cfg", "press", "plan", "chunk"))
def prefill(
  params: Params,
  tokens_BL: jax.Array,
  len_B: jax.Array,
  rng: jax.Array,
  *,
  cfg: ModelConfig,
  press=None,
  plan: CachePlan,
  chunk: int,
):
  """Prefill a right-padded batch into a paged cache sized by `plan` (cache.plan_cache).

  Returns (last-token logits [B, V], PagedKVCache, info) with info["budgets"] [L, B, H'] (kept entries per
  head), info["positions"] [L, B, H', C] (kept prompt positions in storage order, -1 = none) and, with a
  press, info["retained_mass"] [L, B].
  """
  if tokens_BL.shape[1] % chunk:
    raise ValueError(f"the padded prompt length {tokens_BL.shape[1]} must be a multiple of chunk {chunk}")
  if press is not None:
    press.check_page_size(plan.page_size)
  units_LB = (
    press.layer_units(cfg.num_layers, len_B, plan.page_size)
    if press is not None
    else jnp.zeros((cfg.num_layers, tokens_BL.shape[0]), jnp.int32)
  )
  b = tokens_BL.shape[0]
  tap = PagesTap(cfg=cfg, press=press, plan=plan)
  tap_xs = (jnp.broadcast_to(len_B, (cfg.num_layers, b)), units_LB, jax.random.split(rng, cfg.num_layers))
  last_BE, ys = run_prefill(params, tokens_BL, len_B, cfg=cfg, chunk=chunk, tap=tap, tap_xs=tap_xs)
  cache = cache_from_layers(ys, plan, len_B)
  info = dict(ys["info"], budgets=ys["lengths"], positions=ys["positions"])
  return logits_of(params, last_BE, cfg), cache, info


@functools.partial(jax.jit, static_argnames=("cfg", "press", "plan"))
def cache_from_capture(
  captured: LayerOutputs, len_B: jax.Array, rng: jax.Array, *, cfg: ModelConfig, press, plan: CachePlan
):
  """The (cache, info) `prefill` would return with this press and plan, from one `CaptureTap` prefill:
  prefill attention never depends on the press, so one capture serves a whole grid of presses."""
  if press is not None:
    press.check_page_size(plan.page_size)
  b = captured.k_BKLD.shape[1]
  units_LB = (
    press.layer_units(cfg.num_layers, len_B, plan.page_size)
    if press is not None
    else jnp.zeros((cfg.num_layers, b), jnp.int32)
  )
  tap = PagesTap(cfg=cfg, press=press, plan=plan)
  window = tap.window

  def layer(_, xs):
    out, units_B, key = xs
    if window:
      q_win = out.q_win_BHWD
      if q_win is None or q_win.shape[2] < window:
        raise ValueError(
          f"the capture holds {0 if q_win is None else q_win.shape[2]} window queries; the "
          f"press needs {window}: capture with CaptureTap(window >= {window})"
        )
      out = out.replace(q_win_BHWD=q_win[:, :, q_win.shape[2] - window :])
    if tap.with_colsum and out.colsum_BHL is None:
      raise ValueError("the press scores with column sums (H2O): capture with CaptureTap(with_colsum=True)")
    return None, tap((len_B, units_B, key), out)

  _, ys = lax.scan(layer, None, (captured, units_LB, jax.random.split(rng, cfg.num_layers)))
  info = dict(ys["info"], budgets=ys["lengths"], positions=ys["positions"])
  return cache_from_layers(ys, plan, len_B), info


def cache_from_layers(ys, plan: CachePlan, len_B) -> PagedKVCache:
  """Stacked per-layer tap outputs -> a PagedKVCache with each layer's pool cut to its own size."""
  shards = plan.shards[0] * plan.shards[1]

  def cut(stacked, l):
    n_loc = plan.pages_per_shard(l)
    x = stacked[l]
    if x.shape[0] == n_loc * shards:
      return x
    x = x.reshape(shards, x.shape[0] // shards, *x.shape[1:])[:, :n_loc]
    return x.reshape(shards * n_loc, *x.shape[2:])

  return PagedKVCache(
    k_pages=tuple(cut(ys["k_pages"], l) for l in range(plan.num_layers)),
    v_pages=tuple(cut(ys["v_pages"], l) for l in range(plan.num_layers)),
    page_table=ys["page_table"],
    num_pages=ys["num_pages"],
    lengths=ys["lengths"].astype(jnp.int32),
    pos=jnp.asarray(len_B, jnp.int32) + 0,
  )


# ---- append: T new tokens against the cache -----------------------------------------------------------


def append(
  params: Params,
  tokens_BT: jax.Array,
  n_valid_B: jax.Array,
  cache: PagedKVCache,
  *,
  cfg: ModelConfig,
  backend: str = "auto",
  all_logits: bool = False,
):
  """Feed T new tokens (right-padded; n_valid_B real ones per sequence) against the cache.

  Returns (logits of each sequence's last real new token [B, V] -- or of every new token [B, T, V] with
  all_logits -- and the new cache). The cache is donated: the write happens in place and the caller must
  use the returned cache. Before the donated call, the host checks that every head has room for T more
  entries (one small device read) and raises CacheCapacityError otherwise, leaving the cache usable.
  """
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  if tokens_BT.ndim != 2:
    raise ValueError(f"tokens_BT must be [batch, T], got shape {tokens_BT.shape}")
  left = cache.room_left()
  if tokens_BT.shape[1] > left:
    raise capacity_error(tokens_BT.shape[1], left)
  return append_step(
    params,
    tokens_BT,
    jnp.asarray(n_valid_B, jnp.int32),
    cache,
    cfg=cfg,
    backend=backend,
    all_logits=all_logits,
  )


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "all_logits"), donate_argnames=("cache",))
def append_step(
  params: Params,
  tokens_BT: jax.Array,
  n_valid_B: jax.Array,
  cache: PagedKVCache,
  *,
  cfg: ModelConfig,
  backend: str = "auto",
  all_logits: bool = False,
):
  """`append` without the host-side room check (for loops that reserved the room, like `generate`):
  writes past a head's pages are dropped, not raised."""
  x_BTE, cache = _append_layers(params, tokens_BT, n_valid_B, cache, cfg, backend)
  if all_logits:
    return logits_of(params, x_BTE, cfg), cache
  last_BE = jnp.take_along_axis(x_BTE, jnp.maximum(n_valid_B - 1, 0)[:, None, None], axis=1)[:, 0]
  return logits_of(params, last_BE, cfg), cache


def per_layer_params(params: Params) -> Params:
  """params with "layers" as a list of per-layer pytrees instead of arrays stacked on a "layers" axis.

  The decode path takes either form. XLA:CPU copies a slice of a stacked weight before a dot reads it,
  so a step over stacked layers streams every weight three times (read, write, read): `decode_loop`
  converts once per call, outside its loop (measured on SmolLM2-135M, 1K-token full cache: half the time
  per token), at the price of a second copy of the layer weights while it runs. Anyone stepping with
  `append` by hand can convert once and pass the result.
  """
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": [jax.tree.map(lambda a: a[i], layers) for i in range(n)]}


def _append_layers(params, tokens_BT, n_valid_B, cache: PagedKVCache, cfg: ModelConfig, backend: str):
  b, t = tokens_BT.shape
  hc = cache.num_heads
  pos_BT = cache.pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  x = params["embed"][tokens_BT].astype(param_dtype(cfg))
  attend = functools.partial(_write_and_attend, backend=backend)
  attend = sharding.per_shard(
    attend,
    in_axes=(
      ("batch", "heads", None, None),
      ("pages", None, None),
      ("pages", None, None),
      ("batch", "kv_heads", None),
      ("batch", "kv_heads"),
      ("batch", "kv_heads"),
      ("batch", "kv_heads", None, None),
      ("batch", "kv_heads", None, None),
      ("batch",),
    ),
    out_axes=(("batch", "heads", None, None), ("pages", None, None), ("pages", None, None)),
  )
  k_pages, v_pages = list(cache.k_pages), list(cache.v_pages)
  layers = per_layer_params(params)["layers"]
  for i in range(cfg.num_layers):
    lp = layers[i]
    q, k, v = attention_inputs(lp, x, pos_BT, cfg)
    if hc != cfg.num_kv_heads:  # query-head granularity: one cache head per query head
      k = jnp.repeat(k, hc // cfg.num_kv_heads, axis=1)
      v = jnp.repeat(v, hc // cfg.num_kv_heads, axis=1)
    o, k_pages[i], v_pages[i] = attend(
      q, k_pages[i], v_pages[i], cache.page_table[i], cache.num_pages[i], cache.lengths[i], k, v, n_valid_B
    )
    x = attention_output_and_mlp(lp, x, o, cfg)
  new = cache.replace(
    k_pages=tuple(k_pages),
    v_pages=tuple(v_pages),
    lengths=cache.lengths + n_valid_B[None, :, None].astype(jnp.int32),
    pos=cache.pos + n_valid_B.astype(jnp.int32),
  )
  return x, new


def _write_and_attend(
  q_BHTD, k_pages, v_pages, table_BKM, num_pages_BK, len_BK, k_BKTD, v_BKTD, n_valid_B, *, backend
):
  """One layer of a shard: write the T new entries, then attend over each head's live entries."""
  cache = layer_cache.LayerCache(
    k_pages=k_pages, v_pages=v_pages, page_table=table_BKM, num_pages=num_pages_BK, lengths=len_BK
  )
  cache = layer_cache.append_kv(cache, k_BKTD, v_BKTD, n_valid_B)
  o = layer_cache.attend(cache, q_BHTD, n_valid_B, backend=backend)
  return o, cache.k_pages, cache.v_pages
