"""Paged per-head attention (placeholder for the kernels: reference and XLA paths only)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def check_page_size(page_size: int) -> None:
  if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 8 or page_size > 256 \
      or page_size & (page_size - 1):
    raise ValueError(f"page size must be a power of two between 8 and 256, got {page_size!r}")


def _visible(lengths_BK, t):
  return lengths_BK.astype(jnp.int32)[:, :, None] - (t - 1) + jnp.arange(t, dtype=jnp.int32)


def paged_attention_reference(q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK, *,
                              sm_scale=None):
  b, kh, g, t, d = q_BKGTD.shape
  n, p, _ = k_pages_NPD.shape
  m = page_table_BKM.shape[-1]
  scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  live_pages = jnp.arange(m)[None, None, :] < -(-lengths_BK[:, :, None] // p)
  ids = jnp.where(live_pages, jnp.clip(page_table_BKM, 0, n - 1), 0)
  k = k_pages_NPD[ids].reshape(b, kh, m * p, d).astype(jnp.float32)
  v = v_pages_NPD[ids].reshape(b, kh, m * p, d).astype(jnp.float32)
  pos = jnp.arange(m * p, dtype=jnp.int32)
  live = (pos[None, None, :] < lengths_BK[:, :, None])[..., None]
  k, v = jnp.where(live, k, 0.0), jnp.where(live, v, 0.0)
  s = jnp.einsum("bkgtd,bkcd->bkgtc", q_BKGTD.astype(jnp.float32), k, precision=lax.Precision.HIGHEST)
  vis = pos[None, None, None, :] < _visible(lengths_BK, t)[..., None]  # [B, K, T, C]
  s = jnp.where(vis[:, :, None], s * scale, -jnp.inf)
  mx = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0))
  den = jnp.sum(e, axis=-1, keepdims=True)
  o = jnp.einsum("bkgtc,bkcd->bkgtd", e, v, precision=lax.Precision.HIGHEST)
  return (o / jnp.where(den > 0, den, 1.0)).astype(q_BKGTD.dtype)


def paged_attention_xla(q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK, *, sm_scale=None):
  """All pool rows against all query rows in one GEMM, masked to each column's own head."""
  b, kh, g, t, d = q_BKGTD.shape
  n, p, _ = k_pages_NPD.shape
  m = page_table_BKM.shape[-1]
  scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  owned = jnp.arange(m)[None, None, :] < -(-lengths_BK[:, :, None] // p)
  target = jnp.where(owned, page_table_BKM, n).reshape(-1)
  owner = jnp.broadcast_to(jnp.arange(b * kh, dtype=jnp.int32).reshape(b, kh, 1), (b, kh, m)).reshape(-1)
  index = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, kh, m)).reshape(-1)
  owner_N = jnp.full((n,), -1, jnp.int32).at[target].set(owner, mode="drop")
  index_N = jnp.zeros((n,), jnp.int32).at[target].set(index, mode="drop")
  entry_NP = index_N[:, None] * p + jnp.arange(p, dtype=jnp.int32)[None, :]
  rows_k = k_pages_NPD.reshape(n * p, d)
  rows_v = v_pages_NPD.reshape(n * p, d)
  q_CD = q_BKGTD.reshape(b * kh * g * t, d)
  prec = lax.Precision.HIGHEST if k_pages_NPD.dtype == jnp.float32 else None
  s_RC = lax.dot_general(rows_k, q_CD.astype(rows_k.dtype), (((1,), (1,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32) * scale
  col_head = jnp.arange(b * kh * g * t, dtype=jnp.int32) // (g * t)
  col_vis = _visible(lengths_BK, t).reshape(b * kh, 1, t)
  col_vis = jnp.broadcast_to(col_vis, (b * kh, g, t)).reshape(-1)
  ok = (owner_N.repeat(p)[:, None] == col_head[None, :]) & (entry_NP.reshape(-1)[:, None] < col_vis[None, :])
  s_RC = jnp.where(ok, s_RC, -jnp.inf)
  mx = jnp.max(s_RC, axis=0)
  e = jnp.exp(s_RC - jnp.where(jnp.isfinite(mx), mx, 0.0)[None, :])
  den = jnp.sum(e, axis=0)
  rows_v = jnp.where((owner_N.repeat(p) >= 0)[:, None], rows_v, 0).astype(rows_v.dtype)
  o = lax.dot_general(e.astype(rows_v.dtype), rows_v, (((0,), (0,)), ((), ())), precision=prec,
                      preferred_element_type=jnp.float32)
  o = o / jnp.where(den > 0, den, 1.0)[:, None]
  return o.reshape(b, kh, g, t, d).astype(q_BKGTD.dtype)


def paged_attention(q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK, *, sm_scale=None,
                    backend="auto", interpret=None, lowering=None, pages_per_block=None, num_splits=None):
  del backend, interpret, lowering, pages_per_block, num_splits
  return paged_attention_xla(q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK,
                             sm_scale=sm_scale)
