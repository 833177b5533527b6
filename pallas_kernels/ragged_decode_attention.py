"""Ragged per-head decode attention over the padded Ada-KV cache.

After Ada-KV eviction every KV head keeps a different number of entries, stored in a cache padded to a
static capacity C. Dense attention over [C] would read and compute the padding; these kernels follow each
head's own length instead: blocks past a head's length are neither fetched nor computed, so the work of a
decode step tracks sum(lengths), not batch * heads * C.

Shapes: q [B, K, G, D] (the G query heads of a GQA group folded together), cache k/v [B, K, C, D],
lengths [B, K]. Entry j of head (b, k) is live iff j < lengths[b, k]; what lies past it never matters
(it may even be NaN).

Two lowerings of one algorithm (flash-decoding: the sequence is cut into `num_splits` ranges, each
range is reduced with an online softmax, the partial results merge by log-sum-exp):
- "tpu" (Mosaic): grid (B, K, splits, blocks). Lengths are scalar-prefetched into SMEM; the K/V index
  maps clamp the block index to the head's last live block, so a skipped step asks for the block that
  is already resident and the pipeline fetches nothing new; `pl.when` skips its compute. m/l/acc live
  in VMEM scratch across the block axis.
- "triton" (GPU): grid (B, K, splits); each program runs a `fori_loop` whose trip count comes from the
  head's length, so dead blocks cost neither loads nor loop iterations. Never run on a GPU so far (none
  in the session that wrote it): on CPU the tests run it in the interpreter (algorithm and indexing) and
  lower it to Triton IR (supported ops and shapes); compiling that IR needs a GPU.

Both lowerings also lower to MLIR on CPU (tests/kernels: test_kernel_lowers_for_device); Mosaic's own
compile passes run only on a TPU.

A chunk of T query tokens (the question appended after compression) uses the same kernels: the T
queries fold into the row axis next to G, and row t sees cache entries j < kv_len - T + 1 + t.
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

# Finite start for the running max: a row with nothing visible yet keeps m = _M_INIT, and
# exp(-inf - _M_INIT) = 0, so fully masked blocks add nothing and never produce NaN.
_M_INIT = -1e30


# ----------------------------------------------------------------------------------------------------
# References.


def _visible_lengths(kv_len_BK: jax.Array, chunk: int) -> jax.Array:
  """[B, K] -> [B, K, T]: row t of a T-token chunk sees entries j < kv_len - T + 1 + t."""
  t = jnp.arange(chunk, dtype=jnp.int32)
  return kv_len_BK.astype(jnp.int32)[:, :, None] - (chunk - 1) + t


def ragged_chunk_attention_reference(q_BKGTD: jax.Array, k_BKCD: jax.Array, v_BKCD: jax.Array,
                                     kv_len_BK: jax.Array, *, sm_scale: float | None = None
                                     ) -> jax.Array:
  """Masked dense softmax in float32; the chunk's T entries are already in the cache (causal inside).

  A row that sees nothing (length 0) returns zeros, not NaN.
  """
  *_, chunk, d = q_BKGTD.shape
  cap = k_BKCD.shape[2]
  scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
  pos_C = jnp.arange(cap, dtype=jnp.int32)
  visible_BKTC = pos_C < _visible_lengths(kv_len_BK, chunk)[..., None]
  # Padding may hold anything (NaN included): zero it so 0 * garbage cannot leak into the output.
  live_BKC1 = (pos_C < kv_len_BK[:, :, None])[..., None]
  k = jnp.where(live_BKC1, k_BKCD.astype(jnp.float32), 0.0)
  v = jnp.where(live_BKC1, v_BKCD.astype(jnp.float32), 0.0)
  hi = lax.Precision.HIGHEST
  s_BKGTC = jnp.einsum("bkgtd,bkcd->bkgtc", q_BKGTD.astype(jnp.float32), k, precision=hi) * scale
  s_BKGTC = jnp.where(visible_BKTC[:, :, None], s_BKGTC, -jnp.inf)
  m = jnp.max(s_BKGTC, axis=-1, keepdims=True)
  p = jnp.exp(s_BKGTC - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bkgtc,bkcd->bkgtd", p, v, precision=hi) / jnp.where(l > 0, l, 1.0)
  return o.astype(q_BKGTD.dtype)


def ragged_decode_attention_reference(q_BKGD: jax.Array, k_BKCD: jax.Array, v_BKCD: jax.Array,
                                      lengths_BK: jax.Array, *, sm_scale: float | None = None
                                      ) -> jax.Array:
  """One query token per sequence: the T = 1 case of the chunk reference."""
  o = ragged_chunk_attention_reference(q_BKGD[:, :, :, None], k_BKCD, v_BKCD, lengths_BK,
                                       sm_scale=sm_scale)
  return o[:, :, :, 0]


# ----------------------------------------------------------------------------------------------------
# Shared pieces of the two kernels.


def _online_softmax_step(q_RD, k_ND, v_ND, live_N1, visible_RN, m_R1, l_R1, acc_RD, sm_scale):
  """One block of flash attention: returns the updated (m, l, acc), all float32.

  live/visible say which of the N block entries exist and which rows may see them; v rows that do not
  exist are zeroed so garbage in the padding (or past the array's end) cannot reach the output.
  """
  # float32 caches get IEEE float32 products: the Triton lowering reads the default precision as TF32.
  prec = lax.Precision.HIGHEST if k_ND.dtype == jnp.float32 else None
  s_RN = lax.dot_general(q_RD, k_ND, (((1,), (1,)), ((), ())), precision=prec,
                         preferred_element_type=jnp.float32) * sm_scale
  s_RN = jnp.where(visible_RN, s_RN, -jnp.inf)
  m_new = jnp.maximum(m_R1, jnp.max(s_RN, axis=1, keepdims=True))
  alpha = jnp.exp(m_R1 - m_new)
  p_RN = jnp.exp(s_RN - m_new)
  l_new = alpha * l_R1 + jnp.sum(p_RN, axis=1, keepdims=True)
  v_ND = jnp.where(live_N1, v_ND, jnp.zeros_like(v_ND))
  pv_RD = lax.dot_general(p_RN.astype(v_ND.dtype), v_ND, (((1,), (0,)), ((), ())), precision=prec,
                          preferred_element_type=jnp.float32)
  return m_new, l_new, alpha * acc_RD + pv_RD


def _finish(m_R1, l_R1, acc_RD):
  """Normalised partial output and its log-sum-exp; a row that saw nothing gives (0, -inf)."""
  seen = l_R1 > 0
  o = acc_RD / jnp.where(seen, l_R1, 1.0)
  lse = jnp.where(seen, m_R1 + jnp.log(jnp.where(seen, l_R1, 1.0)), -jnp.inf)
  return jnp.where(seen, o, 0.0), lse


def _merge_splits(o_BKSRD: jax.Array, lse_BKSR1: jax.Array) -> jax.Array:
  """Log-sum-exp merge of the per-split partial outputs (dead splits carry lse = -inf)."""
  if o_BKSRD.shape[2] == 1:
    return o_BKSRD[:, :, 0]
  lse_max = jnp.max(lse_BKSR1, axis=2, keepdims=True)
  w = jnp.exp(lse_BKSR1 - jnp.where(jnp.isfinite(lse_max), lse_max, 0.0))
  den = jnp.sum(w, axis=2)
  return jnp.sum(w * o_BKSRD, axis=2) / jnp.where(den > 0, den, 1.0)


def _row_offsets_R1(rows: int, chunk: int) -> jax.Array:
  """Rows are (g, t) flattened with t minor: row r sees kv_len - (chunk - 1) + r % chunk entries."""
  if chunk == 1:
    return jnp.zeros((rows, 1), jnp.int32)
  return lax.broadcasted_iota(jnp.int32, (rows, 1), 0) % chunk - (chunk - 1)


def _iota(shape, dim):
  """2-D iotas only: TPU vregs are 2-D, and Mosaic handles 1-D vectors poorly."""
  return lax.broadcasted_iota(jnp.int32, shape, dim)


# ----------------------------------------------------------------------------------------------------
# TPU lowering (Mosaic): scalar-prefetched lengths, clamped index maps, pl.when.


def kv_block_index(length, split, step, blocks_per_split: int, block_size: int):
  """Cache block that grid step (split, step) of a head names in the TPU kernel's K/V index maps.

  Clamped to the head's last live block: a dead step names the block already in VMEM, so the pipeline
  skips its copy (consecutive equal block indices are not re-fetched), and an empty head keeps block 0.
  """
  last_live = jnp.maximum(pl.cdiv(length, block_size) - 1, 0)
  return jnp.minimum(split * blocks_per_split + step, last_live)


def _tpu_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, sm_scale,
                block_size, blocks_per_split, chunk):
  b, h, s, j = (pl.program_id(i) for i in range(4))
  length = len_ref[b * pl.num_programs(1) + h]  # 1-D in SMEM: a 2-D SMEM array pads each row
  start = (s * blocks_per_split + j) * block_size

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _M_INIT, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(start < length)
  def _compute():
    rows = q_ref.shape[0]
    visible_RN = start + _iota((1, block_size), 1) < length + _row_offsets_R1(rows, chunk)
    live_N1 = start + _iota((block_size, 1), 0) < length
    m, l, acc = _online_softmax_step(q_ref[...], k_ref[...], v_ref[...], live_N1, visible_RN,
                                     m_sc[...], l_sc[...], acc_sc[...], sm_scale)
    m_sc[...] = m
    l_sc[...] = l
    acc_sc[...] = acc

  @pl.when(j == blocks_per_split - 1)
  def _store():
    o, lse = _finish(m_sc[...], l_sc[...], acc_sc[...])
    o_ref[...] = o
    lse_ref[...] = lse


def _attention_tpu(q_BKRD, k_BKCD, v_BKCD, len_BK, *, chunk, sm_scale, block_size, num_splits,
                   interpret):
  b, kh, rows, d = q_BKRD.shape
  cap = k_BKCD.shape[2]
  num_blocks = pl.cdiv(cap, block_size)
  bps = pl.cdiv(num_blocks, num_splits)

  def kv_index(b_, h_, s_, j_, len_ref):
    return b_, h_, kv_block_index(len_ref[b_ * kh + h_], s_, j_, bps, block_size), 0

  sq = pl.squeezed
  kernel = functools.partial(_tpu_kernel, sm_scale=sm_scale, block_size=block_size,
                             blocks_per_split=bps, chunk=chunk)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, kh, num_splits, bps),
      in_specs=[
          pl.BlockSpec((sq, sq, rows, d), lambda b_, h_, s_, j_, _: (b_, h_, 0, 0)),
          pl.BlockSpec((sq, sq, block_size, d), kv_index),
          pl.BlockSpec((sq, sq, block_size, d), kv_index),
      ],
      out_specs=[
          pl.BlockSpec((sq, sq, sq, rows, d), lambda b_, h_, s_, j_, _: (b_, h_, s_, 0, 0)),
          pl.BlockSpec((sq, sq, sq, rows, 1), lambda b_, h_, s_, j_, _: (b_, h_, s_, 0, 0)),
      ],
      scratch_shapes=[
          pltpu.VMEM((rows, 1), jnp.float32),
          pltpu.VMEM((rows, 1), jnp.float32),
          pltpu.VMEM((rows, d), jnp.float32),
      ],
  )
  mat = backend_lib.varying_axes(q_BKRD, k_BKCD, v_BKCD, len_BK)
  o, lse = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=[
          jax.ShapeDtypeStruct((b, kh, num_splits, rows, d), jnp.float32, manual_axis_type=mat),
          jax.ShapeDtypeStruct((b, kh, num_splits, rows, 1), jnp.float32, manual_axis_type=mat),
      ],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="ragged_decode_attention_tpu",
  )(len_BK.reshape(b * kh), q_BKRD, k_BKCD, v_BKCD)
  return _merge_splits(o, lse)


# ----------------------------------------------------------------------------------------------------
# GPU lowering (Triton): one program per (b, k, split), loop trip count from the length.


def _triton_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale, block_size,
                   num_splits, chunk, capacity):
  s = pl.program_id(2)
  length = len_ref[()]
  rows, d = q_ref.shape
  # Each head splits its own live blocks evenly, so a split's work follows the length too.
  nb = pl.cdiv(length, block_size)
  per_split = pl.cdiv(nb, num_splits)
  first = s * per_split
  last = jnp.minimum(first + per_split, nb)
  q = q_ref[...]
  off_R1 = _row_offsets_R1(rows, chunk)

  def body(i, carry):
    m, l, acc = carry
    nominal = i * block_size
    # A ragged last block is read as the final full block of the array; entries before `nominal`
    # belong to the previous block and are masked out (no out-of-bounds reads, no masked loads).
    start = jnp.minimum(nominal, capacity - block_size)
    pos_1N = start + _iota((1, block_size), 1)
    visible_RN = (pos_1N >= nominal) & (pos_1N < length + off_R1)
    pos_N1 = start + _iota((block_size, 1), 0)
    live_N1 = (pos_N1 >= nominal) & (pos_N1 < length)
    k = k_ref[pl.ds(start, block_size), :]
    v = v_ref[pl.ds(start, block_size), :]
    return _online_softmax_step(q, k, v, live_N1, visible_RN, m, l, acc, sm_scale)

  init = (jnp.full((rows, 1), _M_INIT, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, d), jnp.float32))
  m, l, acc = lax.fori_loop(first, last, body, init)
  o, lse = _finish(m, l, acc)
  o_ref[...] = o
  lse_ref[...] = lse


def _attention_triton(q_BKRD, k_BKCD, v_BKCD, len_BK, *, chunk, sm_scale, block_size, num_splits,
                      interpret):
  b, kh, rows, d = q_BKRD.shape
  cap = k_BKCD.shape[2]
  # Triton's dot wants power-of-two tiles of at least 16: pad the rows (zero queries, sliced off).
  rows_p = max(16, pl.next_power_of_2(rows))
  q_BKRD = jnp.pad(q_BKRD, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0)))
  kernel = functools.partial(_triton_kernel, sm_scale=sm_scale, block_size=block_size,
                             num_splits=num_splits, chunk=chunk, capacity=cap)
  sq = pl.squeezed
  mat = backend_lib.varying_axes(q_BKRD, k_BKCD, v_BKCD, len_BK)
  o, lse = pl.pallas_call(
      kernel,
      grid=(b, kh, num_splits),
      in_specs=[
          pl.BlockSpec((sq, sq), lambda b_, h_, s_: (b_, h_)),
          pl.BlockSpec((sq, sq, rows_p, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
          pl.BlockSpec((sq, sq, cap, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
          pl.BlockSpec((sq, sq, cap, d), lambda b_, h_, s_: (b_, h_, 0, 0)),
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
      name="ragged_decode_attention_triton",
  )(len_BK, q_BKRD, k_BKCD, v_BKCD)
  return _merge_splits(o, lse)[:, :, :rows]


# ----------------------------------------------------------------------------------------------------
# Dispatch.


def _default_block_size(cap: int, lowering: str) -> int:
  # TPU: 512-entry tiles keep each DMA large; Triton: 64 keeps the register tile small.
  want = 512 if lowering == "tpu" else 64
  if lowering == "triton":
    return min(want, 1 << (cap.bit_length() - 1))  # a power of two that fits in the capacity
  return min(want, cap)


def _triton_fits(cap: int, head_dim: int) -> bool:
  """Triton tiles are powers of two: a block of >= 16 cache entries and the whole head dim."""
  return cap >= 16 and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _default_num_splits(batch_heads: int, num_blocks: int, lowering: str) -> int:
  """Enough (b, k, split) programs to fill the device, never more splits than blocks."""
  target = 2 if lowering == "tpu" else 256  # TPU: two cores per chip at most; GPU: ~2 waves of SMs
  return max(1, min(num_blocks, pl.cdiv(target, batch_heads)))


def ragged_chunk_attention(q_BKGTD: jax.Array, k_BKCD: jax.Array, v_BKCD: jax.Array,
                           kv_len_BK: jax.Array, *, sm_scale: float | None = None,
                           block_size: int | None = None, num_splits: int | None = None,
                           backend: str = "auto", interpret: bool | None = None,
                           lowering: str | None = None) -> jax.Array:
  """Attention of a T-token chunk already written into the cache (causal inside the chunk).

  backend: auto | xla | pallas (see pallas_kernels.backend). lowering: 'tpu' or 'triton', default by
  platform (the TPU-style kernel on CPU/TPU, Triton on GPU).
  """
  b, kh, g, chunk, d = q_BKGTD.shape
  if k_BKCD.shape != v_BKCD.shape or k_BKCD.shape[:2] != (b, kh) or k_BKCD.shape[3] != d:
    raise ValueError(f"cache k {k_BKCD.shape} / v {v_BKCD.shape} do not match queries "
                     f"{q_BKGTD.shape} as [B, K, C, D]")
  if kv_len_BK.shape != (b, kh):
    raise ValueError(f"lengths {kv_len_BK.shape} must be [B, K] = {(b, kh)}")
  lowering = backend_lib.resolve_lowering(lowering)
  cap = k_BKCD.shape[2]
  if backend_lib.resolve_backend(backend) == "xla" or (
      backend == "auto" and lowering == "triton" and not _triton_fits(cap, d)):
    # auto: shapes Triton cannot tile (tiny caches, head dims that are not powers of two) take the
    # reference instead of failing to compile
    return ragged_chunk_attention_reference(q_BKGTD, k_BKCD, v_BKCD, kv_len_BK, sm_scale=sm_scale)

  block_size = block_size or _default_block_size(cap, lowering)
  if not 0 < block_size <= cap:
    raise ValueError(f"block_size {block_size} must be in [1, capacity={cap}]")
  if lowering == "triton" and (block_size < 16 or block_size & (block_size - 1)):
    raise ValueError(f"the Triton lowering needs a power-of-two block_size >= 16, got {block_size} "
                     f"(capacity {cap}); backend='auto' uses the XLA reference for such caches")
  if lowering == "triton" and not _triton_fits(cap, d):
    raise ValueError(f"the Triton lowering needs a power-of-two head_dim >= 16, got {d}; "
                     "backend='auto' uses the XLA reference for it")
  num_blocks = pl.cdiv(cap, block_size)
  num_splits = num_splits or _default_num_splits(b * kh, num_blocks, lowering)
  if not 0 < num_splits <= num_blocks:
    raise ValueError(f"num_splits {num_splits} must be in [1, blocks={num_blocks}]")

  impl = _attention_tpu if lowering == "tpu" else _attention_triton
  len_BK = jnp.clip(kv_len_BK.astype(jnp.int32), 0, cap)
  o_BKRD = impl(q_BKGTD.reshape(b, kh, g * chunk, d), k_BKCD, v_BKCD, len_BK, chunk=chunk,
                sm_scale=1.0 / math.sqrt(d) if sm_scale is None else sm_scale,
                block_size=block_size, num_splits=num_splits,
                interpret=backend_lib.resolve_interpret(interpret, lowering))
  return o_BKRD.reshape(b, kh, g, chunk, d).astype(q_BKGTD.dtype)


def ragged_decode_attention(q_BKGD: jax.Array, k_BKCD: jax.Array, v_BKCD: jax.Array,
                            lengths_BK: jax.Array, *, sm_scale: float | None = None,
                            block_size: int | None = None, num_splits: int | None = None,
                            backend: str = "auto", interpret: bool | None = None,
                            lowering: str | None = None) -> jax.Array:
  """One decode step: q [B, K, G, D] against each head's first lengths[b, k] cache entries."""
  o = ragged_chunk_attention(q_BKGD[:, :, :, None], k_BKCD, v_BKCD, lengths_BK, sm_scale=sm_scale,
                             block_size=block_size, num_splits=num_splits, backend=backend,
                             interpret=interpret, lowering=lowering)
  return o[:, :, :, 0]
