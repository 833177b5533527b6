"""Paged per-head decode / chunk attention over the Ada-KV page pool (ADAKV_SPEC section 8).

Layout of one layer's cache: a pool of pages k/v [N, P, D]; cache head (b, k) owns the pages
page_table[b, k, i] for i < ceil(lengths[b, k] / P), and its entry j sits at page
page_table[b, k, j // P], slot j % P. A page belongs to one cache head; a head's pages may sit anywhere
in the pool, in any order. Table entries past a head's live pages are never dereferenced (they may hold
out-of-range ids); entries past a length, and pages nobody owns, may hold anything (NaN included) and
never reach the output.

Per-head tables on a standard paged kernel: fold (sequence, KV head) into one "sequence" axis of B * K
sequences, each with its own page list and length and a single KV head, and give it the G query heads
of its GQA group (times the T tokens of a chunk) as G * T query rows. That is the usual paged decode
problem, so the kernels below are ordinary paged flash-decoding kernels over B * K sequences.

A chunk of T query tokens has its own T entries already in the cache at [len - T, len): row (g, t)
sees entries j < len - T + 1 + t (T = 1: a decode step sees j < len). A row that sees nothing outputs
zeros. Softmax and accumulation run in float32; the output has q's dtype.

Implementations (all equal to `paged_attention_reference`, tests/kernels/test_paged_attention.py):
- `paged_attention_xla`: what CPU users run. On CPU a gather of pages (any dynamic slice of a big
  buffer) materialises a copy, doubling the cache traffic, while a dense GEMM over contiguous operands is
  the fast primitive. So, for few query rows, every pool row is scored against every query row in one
  GEMM and a mask built from the inverse of the page table (over live pages only) keeps each query row
  to its own head's visible entries: the GEMMs read each pool page once and nothing is gathered (V's
  dead rows are zeroed first, one elementwise pass, since they may hold NaN, unless the caller says they
  are finite: `finite_dead`, which the library's own cache guarantees). That work grows with the
  number of query rows; past `XLA_ALL_ROWS_MAX_QUERY_ROWS` the pages are gathered per head instead.
  When the pool is exactly the heads' pages in table order (head b * K + k owns pages
  [(b * K + k) * M, (b * K + k + 1) * M): what `adakv_jax.cache.assign_pages` gives every head of a full
  or uniform cache), the pool is already a dense [B * K, M * P, D] cache: a batched GEMM per head reads
  each entry once with only its own G * T rows, nothing gathered and nothing wasted. Whether the table is
  in that order is data, so one `lax.cond` picks the dense path or the general one at run time.
- Pallas "tpu" (Mosaic): grid (B, K, splits); page table and lengths are scalar-prefetched into SMEM;
  the pools stay in HBM (memory_space=pl.ANY) and each program copies its head's live pages into a
  double-buffered VMEM block of `pages_per_block` pages with one DMA per live page (dead pages of a
  partial block are skipped by pl.when, so dead table entries are never read as ids), looping over its
  live blocks only (trip count from the length). Online softmax state lives in VMEM scratch; the
  flash-decoding splits merge by log-sum-exp. The page table must fit in SMEM (4 * B * K * M bytes).
  Programs share no state (all grid axes are parallel, for megacore), so each one waits for its own
  first block: there is no prefetch across programs.
- Pallas "triton" (GPU): grid (B, K, splits); each program loops over its head's live blocks (trip
  count from the length), loads the page ids of a block from the table and gathers the block's rows
  from the pool with masked loads (rows past the length are not read). Never run on a GPU so far: on CPU
  the tests run it in the interpreter and lower it to Triton IR; compiling that IR needs a GPU.

Both kernels need `check_page_size(P)`; the Triton one also a power-of-two head dim >= 16.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import backend as backend_lib

MIN_PAGE_SIZE, MAX_PAGE_SIZE = 8, 256
# paged_attention_xla scores all pool rows against all query rows while B * K * G * T is at most this,
# and gathers each head's pages above it: the all-rows work grows with the query rows. Measured on a
# 2-core CPU (float32, D = 64 and 128, pools of 3-12 MB; experiments/bench_kernels.py, xla_crossover):
# all-rows ~1.4x faster at 9 rows, even at 18-32, 1.5-3x slower from 54 rows on.
XLA_ALL_ROWS_MAX_QUERY_ROWS = 16
# Finite start for the running max: a row with nothing visible yet keeps m = _M_INIT, and
# exp(-inf - _M_INIT) = 0, so fully masked blocks add nothing and never produce NaN.
_M_INIT = -1e30
_HI = lax.Precision.HIGHEST


def check_page_size(page_size: int) -> None:
  """Raises ValueError unless the Pallas kernels can tile pages of this size."""
  if (
    not isinstance(page_size, int)
    or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE
    or page_size & (page_size - 1)
  ):
    raise ValueError(
      f"page size {page_size!r} must be a power of two in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]: a TPU "
      f"page is copied into VMEM whole, so its rows must fill {MIN_PAGE_SIZE}-row sublane tiles, and "
      f"Triton tiles (a block of whole pages) must be powers of two; above {MAX_PAGE_SIZE} a page "
      "wastes more than it saves (a head's last page is partial)"
    )


# ----------------------------------------------------------------------------------------------------
# Inputs.


def _check_inputs(q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK):
  if q_BKGTD.ndim != 5:
    raise ValueError(f"queries {q_BKGTD.shape} must be [B, K, G, T, D]")
  b, kh, _, _, d = q_BKGTD.shape
  if k_pages_NPD.ndim != 3 or k_pages_NPD.shape != v_pages_NPD.shape or k_pages_NPD.shape[2] != d:
    raise ValueError(
      f"page pools k {k_pages_NPD.shape} / v {v_pages_NPD.shape} must both be [N, P, D] "
      f"with D = {d} as in queries {q_BKGTD.shape}"
    )
  if k_pages_NPD.dtype != v_pages_NPD.dtype:
    raise ValueError(f"page pools k ({k_pages_NPD.dtype}) and v ({v_pages_NPD.dtype}) differ in dtype")
  if page_table_BKM.ndim != 3 or page_table_BKM.shape[:2] != (b, kh):
    raise ValueError(f"page table {page_table_BKM.shape} must be [B, K, M] with (B, K) = {(b, kh)}")
  if lengths_BK.shape != (b, kh):
    raise ValueError(f"lengths {lengths_BK.shape} must be [B, K] = {(b, kh)}")
  for name, x in (("page table", page_table_BKM), ("lengths", lengths_BK)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be integer, got {x.dtype}")


def _scale(d: int, sm_scale: float | None) -> float:
  return 1.0 / math.sqrt(d) if sm_scale is None else sm_scale


def _visible_BKT(lengths_BK: jax.Array, chunk: int) -> jax.Array:
  """[B, K] -> [B, K, T]: row t of a T-token chunk sees entries j < len - T + 1 + t."""
  return lengths_BK.astype(jnp.int32)[:, :, None] - (chunk - 1) + jnp.arange(chunk, dtype=jnp.int32)


def _live_pages_BKM(page_table_BKM: jax.Array, lengths_BK: jax.Array, page_size: int) -> jax.Array:
  """Which table slots name a live page: i < ceil(len / P)."""
  live_pages_BK = -(-lengths_BK.astype(jnp.int32) // page_size)
  return jnp.arange(page_table_BKM.shape[2], dtype=jnp.int32) < live_pages_BK[:, :, None]


# ----------------------------------------------------------------------------------------------------
# Reference and the XLA path.


def _gathered_attention(
  q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK, *, sm_scale, compute_dtype, precision
):
  """Each head's pages gathered through its table (dead slots read page 0), dead entries zeroed before
  any product, masked softmax in float32."""
  b, kh, _, chunk, d = q_BKGTD.shape
  page = k_pages_NPD.shape[1]
  cap = page_table_BKM.shape[2] * page
  ids_BKM = jnp.where(_live_pages_BKM(page_table_BKM, lengths_BK, page), page_table_BKM, 0)
  live_BKC1 = (jnp.arange(cap, dtype=jnp.int32) < lengths_BK[:, :, None])[..., None]

  def gather(pages_NPD):
    x_BKCD = pages_NPD[ids_BKM].reshape(b, kh, cap, d).astype(compute_dtype)
    return jnp.where(live_BKC1, x_BKCD, jnp.zeros((), compute_dtype))

  k_BKCD, v_BKCD = gather(k_pages_NPD), gather(v_pages_NPD)
  s = (
    jnp.einsum(
      "bkgtd,bkcd->bkgtc",
      q_BKGTD.astype(compute_dtype),
      k_BKCD,
      precision=precision,
      preferred_element_type=jnp.float32,
    )
    * sm_scale
  )
  visible_BKTC = jnp.arange(cap, dtype=jnp.int32) < _visible_BKT(lengths_BK, chunk)[..., None]
  s = jnp.where(visible_BKTC[:, :, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum(
    "bkgtc,bkcd->bkgtd",
    p.astype(compute_dtype),
    v_BKCD,
    precision=precision,
    preferred_element_type=jnp.float32,
  )
  return (o / jnp.where(l > 0, l, 1.0)).astype(q_BKGTD.dtype)


def paged_attention_reference(
  q_BKGTD: jax.Array,
  k_pages_NPD: jax.Array,
  v_pages_NPD: jax.Array,
  page_table_BKM: jax.Array,
  lengths_BK: jax.Array,
  *,
  sm_scale: float | None = None,
) -> jax.Array:
  """The oracle: per-head gather, float32 everywhere, HIGHEST precision products."""
  _check_inputs(q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK)
  return _gathered_attention(
    q_BKGTD,
    k_pages_NPD,
    v_pages_NPD,
    page_table_BKM,
    lengths_BK,
    sm_scale=_scale(q_BKGTD.shape[-1], sm_scale),
    compute_dtype=jnp.float32,
    precision=_HI,
  )


def _pool_inverse(page_table_BKM, lengths_BK, num_pages, page_size):
  """Inverse of the page table over live pages: per pool page, its owner head b * K + k and its index
  i in that head's table, -1 where nobody owns it. Dead slots scatter out of range and are dropped."""
  b, kh, m = page_table_BKM.shape
  ids = jnp.where(_live_pages_BKM(page_table_BKM, lengths_BK, page_size), page_table_BKM, num_pages)
  ids = ids.astype(jnp.int32).reshape(-1)
  head = jnp.broadcast_to(jnp.arange(b * kh, dtype=jnp.int32).reshape(b, kh, 1), (b, kh, m))
  index = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, kh, m))
  owner_N = jnp.full((num_pages,), -1, jnp.int32).at[ids].set(head.reshape(-1), mode="drop")
  index_N = jnp.full((num_pages,), -1, jnp.int32).at[ids].set(index.reshape(-1), mode="drop")
  return owner_N, index_N


def _all_rows_attention(
  q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK, *, sm_scale, finite_dead: bool
):
  """Every pool row against every query row: S = q @ rows_k^T [Q, N * P], each query row masked to
  the entries its own head may see, row softmax, then p @ rows_v. No gather of K or V."""
  b, kh, g, chunk, d = q_BKGTD.shape
  n, page, _ = k_pages_NPD.shape
  dtype = k_pages_NPD.dtype
  prec = _HI if dtype == jnp.float32 else None
  owner_N, index_N = _pool_inverse(page_table_BKM, lengths_BK, n, page)
  owner_R = jnp.repeat(owner_N, page)  # R = N * P pool rows
  pos_R = (index_N[:, None] * page + jnp.arange(page, dtype=jnp.int32)).reshape(-1)
  len_R = jnp.where(owner_R >= 0, lengths_BK.astype(jnp.int32).reshape(-1)[owner_R], 0)
  # Query row (b, k, g, t): its head and how many of that head's entries it sees.
  head_Q = jnp.broadcast_to(
    jnp.arange(b * kh, dtype=jnp.int32).reshape(b, kh, 1, 1), (b, kh, g, chunk)
  ).reshape(-1)
  vis_Q = jnp.broadcast_to(_visible_BKT(lengths_BK, chunk)[:, :, None], (b, kh, g, chunk)).reshape(-1)
  rows_k, rows_v = k_pages_NPD.reshape(n * page, d), v_pages_NPD.reshape(n * page, d)
  q_QD = q_BKGTD.reshape(-1, d).astype(dtype)
  s_QR = (
    lax.dot_general(
      q_QD, rows_k, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
    )
    * sm_scale
  )
  visible_QR = (owner_R[None, :] == head_Q[:, None]) & (pos_R[None, :] < vis_Q[:, None])
  s_QR = jnp.where(visible_QR, s_QR, -jnp.inf)
  m_Q1 = jnp.max(s_QR, axis=1, keepdims=True)
  p_QR = jnp.exp(s_QR - jnp.where(jnp.isfinite(m_Q1), m_Q1, 0.0))
  l_Q1 = jnp.sum(p_QR, axis=1, keepdims=True)
  if not finite_dead:  # dead rows may hold NaN and 0 * NaN = NaN: zero them before the second product
    live_R1 = ((owner_R >= 0) & (pos_R < len_R))[:, None]
    rows_v = jnp.where(live_R1, rows_v, jnp.zeros((), dtype))
  o_QD = lax.dot_general(
    p_QR.astype(dtype), rows_v, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32
  )
  o_QD = o_QD / jnp.where(l_Q1 > 0, l_Q1, 1.0)
  return o_QD.reshape(q_BKGTD.shape).astype(q_BKGTD.dtype)


def _is_contiguous(page_table_BKM, lengths_BK, num_pages, page_size):
  """Whether the pool is exactly the heads' pages in table order: N = B * K * M and each live slot i
  of head h = b * K + k names page h * M + i (slots past a head's live pages are not looked at)."""
  b, kh, m = page_table_BKM.shape
  if num_pages != b * kh * m:
    return None  # statically not
  in_order = page_table_BKM == jnp.arange(num_pages, dtype=page_table_BKM.dtype).reshape(b, kh, m)
  return jnp.all(in_order | ~_live_pages_BKM(page_table_BKM, lengths_BK, page_size))


def _contiguous_attention(
  q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK, *, sm_scale, finite_dead: bool
):
  """The pool as a dense [B * K, C = M * P, D] cache (valid when `_is_contiguous`): per head, its G * T
  rows against its C entries. Scores come out [heads, C, rows], the long C axis as the GEMM's rows: of
  the layouts tried over a 30-layer stack of 8K-entry caches, the one XLA:CPU ran fastest. The
  optimization barriers keep XLA from fusing the softmax into the second product, which it then runs as
  a slower loop."""
  del page_table_BKM
  b, kh, g, chunk, d = q_BKGTD.shape
  n, page, _ = k_pages_NPD.shape
  dtype = k_pages_NPD.dtype
  prec = _HI if dtype == jnp.float32 else None
  c = n * page // (b * kh)
  k_HCD, v_HCD = k_pages_NPD.reshape(b * kh, c, d), v_pages_NPD.reshape(b * kh, c, d)
  q_HRD = q_BKGTD.reshape(b * kh, g * chunk, d).astype(dtype)
  s_HCR = jnp.einsum("hcd,hrd->hcr", k_HCD, q_HRD, precision=prec, preferred_element_type=jnp.float32)
  s_HCR = lax.optimization_barrier(s_HCR * sm_scale)
  vis_HR = jnp.broadcast_to(_visible_BKT(lengths_BK, chunk)[:, :, None], (b, kh, g, chunk))
  pos_C = jnp.arange(c, dtype=jnp.int32)
  s_HCR = jnp.where(pos_C[None, :, None] < vis_HR.reshape(b * kh, 1, g * chunk), s_HCR, -jnp.inf)
  m_H1R = jnp.max(s_HCR, axis=1, keepdims=True)
  p_HCR = jnp.exp(s_HCR - jnp.where(jnp.isfinite(m_H1R), m_H1R, 0.0))
  l_HR = jnp.sum(p_HCR, axis=1)
  p_HCR = lax.optimization_barrier(p_HCR.astype(dtype))
  if not finite_dead:  # dead entries may hold NaN and 0 * NaN = NaN
    live_HC1 = (pos_C[None, :] < lengths_BK.astype(jnp.int32).reshape(-1, 1))[..., None]
    v_HCD = jnp.where(live_HC1, v_HCD, jnp.zeros((), dtype))
  o_HRD = jnp.einsum("hcr,hcd->hrd", p_HCR, v_HCD, precision=prec, preferred_element_type=jnp.float32)
  o_HRD = o_HRD / jnp.where(l_HR > 0, l_HR, 1.0)[:, :, None]
  return o_HRD.reshape(q_BKGTD.shape).astype(q_BKGTD.dtype)


def paged_attention_xla(
  q_BKGTD: jax.Array,
  k_pages_NPD: jax.Array,
  v_pages_NPD: jax.Array,
  page_table_BKM: jax.Array,
  lengths_BK: jax.Array,
  *,
  sm_scale: float | None = None,
  finite_dead: bool = False,
) -> jax.Array:
  """The XLA path (backend="xla"): a dense batched GEMM when the pool is the heads' pages in table order
  (`_is_contiguous`); otherwise all pool rows in one GEMM while B * K * G * T <=
  XLA_ALL_ROWS_MAX_QUERY_ROWS, a per-head gather of pages above it. Products in the cache dtype
  (HIGHEST for float32) with float32 accumulation. finite_dead: the caller guarantees that dead entries
  and unowned pages hold finite values (the library's cache does: fresh pages are zeros and only model
  outputs are written), which spares the all-rows path a pass over V."""
  _check_inputs(q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK)
  scale = _scale(q_BKGTD.shape[-1], sm_scale)
  b, kh, g, chunk, _ = q_BKGTD.shape
  n, page, _ = k_pages_NPD.shape
  dtype = k_pages_NPD.dtype
  if b * kh * g * chunk <= XLA_ALL_ROWS_MAX_QUERY_ROWS:
    general = functools.partial(_all_rows_attention, sm_scale=scale, finite_dead=finite_dead)
  else:
    prec = _HI if dtype == jnp.float32 else None
    general = functools.partial(_gathered_attention, sm_scale=scale, compute_dtype=dtype, precision=prec)
  args = (q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK)
  contiguous = _is_contiguous(page_table_BKM, lengths_BK, n, page)
  if contiguous is None:
    return general(*args)
  dense = functools.partial(_contiguous_attention, sm_scale=scale, finite_dead=finite_dead)
  return lax.cond(contiguous, dense, general, *args)


# ----------------------------------------------------------------------------------------------------
# Shared pieces of the two kernels.


def _online_softmax_step(q_RD, k_ND, v_ND, live_N1, visible_RN, m_R1, l_R1, acc_RD, sm_scale):
  """One block of flash attention: returns the updated (m, l, acc), all float32.

  live/visible say which of the N block entries exist and which rows may see them; v rows that do not
  exist are zeroed so garbage past a length (or in a buffer slot no page was copied into) cannot reach
  the output.
  """
  # float32 caches get IEEE float32 products: the Triton lowering reads the default precision as TF32.
  prec = _HI if k_ND.dtype == jnp.float32 else None
  s_RN = (
    lax.dot_general(q_RD, k_ND, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)
    * sm_scale
  )
  s_RN = jnp.where(visible_RN, s_RN, -jnp.inf)
  m_new = jnp.maximum(m_R1, jnp.max(s_RN, axis=1, keepdims=True))
  alpha = jnp.exp(m_R1 - m_new)
  p_RN = jnp.exp(s_RN - m_new)
  l_new = alpha * l_R1 + jnp.sum(p_RN, axis=1, keepdims=True)
  v_ND = jnp.where(live_N1, v_ND, jnp.zeros_like(v_ND))
  pv_RD = lax.dot_general(
    p_RN.astype(v_ND.dtype),
    v_ND,
    (((1,), (0,)), ((), ())),
    precision=prec,
    preferred_element_type=jnp.float32,
  )
  return m_new, l_new, alpha * acc_RD + pv_RD


def _finish(m_R1, l_R1, acc_RD):
  """Normalised partial output and its log-sum-exp; a row that saw nothing gives (0, -inf)."""
  seen = l_R1 > 0
  o = acc_RD / jnp.where(seen, l_R1, 1.0)
  lse = jnp.where(seen, m_R1 + jnp.log(jnp.where(seen, l_R1, 1.0)), -jnp.inf)
  return jnp.where(seen, o, 0.0), lse


def _merge_splits(o_BKSRD: jax.Array, lse_BKSR1: jax.Array) -> jax.Array:
  """Log-sum-exp merge of the per-split partial outputs (empty splits carry lse = -inf)."""
  if o_BKSRD.shape[2] == 1:
    return o_BKSRD[:, :, 0]
  lse_max = jnp.max(lse_BKSR1, axis=2, keepdims=True)
  w = jnp.exp(lse_BKSR1 - jnp.where(jnp.isfinite(lse_max), lse_max, 0.0))
  den = jnp.sum(w, axis=2)
  return jnp.sum(w * o_BKSRD, axis=2) / jnp.where(den > 0, den, 1.0)


def _row_offsets_R1(rows: int, chunk: int) -> jax.Array:
  """Rows are (g, t) flattened with t minor: row r sees len - (chunk - 1) + r % chunk entries."""
  if chunk == 1:
    return jnp.zeros((rows, 1), jnp.int32)
  return lax.broadcasted_iota(jnp.int32, (rows, 1), 0) % chunk - (chunk - 1)


def _iota(shape, dim):
  """2-D iotas only: TPU vregs are 2-D, and Mosaic handles 1-D vectors poorly."""
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def split_blocks(length, split, *, page_size: int, pages_per_block: int, num_splits: int):
  """The blocks [first, end) that split `split` of a head of this length reduces.

  A head cuts its own live blocks (ceil(ceil(len / P) / pages_per_block)) into num_splits even ranges,
  so the work of every split follows the length; a split past the head's last block gets none.
  """
  blocks = pl.cdiv(pl.cdiv(length, page_size), pages_per_block)
  per_split = pl.cdiv(blocks, num_splits)
  first = jnp.minimum(split * per_split, blocks)
  return first, jnp.minimum(first + per_split, blocks)


# ----------------------------------------------------------------------------------------------------
# TPU lowering (Mosaic): SMEM page table, one DMA per live page into a double-buffered VMEM block.


def _tpu_kernel(
  len_ref,
  table_ref,
  q_ref,
  k_hbm,
  v_hbm,
  o_ref,
  lse_ref,
  k_buf,
  v_buf,
  sems,
  m_sc,
  l_sc,
  acc_sc,
  *,
  sm_scale,
  chunk,
  num_splits,
  max_pages,
):
  b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  head = b * pl.num_programs(1) + h
  length = len_ref[head]  # SMEM arrays are 1-D: a 2-D SMEM array pads each row
  _, ppb, page, d = k_buf.shape
  block = ppb * page
  live_pages = pl.cdiv(length, page)
  first, end = split_blocks(length, s, page_size=page, pages_per_block=ppb, num_splits=num_splits)

  def page_dmas(blk, slot, action):
    """Starts or waits the copies of block blk's live pages; dead pages are neither read from the
    table nor copied (their buffer slots keep stale data, masked in the compute)."""
    for j in range(ppb):

      @pl.when(blk * ppb + j < live_pages)
      def _():
        pid = table_ref[head * max_pages + blk * ppb + j]
        for pool, buf, sem in ((k_hbm, k_buf, sems.at[0, slot]), (v_hbm, v_buf, sems.at[1, slot])):
          copy = pltpu.make_async_copy(pool.at[pid], buf.at[slot, j], sem)
          if action == "start":
            copy.start()
          else:
            copy.wait()

  def load_block(buf, slot):
    if ppb == 1:
      return buf[slot, 0]
    x = buf[slot]  # [ppb, P, D]
    # Merging (ppb, P) is a layout no-op for 32-bit rows (P is a multiple of the 8-row sublane tile);
    # packed dtypes take the merge in float32.
    return x.astype(jnp.float32).reshape(block, d).astype(x.dtype)

  m_sc[...] = jnp.full(m_sc.shape, _M_INIT, jnp.float32)
  l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
  acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(first < end)
  def _prefetch_first():
    page_dmas(first, 0, "start")

  def body(blk, carry):
    slot = lax.rem(blk - first, 2)

    @pl.when(blk + 1 < end)
    def _prefetch_next():
      page_dmas(blk + 1, 1 - slot, "start")

    page_dmas(blk, slot, "wait")
    rows = q_ref.shape[0]
    start = blk * block
    visible_RN = start + _iota((1, block), 1) < length + _row_offsets_R1(rows, chunk)
    live_N1 = start + _iota((block, 1), 0) < length
    m, l, acc = _online_softmax_step(
      q_ref[...],
      load_block(k_buf, slot),
      load_block(v_buf, slot),
      live_N1,
      visible_RN,
      m_sc[...],
      l_sc[...],
      acc_sc[...],
      sm_scale,
    )
    m_sc[...] = m
    l_sc[...] = l
    acc_sc[...] = acc
    return carry

  lax.fori_loop(first, end, body, 0)
  o, lse = _finish(m_sc[...], l_sc[...], acc_sc[...])
  o_ref[...] = o
  lse_ref[...] = lse


def _attention_tpu(
  q_BKRD,
  k_pages_NPD,
  v_pages_NPD,
  table_BKM,
  len_BK,
  *,
  chunk,
  sm_scale,
  pages_per_block,
  num_splits,
  interpret,
):
  b, kh, rows, d = q_BKRD.shape
  _, page, _ = k_pages_NPD.shape
  max_pages = table_BKM.shape[2]
  kernel = functools.partial(
    _tpu_kernel, sm_scale=sm_scale, chunk=chunk, num_splits=num_splits, max_pages=max_pages
  )
  sq = pl.squeezed
  buf = pltpu.VMEM((2, pages_per_block, page, d), k_pages_NPD.dtype)
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=2,
    grid=(b, kh, num_splits),
    in_specs=[
      pl.BlockSpec((sq, sq, rows, d), lambda b_, h_, s_, *_: (b_, h_, 0, 0)),
      pl.BlockSpec(memory_space=pl.ANY),
      pl.BlockSpec(memory_space=pl.ANY),
    ],
    out_specs=[
      pl.BlockSpec((sq, sq, sq, rows, d), lambda b_, h_, s_, *_: (b_, h_, s_, 0, 0)),
      pl.BlockSpec((sq, sq, sq, rows, 1), lambda b_, h_, s_, *_: (b_, h_, s_, 0, 0)),
    ],
    scratch_shapes=[
      buf,
      buf,
      pltpu.SemaphoreType.DMA((2, 2)),
      pltpu.VMEM((rows, 1), jnp.float32),
      pltpu.VMEM((rows, 1), jnp.float32),
      pltpu.VMEM((rows, d), jnp.float32),
    ],
  )
  mat = backend_lib.varying_axes(q_BKRD, k_pages_NPD, v_pages_NPD, table_BKM, len_BK)
  o, lse = pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=[
      jax.ShapeDtypeStruct((b, kh, num_splits, rows, d), jnp.float32, manual_axis_type=mat),
      jax.ShapeDtypeStruct((b, kh, num_splits, rows, 1), jnp.float32, manual_axis_type=mat),
    ],
    # Every program prefetches its own first block, so no state crosses programs: all parallel.
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
    interpret=interpret,
    name="paged_attention_tpu",
  )(len_BK.reshape(b * kh), table_BKM.reshape(b * kh * max_pages), q_BKRD, k_pages_NPD, v_pages_NPD)
  return _merge_splits(o, lse)


# ----------------------------------------------------------------------------------------------------
# GPU lowering (Triton): one program per (b, k, split), loop trip count from the length.


def _triton_kernel(
  len_ref,
  table_ref,
  q_ref,
  k_ref,
  v_ref,
  o_ref,
  lse_ref,
  *,
  sm_scale,
  chunk,
  page,
  pages_per_block,
  num_splits,
):
  s = pl.program_id(2)
  length = len_ref[()]
  rows, d = q_ref.shape
  block = page * pages_per_block
  live_pages = pl.cdiv(length, page)
  first, end = split_blocks(length, s, page_size=page, pages_per_block=pages_per_block, num_splits=num_splits)
  q = q_ref[...]
  off_R1 = _row_offsets_R1(rows, chunk)
  slot_N = lax.broadcasted_iota(jnp.int32, (block,), 0)

  def body(blk, carry):
    # Entry e of the block sits in table slot blk * ppb + e // P at row e % P of that page; dead slots
    # of a partial block are masked out of the table load, and rows past the length out of the K/V load.
    index_N = blk * pages_per_block + slot_N // page
    pid_N = pltriton.load(table_ref.at[index_N], mask=index_N < live_pages, other=0)
    row_N = pid_N * page + slot_N % page
    pos_N = blk * block + slot_N
    live_ND = jnp.broadcast_to((pos_N < length)[:, None], (block, d))
    row_ND = jnp.broadcast_to(row_N[:, None], (block, d))
    col_ND = lax.broadcasted_iota(jnp.int32, (block, d), 1)
    k = pltriton.load(k_ref.at[row_ND, col_ND], mask=live_ND, other=0)
    v = pltriton.load(v_ref.at[row_ND, col_ND], mask=live_ND, other=0)
    pos_1N = blk * block + _iota((1, block), 1)
    visible_RN = pos_1N < length + off_R1
    live_N1 = blk * block + _iota((block, 1), 0) < length
    return _online_softmax_step(q, k, v, live_N1, visible_RN, *carry, sm_scale)

  init = (
    jnp.full((rows, 1), _M_INIT, jnp.float32),
    jnp.zeros((rows, 1), jnp.float32),
    jnp.zeros((rows, d), jnp.float32),
  )
  m, l, acc = lax.fori_loop(first, end, body, init)
  o, lse = _finish(m, l, acc)
  o_ref[...] = o
  lse_ref[...] = lse


def _attention_triton(
  q_BKRD,
  k_pages_NPD,
  v_pages_NPD,
  table_BKM,
  len_BK,
  *,
  chunk,
  sm_scale,
  pages_per_block,
  num_splits,
  interpret,
):
  b, kh, rows, d = q_BKRD.shape
  n, page, _ = k_pages_NPD.shape
  max_pages = table_BKM.shape[2]
  # Triton's dot wants power-of-two tiles of at least 16: pad the rows (zero queries, sliced off).
  rows_p = max(16, pl.next_power_of_2(rows))
  q_BKRD = jnp.pad(q_BKRD, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
  kernel = functools.partial(
    _triton_kernel,
    sm_scale=sm_scale,
    chunk=chunk,
    page=page,
    pages_per_block=pages_per_block,
    num_splits=num_splits,
  )
  sq = pl.squeezed
  pool = pl.BlockSpec((n * page, d), lambda b_, h_, s_: (0, 0))
  mat = backend_lib.varying_axes(q_BKRD, k_pages_NPD, v_pages_NPD, table_BKM, len_BK)
  o, lse = pl.pallas_call(
    kernel,
    grid=(b, kh, num_splits),
    in_specs=[
      pl.BlockSpec((sq, sq), lambda b_, h_, s_: (b_, h_)),
      pl.BlockSpec((sq, sq, max_pages), lambda b_, h_, s_: (b_, h_, 0)),
      pl.BlockSpec((sq, sq, rows_p, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
      pool,
      pool,
    ],
    out_specs=[
      pl.BlockSpec((sq, sq, sq, rows_p, d), lambda b_, h_, s_: (b_, h_, s_, 0, 0)),
      pl.BlockSpec((sq, sq, sq, rows_p, 1), lambda b_, h_, s_: (b_, h_, s_, 0, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct((b, kh, num_splits, rows_p, d), jnp.float32, manual_axis_type=mat),
      jax.ShapeDtypeStruct((b, kh, num_splits, rows_p, 1), jnp.float32, manual_axis_type=mat),
    ],
    compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
    interpret=interpret,
    name="paged_attention_triton",
  )(len_BK, table_BKM, q_BKRD, k_pages_NPD.reshape(n * page, d), v_pages_NPD.reshape(n * page, d))
  return _merge_splits(o, lse)[:, :, :rows]


# ----------------------------------------------------------------------------------------------------
# Dispatch.


def _largest_power_of_two_at_most(x: int) -> int:
  return 1 << (x.bit_length() - 1)


def default_pages_per_block(page_size: int, max_pages: int, lowering: str, itemsize: int = 2) -> int:
  """TPU: blocks of >= 128 entries (each program's DMAs stay large), capped by M. Triton: 128 entries
  for 16-bit caches, 64 for float32 (the register tile), a power of two <= M."""
  if lowering == "tpu":
    return min(max_pages, pl.cdiv(128, page_size))
  want = max(1, (128 if itemsize <= 2 else 64) // page_size)
  return min(want, _largest_power_of_two_at_most(max_pages))


def _default_num_splits(batch_heads: int, num_blocks: int, lowering: str) -> int:
  """Enough (b, k, split) programs to fill the device, never more splits than blocks."""
  target = 2 if lowering == "tpu" else 256  # TPU: two cores per chip at most; GPU: ~2 waves of SMs
  return max(1, min(num_blocks, pl.cdiv(target, batch_heads)))


def _is_power_of_two(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _pallas_fits(lowering: str, page_size: int, max_pages: int, head_dim: int) -> bool:
  """Whether the kernel of this lowering can tile the cache at all (auto routes the rest to XLA)."""
  try:
    check_page_size(page_size)
  except ValueError:
    return False
  if lowering == "tpu":
    return True
  return (
    head_dim >= 16
    and _is_power_of_two(head_dim)
    and page_size * _largest_power_of_two_at_most(max_pages) >= 16
  )


def _check_pages_per_block(lowering, page, max_pages, d, pages_per_block):
  check_page_size(page)
  if not (isinstance(pages_per_block, int) and 0 < pages_per_block <= max_pages):
    raise ValueError(f"pages_per_block {pages_per_block!r} must be an int in [1, M={max_pages}]")
  if lowering == "triton":
    if not _is_power_of_two(pages_per_block) or pages_per_block * page < 16:
      raise ValueError(
        f"the Triton lowering needs pages_per_block * page_size to be a power of two >= "
        f"16, got {pages_per_block} * {page}; backend='auto' uses the XLA path for "
        "caches it cannot tile"
      )
    if d < 16 or not _is_power_of_two(d):
      raise ValueError(
        f"the Triton lowering needs a power-of-two head_dim >= 16, got {d}; "
        "backend='auto' uses the XLA path for it"
      )


def _check_num_splits(num_splits, num_blocks, max_pages, pages_per_block):
  if not (isinstance(num_splits, int) and 0 < num_splits <= num_blocks):
    raise ValueError(
      f"num_splits {num_splits!r} must be an int in [1, blocks={num_blocks}] "
      f"(M={max_pages} pages in blocks of {pages_per_block})"
    )


def paged_attention(
  q_BKGTD: jax.Array,
  k_pages_NPD: jax.Array,
  v_pages_NPD: jax.Array,
  page_table_BKM: jax.Array,
  lengths_BK: jax.Array,
  *,
  sm_scale: float | None = None,
  backend: str = "auto",
  interpret: bool | None = None,
  lowering: str | None = None,
  pages_per_block: int | None = None,
  num_splits: int | None = None,
  finite_dead: bool = False,
) -> jax.Array:
  """Attention of a T-token chunk (already written into the cache) over each head's pages.

  q [B, K, G, T, D]; pools [N, P, D]; page table [B, K, M]; lengths [B, K] -> [B, K, G, T, D] in q's
  dtype. backend: auto | xla | pallas (pallas_kernels.backend); auto takes the XLA path for caches the
  kernel cannot tile. lowering: 'tpu' | 'triton', default by platform. pages_per_block and num_splits
  tune the kernels (defaults: default_pages_per_block, enough programs to fill the device).
  finite_dead: see paged_attention_xla (the kernels never read dead entries either way).

  Contract (traced values, not checked): live table slots hold page ids in [0, N), no page is live in
  two heads, lengths lie in [0, M * P] (the kernels clip them to it). q is cast to the cache dtype for
  the products.
  """
  _check_inputs(q_BKGTD, k_pages_NPD, v_pages_NPD, page_table_BKM, lengths_BK)
  b, kh, g, chunk, d = q_BKGTD.shape
  _, page, _ = k_pages_NPD.shape
  max_pages = page_table_BKM.shape[2]
  lowering = backend_lib.resolve_lowering(lowering)
  if backend_lib.resolve_backend(backend) == "xla" or (
    backend == "auto" and not _pallas_fits(lowering, page, max_pages, d)
  ):
    return paged_attention_xla(
      q_BKGTD,
      k_pages_NPD,
      v_pages_NPD,
      page_table_BKM,
      lengths_BK,
      sm_scale=sm_scale,
      finite_dead=finite_dead,
    )

  if pages_per_block is None:
    pages_per_block = default_pages_per_block(page, max_pages, lowering, k_pages_NPD.dtype.itemsize)
  _check_pages_per_block(lowering, page, max_pages, d, pages_per_block)
  num_blocks = pl.cdiv(max_pages, pages_per_block)
  if num_splits is None:
    num_splits = _default_num_splits(b * kh, num_blocks, lowering)
  _check_num_splits(num_splits, num_blocks, max_pages, pages_per_block)
  impl = _attention_tpu if lowering == "tpu" else _attention_triton
  len_BK = jnp.clip(lengths_BK.astype(jnp.int32), 0, max_pages * page)
  q_BKRD = q_BKGTD.reshape(b, kh, g * chunk, d).astype(k_pages_NPD.dtype)
  o_BKRD = impl(
    q_BKRD,
    k_pages_NPD,
    v_pages_NPD,
    page_table_BKM.astype(jnp.int32),
    len_BK,
    chunk=chunk,
    sm_scale=_scale(d, sm_scale),
    pages_per_block=pages_per_block,
    num_splits=num_splits,
    interpret=backend_lib.resolve_interpret(interpret, lowering),
  )
  return o_BKRD.reshape(b, kh, g, chunk, d).astype(q_BKGTD.dtype)


def paged_decode_attention(
  q_BKGD: jax.Array,
  k_pages_NPD: jax.Array,
  v_pages_NPD: jax.Array,
  page_table_BKM: jax.Array,
  lengths_BK: jax.Array,
  *,
  sm_scale: float | None = None,
  backend: str = "auto",
  interpret: bool | None = None,
  lowering: str | None = None,
  pages_per_block: int | None = None,
  num_splits: int | None = None,
) -> jax.Array:
  """One decode step (T = 1): q [B, K, G, D] against each head's first lengths[b, k] entries."""
  if q_BKGD.ndim != 4:
    raise ValueError(f"decode queries {q_BKGD.shape} must be [B, K, G, D]")
  o = paged_attention(
    q_BKGD[:, :, :, None],
    k_pages_NPD,
    v_pages_NPD,
    page_table_BKM,
    lengths_BK,
    sm_scale=sm_scale,
    backend=backend,
    interpret=interpret,
    lowering=lowering,
    pages_per_block=pages_per_block,
    num_splits=num_splits,
  )
  return o[:, :, :, 0]
