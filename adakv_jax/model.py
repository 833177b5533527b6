"""The Llama-family forward pass as pure functions over a params pytree.

    embed -> [rmsnorm -> attention(rope) -> rmsnorm -> swiglu mlp] x L -> rmsnorm -> logits

Layers are stacked on a leading axis and run under `lax.scan`, so one layer body is compiled whatever
the depth. Three entry points share the layer body:
  * `forward_full`: plain causal forward without a cache (tests, scoring).
  * `prefill`: a right-padded batch of prompts -> last-token logits and a cache, full or compressed by a
    press at the end of each layer (prefill attention itself always sees the whole prompt).
  * `append`: T new tokens against an existing cache (T=1 is a decode step; T>1 appends a question to a
    compressed context), each head attending only to its own live entries.
Params layout: see adakv_jax/checkpoints (weights are [in, out]).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from adakv_jax import sharding
from adakv_jax.cache import CacheCapacityError, KVCache
from adakv_jax.config import ModelConfig, rope_frequencies
from adakv_jax import press as press_lib
from pallas_kernels import backend as backend_lib
from pallas_kernels import ragged_decode_attention as rda

Params = dict[str, Any]


def dtype_of(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


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


def _qkv(lp, x_BLE, pos_BL, cfg: ModelConfig):
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
  # -> head-major layouts
  return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _out_and_mlp(lp, x_BLE, attn_BHLD, cfg: ModelConfig):
  b, h, l, d = attn_BHLD.shape
  x = x_BLE + attn_BHLD.transpose(0, 2, 1, 3).reshape(b, l, h * d).astype(x_BLE.dtype) @ lp["wo"]
  y = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
  y = (jax.nn.silu(y @ lp["w_gate"]) * (y @ lp["w_up"])) @ lp["w_down"]
  return x + y


def chunked_causal_attention(q_BHLD, k_BKLD, v_BKLD, len_B, *, chunk: int, with_colsum: bool):
  """Causal attention over a right-padded prompt, one query chunk at a time.

  Never materialises the [L, L] score matrix: a chunk holds [B, H, chunk, L]. With `with_colsum` it also
  returns, per key, the attention probability summed over all valid queries (the H2O statistic).
  """
  b, h, l, d = q_BHLD.shape
  kh = k_BKLD.shape[1]
  g = h // kh
  assert l % chunk == 0, (l, chunk)
  scale = 1.0 / jnp.sqrt(jnp.float32(d))
  key_pos = jnp.arange(l)
  key_ok_BL = key_pos[None, :] < len_B[:, None]
  q_NBKGCD = q_BHLD.reshape(b, kh, g, l // chunk, chunk, d).transpose(3, 0, 1, 2, 4, 5)

  def one_chunk(colsum_BHL, xs):
    q_BKGCD, start = xs
    s = jnp.einsum("bkgcd,bkld->bkgcl", q_BKGCD, k_BKLD, preferred_element_type=jnp.float32) * scale
    q_pos = start + jnp.arange(chunk)
    ok = (key_pos[None, :] <= q_pos[:, None])[None] & key_ok_BL[:, None, :]  # [B, C, L]
    s = jnp.where(ok[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(ok[:, None, None], p, 0.0)  # padded queries past a prompt's end see nothing
    o = jnp.einsum("bkgcl,bkld->bkgcd", p.astype(v_BKLD.dtype), v_BKLD, preferred_element_type=jnp.float32)
    if with_colsum:
      q_ok = (q_pos[None, :] < len_B[:, None])[:, None, None, :, None]  # [B,1,1,C,1]
      colsum_BHL = colsum_BHL + jnp.sum(jnp.where(q_ok, p, 0.0), axis=3).reshape(b, h, l)
    return colsum_BHL, o.astype(q_BHLD.dtype)

  starts = jnp.arange(l // chunk) * chunk
  init = jnp.zeros((b, h, l), jnp.float32) if with_colsum else jnp.zeros((), jnp.float32)
  colsum, o_NBKGCD = lax.scan(one_chunk, init, (q_NBKGCD, starts))
  o_BHLD = o_NBKGCD.transpose(1, 2, 3, 0, 4, 5).reshape(b, h, l, d)
  return o_BHLD, (colsum if with_colsum else None)


def _logits(params, x_BE, cfg: ModelConfig):
  x = rms_norm(x_BE, params["final_norm"], cfg.rms_norm_eps)
  w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
  return (x @ w).astype(jnp.float32)


def prompt_chunk(max_len: int) -> int:
  return min(512, max(16, 1 << (max(max_len, 1) - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def forward_full(params: Params, tokens_BL: jax.Array, cfg: ModelConfig, chunk: int | None = None):
  """Plain causal forward of unpadded prompts: logits [B, L, V] (float32)."""
  b, l = tokens_BL.shape
  chunk = chunk or l
  pad = (-l) % chunk
  toks = jnp.pad(tokens_BL, ((0, 0), (0, pad)))
  lp_len = toks.shape[1]
  len_B = jnp.full((b,), l, jnp.int32)
  pos_BL = jnp.broadcast_to(jnp.arange(lp_len, dtype=jnp.int32), (b, lp_len))
  x = params["embed"][toks].astype(dtype_of(cfg))

  def layer(x, lp):
    q, k, v = _qkv(lp, x, pos_BL, cfg)
    o, _ = chunked_causal_attention(q, k, v, len_B, chunk=chunk, with_colsum=False)
    return _out_and_mlp(lp, x, o, cfg), None

  x, _ = lax.scan(layer, x, params["layers"])
  return _logits(params, x[:, :l], cfg)


def _window_queries(q_BHLD, len_B, window: int):
  """The last `window` queries of each right-padded prompt (positions before 0 are clipped; the press
  masks them by position)."""
  idx_BW = jnp.clip(len_B[:, None] - window + jnp.arange(window)[None, :], 0, q_BHLD.shape[2] - 1)
  return jnp.take_along_axis(q_BHLD, idx_BW[:, None, :, None], axis=2)


@functools.partial(jax.jit, static_argnames=("cfg", "press", "capacity", "chunk", "return_positions",
                                             "head_cap"))
def prefill(params: Params, tokens_BL: jax.Array, len_B: jax.Array, rng: jax.Array, *, cfg: ModelConfig,
            press=None, capacity: int, chunk: int, return_positions: bool = False,
            head_cap: int | None = None):
  """Prefill a right-padded batch; returns (last-token logits [B, V], KVCache, info).

  With a press, each layer's K/V are compressed right after that layer's attention, so only one layer's
  full K/V is alive at a time and the cache that leaves this function is the compressed one.
  capacity: entries per head; with a press, press.capacity(num_layers, max_prompt_len, extra) and
  head_cap = press.head_cap(num_layers, max_prompt_len) for the longest real prompt (default: sized on
  the padded length, which in ratio mode can leave no room past the prompt).
  """
  b, l = tokens_BL.shape
  pos_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  x = params["embed"][tokens_BL].astype(dtype_of(cfg))
  if press is None:
    assert capacity >= l, (capacity, l)
    budgets_LB = jnp.zeros((cfg.num_layers, b), jnp.int32)
  else:
    budgets_LB = press.layer_budgets(cfg.num_layers, len_B)

  def layer(x, xs):
    lp, budget_B, i = xs
    q, k, v = _qkv(lp, x, pos_BL, cfg)
    needs_colsum = press is not None and press.needs_colsum
    o, colsum = chunked_causal_attention(q, k, v, len_B, chunk=chunk, with_colsum=needs_colsum)
    x = _out_and_mlp(lp, x, o, cfg)
    if press is None:
      pad = ((0, 0), (0, 0), (0, capacity - l), (0, 0))
      lengths = jnp.broadcast_to(len_B[:, None], (b, cfg.num_kv_heads)).astype(jnp.int32)
      info = {"budgets": lengths}
      return x, (jnp.pad(k, pad), jnp.pad(v, pad), lengths, info)
    k_c, v_c, lengths, info = press_lib.compress_layer(
        press, cfg, q_win_BHWD=_window_queries(q, len_B, press.window), k_BKLD=k, v_BKLD=v,
        prompt_len_B=len_B, budget_B=budget_B, colsum_BHL=colsum, rng=jax.random.fold_in(rng, i),
        capacity=capacity, head_cap=head_cap,
        return_positions=return_positions)
    return x, (k_c, v_c, lengths, info)

  xs = (params["layers"], budgets_LB, jnp.arange(cfg.num_layers))
  x, (k_L, v_L, lengths_L, info) = lax.scan(layer, x, xs)
  last_BE = jnp.take_along_axis(x, (len_B - 1)[:, None, None], axis=1)[:, 0]
  cache = KVCache(k=k_L, v=v_L, lengths=lengths_L.astype(jnp.int32), pos=len_B.astype(jnp.int32))
  return _logits(params, last_BE, cfg), cache, info


def cache_attention(q_BKGTD, k_BKCD, v_BKCD, kv_len_BK, backend: str):
  """Attention of a chunk of T queries over each head's live entries (causal inside the chunk)."""
  fn = functools.partial(rda.ragged_chunk_attention, backend=backend)
  if backend_lib.resolve_backend(backend) == "pallas":  # XLA cannot partition a kernel: one per shard
    cache_axes = ("batch", "kv_heads", "capacity", "head_dim")
    fn = sharding.kernel_shard_map(
        fn, in_axes=(("batch", "kv_heads", "group", "tokens", "head_dim"), cache_axes, cache_axes,
                     ("batch", "kv_heads")),
        out_axes=("batch", "kv_heads", "group", "tokens", "head_dim"))
  return fn(q_BKGTD, k_BKCD, v_BKCD, kv_len_BK)


def _raise_capacity(longest, capacity, t):
  raise CacheCapacityError(
      f"KV cache capacity exhausted: a head holds {int(longest)} of {int(capacity)} entries and {int(t)} "
      "more token(s) were appended; allocate a larger capacity (max_new_tokens / extra capacity)")


def _guard_capacity(cache: KVCache, t: int) -> None:
  """Fails the step, loudly, instead of dropping writes past the capacity (the host is only called when
  it happens)."""
  longest = jnp.max(cache.lengths)
  over = longest + t > cache.capacity
  lax.cond(over, lambda: jax.debug.callback(_raise_capacity, longest, cache.capacity, t), lambda: None)


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "all_logits"), donate_argnames=("cache",))
def append(params: Params, tokens_BT: jax.Array, n_valid_B: jax.Array, cache: KVCache, *,
           cfg: ModelConfig, backend: str = "auto", all_logits: bool = False):
  """Feed T new tokens (right-padded; n_valid_B real ones per sequence) against the cache.

  Returns (logits of each sequence's last real new token [B, V] -- or of every new token [B, T, V] with
  all_logits -- and the new cache). The cache is donated: the write happens in place and the caller
  must use the returned cache.
  """
  b, t = tokens_BT.shape
  hc = cache.num_heads
  _guard_capacity(cache, t)
  pos_BT = cache.pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  x = params["embed"][tokens_BT].astype(dtype_of(cfg))
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(hc)[None, :, None]

  def layer(carry, xs):
    x, ck, cv = carry
    lp, i, len_BH = xs
    q, k, v = _qkv(lp, x, pos_BT, cfg)
    if hc != cfg.num_kv_heads:  # query-head granularity: one cache head per query head
      k = jnp.repeat(k, hc // cfg.num_kv_heads, axis=1)
      v = jnp.repeat(v, hc // cfg.num_kv_heads, axis=1)
    idx_BHT = len_BH[:, :, None] + jnp.arange(t, dtype=jnp.int32)[None, None, :]
    ck = ck.at[i, bi, hi, idx_BHT].set(k.astype(ck.dtype), mode="drop")
    cv = cv.at[i, bi, hi, idx_BHT].set(v.astype(cv.dtype), mode="drop")
    g = cfg.num_heads // hc
    q_BKGTD = q.reshape(b, hc, g, t, cfg.head_dim)
    o = cache_attention(q_BKGTD, ck[i], cv[i], len_BH + t, backend)
    x = _out_and_mlp(lp, x, o.reshape(b, cfg.num_heads, t, cfg.head_dim), cfg)
    return (x, ck, cv), None

  xs = (params["layers"], jnp.arange(cfg.num_layers), cache.lengths)
  (x, ck, cv), _ = lax.scan(layer, (x, cache.k, cache.v), xs)
  if all_logits:
    last_BE = x
  else:
    last_BE = jnp.take_along_axis(x, jnp.maximum(n_valid_B - 1, 0)[:, None, None], axis=1)[:, 0]
  new = KVCache(k=ck, v=cv, lengths=cache.lengths + n_valid_B[None, :, None].astype(jnp.int32),
                pos=cache.pos + n_valid_B.astype(jnp.int32))
  return _logits(params, last_BE, cfg), new


def init_params(cfg: ModelConfig, key: jax.Array, scale: float = 0.02) -> Params:
  """Random parameters in the checkpoint layout (tests, benchmarks)."""
  e, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {"wq": (l, e, hq), "wk": (l, e, hk), "wv": (l, e, hk), "wo": (l, hq, e),
            "w_gate": (l, e, f), "w_up": (l, e, f), "w_down": (l, f, e)}
  if cfg.attention_bias:
    shapes.update(bq=(l, hq), bk=(l, hk), bv=(l, hk))
  keys = iter(jax.random.split(key, len(shapes) + 2))
  dt = dtype_of(cfg)
  layers = {n: (scale * jax.random.normal(next(keys), s)).astype(dt) for n, s in shapes.items()}
  layers["attn_norm"] = jnp.ones((l, e), dt)
  layers["mlp_norm"] = jnp.ones((l, e), dt)
  params = {"embed": (scale * 50 * jax.random.normal(next(keys), (cfg.vocab_size, e))).astype(dt),
            "layers": layers, "final_norm": jnp.ones((e,), dt)}
  if not cfg.tie_word_embeddings:
    params["lm_head"] = (scale * jax.random.normal(next(keys), (e, cfg.vocab_size))).astype(dt)
  return params
