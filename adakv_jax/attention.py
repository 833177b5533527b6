"""Causal prefill attention whose work follows the causal triangle.

The prompt is cut into square tiles of min(chunk, TILE) queries by as many keys. Query tile i attends
only to key tiles 0..i: the tiles below the diagonal need no mask and the diagonal tile a static one, so a
prompt of n tiles costs n(n+1)/2 tile products instead of n^2. Query tiles that start past the longest
real prompt are skipped (their outputs are zeros). Keys past a prompt's end need no mask: a real query
never sees them causally, and padded queries are zeroed.

The softmax is the online one (a running max and sum per query, rescaled as key tiles arrive), so a tile
product stays in cache and nothing [L, L] is ever built; exponents are floored at -80 (see EXP_FLOOR). The
H2O statistic (colsum: per key, the attention probability summed over the real queries) needs each
probability after normalisation, which the online pass only knows at the end; with `with_colsum` a first
pass takes the row statistics (max and sum, no values) and a second computes exact probabilities, the
output and colsum from them.

Tiles of 256 measured fastest on a 2-core CPU against 128 and 512 (SmolLM2 shapes, 4K tokens):
a larger tile leaves cache, a smaller one pays per-step overhead.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

TILE = 256
# Masked scores and the running max start here. Finite, so no step ever forms inf - inf: the masked
# entries and the first rescale come out as exp(-huge) = 0, never NaN.
_MASKED = -1e30
# exp of a score more than 80 below its row's max is taken as e^-80 (1.8e-35) instead of a float32
# denormal or zero. On a real prompt most keys sit that far below a query's max, and many x86 cores
# compute on denormals through slow microcode assists (random test scores never go that low). On the
# 2-core AMD machine of experiments/results/bench_prefill_8e0d763.json the floor changed nothing measurable.
# A floored weight is e^-80 of the largest, so even 32K of them move a row's sum by under 1e-30 of
# itself: float32 cannot see it. Masked entries stay exactly 0.
EXP_FLOOR = -80.0


def causal_prefill_attention(q_BHLD, k_BKLD, v_BKLD, len_B, *, chunk: int, with_colsum: bool):
  """Causal attention over a right-padded batch of prompts: (o_BHLD, colsum_BHL or None).

  GQA by grouping: query head h reads KV head h // (H // K). Query positions at or past a prompt's
  length output zeros and add nothing to colsum. chunk: the prompt's padding unit (L is a multiple of
  it); tiles are min(chunk, TILE) wide, and L is padded inside to a multiple of the tile when chunk is
  not one. colsum is float32; o has q's dtype.
  """
  _check_shapes(q_BHLD, k_BKLD, v_BKLD, len_B, chunk)
  b, h, l, d = q_BHLD.shape
  kh = k_BKLD.shape[1]
  t = min(chunk, TILE)
  n = -(-l // t)
  pad = ((0, 0), (0, 0), (0, n * t - l), (0, 0))  # padded queries output zeros, padded keys stay unseen
  q_BHLD, k_BKLD, v_BKLD = (jnp.pad(x, pad) for x in (q_BHLD, k_BKLD, v_BKLD))
  q_NBKGTD = q_BHLD.reshape(b, kh, h // kh, n, t, d).transpose(3, 0, 1, 2, 4, 5)
  k_NBKDT = k_BKLD.reshape(b, kh, n, t, d).transpose(2, 0, 1, 4, 3)  # keys pre-transposed for q @ k
  v_NBKTD = v_BKLD.reshape(b, kh, n, t, d).transpose(2, 0, 1, 3, 4)
  tiles = _Tiles(k_NBKDT, v_NBKTD, len_B, scale=float(1.0 / np.sqrt(d)), out_dtype=q_BHLD.dtype)
  colsum_NBKGT = jnp.zeros((n, b, kh, h // kh, t), jnp.float32) if with_colsum else None
  colsum_NBKGT, o_NBKGTD = tiles.all_query_tiles(q_NBKGTD, colsum_NBKGT)
  o_BHLD = o_NBKGTD.transpose(1, 2, 3, 0, 4, 5).reshape(b, h, n * t, d)[:, :, :l]
  if not with_colsum:
    return o_BHLD, None
  return o_BHLD, colsum_NBKGT.transpose(1, 2, 3, 0, 4).reshape(b, h, n * t)[:, :, :l]


def _check_shapes(q_BHLD, k_BKLD, v_BKLD, len_B, chunk):
  if q_BHLD.ndim != 4 or k_BKLD.ndim != 4 or v_BKLD.shape != k_BKLD.shape:
    raise ValueError(
      f"expected q [B, H, L, D] and k, v [B, K, L, D] alike; got q {q_BHLD.shape}, "
      f"k {k_BKLD.shape}, v {v_BKLD.shape}"
    )
  b, h, l, d = q_BHLD.shape
  kb, kh, kl, kd = k_BKLD.shape
  if (kb, kl, kd) != (b, l, d):
    raise ValueError(f"q {q_BHLD.shape} and k {k_BKLD.shape} disagree on batch, length or head dim")
  if kh < 1 or h % kh:
    raise ValueError(f"{h} query heads cannot be grouped over {kh} KV heads")
  if len_B.shape != (b,):
    raise ValueError(f"len_B must have shape ({b},), got {len_B.shape}")
  if chunk < 1 or l % chunk:
    raise ValueError(f"prompt length {l} is not a multiple of chunk {chunk}")


class _Tiles:
  """One layer's keys and values cut into tiles, and the per-query-tile passes over them."""

  def __init__(self, k_NBKDT, v_NBKTD, len_B, *, scale, out_dtype):
    self.k, self.v, self.len_B = k_NBKDT, v_NBKTD, len_B
    self.t = k_NBKDT.shape[-1]
    self.scale, self.out_dtype = scale, out_dtype
    self.below_diagonal = np.tril(np.ones((self.t, self.t), bool))  # key <= query inside the diagonal tile

  def all_query_tiles(self, q_NBKGTD, colsum_NBKGT):
    """lax.scan over query tiles, skipping those that start past the longest prompt."""
    start_of_padding = jnp.max(self.len_B)

    def step(colsum, xs):
      q_BKGTD, i = xs
      zeros = jnp.zeros(q_BKGTD.shape, self.out_dtype)
      return lax.cond(
        i * self.t < start_of_padding, lambda: self.query_tile(q_BKGTD, i, colsum), lambda: (colsum, zeros)
      )

    return lax.scan(step, colsum_NBKGT, (q_NBKGTD, jnp.arange(q_NBKGTD.shape[0])))

  def query_tile(self, q_BKGTD, i, colsum_NBKGT):
    b, kh, g, t, d = q_BKGTD.shape
    q_ok_BT = (i * t + jnp.arange(t))[None, :] < self.len_B[:, None]
    q_ok = q_ok_BT[:, None, None, :]  # [B, 1, 1, T]
    m = jnp.full((b, kh, g, t), _MASKED, jnp.float32)
    total = jnp.zeros((b, kh, g, t), jnp.float32)
    acc = jnp.zeros((b, kh, g, t, d), jnp.float32)
    if colsum_NBKGT is None:
      m, total, acc = self.sweep(q_BKGTD, i, self.online_step, (m, total, acc))
      o = jnp.where(q_ok[..., None], acc / total[..., None], 0.0)
      return None, o.astype(self.out_dtype)
    m, total = self.sweep(q_BKGTD, i, self.statistics_step, (m, total))
    weight = jnp.where(q_ok, 1.0 / total, 0.0)  # zero for padded queries: no output, no colsum
    acc, colsum_NBKGT = self.sweep(q_BKGTD, i, self.exact_step(m, weight), (acc, colsum_NBKGT))
    return colsum_NBKGT, acc.astype(self.out_dtype)

  def sweep(self, q_BKGTD, i, step, carry):
    """step(carry, raw scores of key tile j, j) over key tiles 0..i; the diagonal tile i is masked."""
    carry = lax.fori_loop(0, i, lambda j, c: step(c, self.scores(q_BKGTD, j), j), carry)
    diagonal = jnp.where(self.below_diagonal, self.scores(q_BKGTD, i), _MASKED)
    return step(carry, diagonal, i, self.below_diagonal)

  def exp(self, s, m, mask):
    """exp((s - m) * scale), floored at e^EXP_FLOOR; zero where mask (if any) is False."""
    e = jnp.exp(jnp.maximum((s - m[..., None]) * self.scale, EXP_FLOOR))
    return e if mask is None else jnp.where(mask, e, 0.0)

  def scores(self, q_BKGTD, j):
    """Unscaled q . k of key tile j, float32 [B, K, G, T, T]; the scale enters inside exp."""
    return jnp.einsum("bkgqd,bkdt->bkgqt", q_BKGTD, self.k[j], preferred_element_type=jnp.float32)

  def pv(self, p_BKGTT, j):
    return jnp.einsum(
      "bkgqt,bktd->bkgqd", p_BKGTT.astype(self.v.dtype), self.v[j], preferred_element_type=jnp.float32
    )

  def online_step(self, carry, s, j, mask=None):
    m, total, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    e = self.exp(s, m_new, mask)
    rescale = jnp.exp((m - m_new) * self.scale)
    return m_new, total * rescale + jnp.sum(e, axis=-1), acc * rescale[..., None] + self.pv(e, j)

  def statistics_step(self, carry, s, j, mask=None):
    m, total = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    e = self.exp(s, m_new, mask)
    return m_new, total * jnp.exp((m - m_new) * self.scale) + jnp.sum(e, axis=-1)

  def exact_step(self, m, weight):
    def step(carry, s, j, mask=None):
      acc, colsum_NBKGT = carry
      p = self.exp(s, m, mask) * weight[..., None]
      col = lax.dynamic_index_in_dim(colsum_NBKGT, j, keepdims=False) + jnp.sum(p, axis=-2)
      return acc + self.pv(p, j), lax.dynamic_update_index_in_dim(colsum_NBKGT, col, j, 0)

    return step
