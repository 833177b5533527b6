"""Importance scorers (ADAKV_SPEC 3.1-3.3): layer inputs -> one score per cached entry.

Every scorer has the signature (q_win_BHWD, k_BKLD, colsum_BHL, prompt_len_B, rng, press) and returns raw
scores [B, H', L], higher = keep; H' is the cache heads: the K of k_BKLD, or the H of q_win_BHWD at
query-head granularity. Head counts come from the arrays, so any attention layer can be scored. Pooling
and the masking of positions that cannot be evicted or do not exist (window, padding) happen afterwards, in
`finish_scores`, so every scorer composes with every allocation and schedule.

Prompts are right-padded to a common L; sequence b's window queries sit at positions
[len_b - w, len_b), and query slots with a negative position (len_b < w) are garbage to be masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SINK_SCORE = float(2**24)  # above any recency score (positions are exact in float32 up to 2**24)


def window_attention(q_win_BHWD: jax.Array, k_BKLD: jax.Array, prompt_len_B: jax.Array):
  """Float32 softmax of the window queries over all valid keys, causal inside the window.

  Returns (probs_BHWL, qvalid_BW); rows of invalid (left-padding) queries are all zero.
  """
  b, h, w, d = q_win_BHWD.shape
  kh, n = k_BKLD.shape[1], k_BKLD.shape[2]
  q = q_win_BHWD.reshape(b, kh, h // kh, w, d)
  logits = jnp.einsum("bkgwd,bkld->bkgwl", q, k_BKLD, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, h, w, n) * (1.0 / float(d) ** 0.5)
  qpos_BW = prompt_len_B.astype(jnp.int32)[:, None] - w + jnp.arange(w, dtype=jnp.int32)[None, :]
  allowed_BWL = jnp.arange(n, dtype=jnp.int32)[None, None, :] <= qpos_BW[:, :, None]
  logits = jnp.where(allowed_BWL[:, None], logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
  s = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(s > 0, s, 1.0), qpos_BW >= 0


def reduce_group(x_BHL: jax.Array, num_kv_heads: int, press) -> jax.Array:
  """Query-head scores -> cache-head scores: mean/max over each GQA group ("kv"), or as is ("query")."""
  if press.gqa == "query":
    return x_BHL
  b, h, n = x_BHL.shape
  x = x_BHL.reshape(b, num_kv_heads, h // num_kv_heads, n)
  return jnp.max(x, axis=2) if press.gqa_reduce == "max" else jnp.mean(x, axis=2)


def expand_kv(x_BKL: jax.Array, num_heads: int, press) -> jax.Array:
  """KV-head scores -> cache-head scores (repeated over the group for gqa="query")."""
  if press.gqa == "query":
    return jnp.repeat(x_BKL, num_heads // x_BKL.shape[1], axis=1)
  return x_BKL


def cache_heads_of(q_win_BHWD, k_BKLD, press) -> int:
  return q_win_BHWD.shape[1] if press.gqa == "query" else k_BKLD.shape[1]


def snapkv(q_win_BHWD, k_BKLD, colsum_BHL, prompt_len_B, rng, press):
  """Attention of the window queries on each key, averaged over the (valid) window queries."""
  del colsum_BHL, rng
  probs_BHWL, qvalid_BW = window_attention(q_win_BHWD, k_BKLD, prompt_len_B)
  nq_B = jnp.maximum(jnp.sum(qvalid_BW, axis=1), 1).astype(jnp.float32)
  return reduce_group(jnp.sum(probs_BHWL, axis=2) / nq_B[:, None, None], k_BKLD.shape[1], press)


def h2o(q_win_BHWD, k_BKLD, colsum_BHL, prompt_len_B, rng, press):
  """Heavy hitters: attention mass each key received from all prompt queries (accumulated by the model)."""
  del q_win_BHWD, prompt_len_B, rng
  if colsum_BHL is None:
    raise ValueError("the h2o scorer needs colsum_BHL (press.needs_colsum is True)")
  return reduce_group(colsum_BHL.astype(jnp.float32), k_BKLD.shape[1], press)


def streamingllm(q_win_BHWD, k_BKLD, colsum_BHL, prompt_len_B, rng, press):
  """Attention sinks first, then recency: keeps the first sink_tokens and the most recent tokens."""
  del colsum_BHL, prompt_len_B, rng
  b, _, n, _ = k_BKLD.shape
  pos = jnp.arange(n, dtype=jnp.float32)
  s_L = jnp.where(pos < press.sink_tokens, SINK_SCORE, pos)
  return jnp.broadcast_to(s_L, (b, cache_heads_of(q_win_BHWD, k_BKLD, press), n))


def knorm(q_win_BHWD, k_BKLD, colsum_BHL, prompt_len_B, rng, press):
  """Negative key L2 norm: low-norm keys tend to draw attention (kvpress KnormPress)."""
  del colsum_BHL, prompt_len_B, rng
  k = k_BKLD.astype(jnp.float32)
  return expand_kv(-jnp.sqrt(jnp.sum(k * k, axis=-1)), q_win_BHWD.shape[1], press)


def random(q_win_BHWD, k_BKLD, colsum_BHL, prompt_len_B, rng, press):
  """Uniform noise: the floor any scorer should beat. rng=None falls back to PRNGKey(press.seed)."""
  del colsum_BHL, prompt_len_B
  key = jax.random.PRNGKey(press.seed) if rng is None else rng
  b, _, n, _ = k_BKLD.shape
  return jax.random.uniform(key, (b, cache_heads_of(q_win_BHWD, k_BKLD, press), n), jnp.float32)


SCORERS = {"snapkv": snapkv, "h2o": h2o, "streamingllm": streamingllm, "knorm": knorm, "random": random}


def finish_scores(raw_BHL: jax.Array, prefix_BL: jax.Array, press) -> jax.Array:
  """Pools along the sequence over the evictable prefix only, then sets everything else to -inf.

  Outside the prefix the pooling sees -inf (max) or zeros counted in the divisor (avg), as SnapKV's
  pooling of the cut prefix with zero padding does; the window and padding therefore never leak in.
  """
  s = raw_BHL.astype(jnp.float32)
  k = press.kernel
  if k > 1:
    pad = ((0, 0), (0, 0), (k // 2, k // 2))
    mask = prefix_BL[:, None, :]
    if press.pool == "max":
      s = lax.reduce_window(jnp.where(mask, s, -jnp.inf), -jnp.inf, lax.max, (1, 1, k), (1, 1, 1), pad)
    else:
      s = lax.reduce_window(jnp.where(mask, s, 0.0), 0.0, lax.add, (1, 1, k), (1, 1, 1), pad) / k
  return jnp.where(prefix_BL[:, None, :], s, -jnp.inf)


def chunk_scores(token_BHL: jax.Array, num_chunks_B: jax.Array, page_size: int, reduce: str) -> jax.Array:
  """Scores of whole P-token chunks [B, H, L // P] from pooled token scores: chunk c covers positions
  [c P, (c + 1) P); only the first num_chunks_B chunks (those wholly inside the prefix) are scored, the
  rest are -inf. reduce: "mean" (the chunk's average attention) or "max" (its strongest token)."""
  b, h, n = token_BHL.shape
  c = n // page_size
  s = token_BHL[:, :, : c * page_size].reshape(b, h, c, page_size)
  s = jnp.max(s, axis=-1) if reduce == "max" else jnp.mean(s, axis=-1)
  ok_BC = jnp.arange(c)[None, :] < num_chunks_B[:, None]
  return jnp.where(ok_BC[:, None, :], s, -jnp.inf)
