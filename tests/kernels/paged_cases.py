"""Paged-cache test inputs and the float64 oracle, shared by the kernel tests.

Each case packs the length cases {0, 1, P, P + 1, M * P, random} into the B * K heads of one batch. The
page table is a random permutation of the pool; table slots past a head's live pages hold garbage ids
(out of range: N, -1, 2**30, N + 7), which the TPU interpreter refuses to read as a DMA source; every
dead entry of an owned page and every unowned page holds NaN, so any dead entry that reached an output
would show.
"""

import math

import jax.numpy as jnp
import numpy as np


def _lengths(rng, heads, page, max_pages):
  cap = page * max_pages
  cases = [0, 1, page, page + 1, cap] + list(rng.integers(1, cap + 1, size=heads))
  return rng.permutation(np.array(cases[:heads]))


def paged_case(
  seed,
  b,
  k,
  g,
  t,
  d,
  page,
  max_pages,
  dtype=jnp.float32,
  spare_pages=3,
  lens_BK=None,
  num_pages=None,
  contiguous=False,
):
  """(q, k_pages, v_pages, page_table, lengths), numpy-made (no per-op compiles). The pool has
  num_pages pages (default: the live ones + spare_pages), the live ones at random places; contiguous:
  B * K * M pages instead, head h = b * K + k owning pages h * M + i in table order (the layout of a full
  cache), its dead pages NaN."""
  rng = np.random.default_rng(seed)
  lens = _lengths(rng, b * k, page, max_pages).reshape(b, k) if lens_BK is None else lens_BK
  live = -(-lens // page)
  n = int(live.sum()) + spare_pages if num_pages is None else num_pages
  if contiguous:
    n = b * k * max_pages
  assert n >= live.sum(), (n, live.sum())
  garbage = np.array([n, -1, 2**30, n + 7], np.int32)
  table = rng.choice(garbage, size=(b, k, max_pages)).astype(np.int32)
  kp = np.full((n, page, d), np.nan, np.float32)
  vp = np.full((n, page, d), np.nan, np.float32)
  owned = iter(rng.permutation(n))
  for bi in range(b):
    for ki in range(k):
      for i in range(live[bi, ki]):
        pid = (bi * k + ki) * max_pages + i if contiguous else next(owned)
        table[bi, ki, i] = pid
        rows = min(page, lens[bi, ki] - i * page)
        kp[pid, :rows] = rng.standard_normal((rows, d))
        vp[pid, :rows] = rng.standard_normal((rows, d))
  q = rng.standard_normal((b, k, g, t, d), np.float32)
  return (
    jnp.asarray(q, dtype),
    jnp.asarray(kp, dtype),
    jnp.asarray(vp, dtype),
    jnp.asarray(table),
    jnp.asarray(lens, jnp.int32),
  )


def naive_attention(q, kp, vp, table, lens, sm_scale=None):
  """float64 numpy, one head and one query token at a time: the semantics the reference must have."""
  q, kp, vp = (np.asarray(x, np.float64) for x in (q, kp, vp))
  table, lens = np.asarray(table), np.asarray(lens)
  b, k, _, t, d = q.shape
  page = kp.shape[1]
  out = np.zeros_like(q)
  for bi in range(b):
    for ki in range(k):
      n = int(lens[bi, ki])
      pages = table[bi, ki, : -(-n // page)]
      keys = kp[pages].reshape(-1, d)[:n]
      vals = vp[pages].reshape(-1, d)[:n]
      for ti in range(t):
        seen = n - t + 1 + ti
        if seen <= 0:
          continue
        s = q[bi, ki, :, ti] @ keys[:seen].T * (sm_scale or 1 / math.sqrt(d))
        p = np.exp(s - s.max(-1, keepdims=True))
        out[bi, ki, :, ti] = (p / p.sum(-1, keepdims=True)) @ vals[:seen]
  return out
