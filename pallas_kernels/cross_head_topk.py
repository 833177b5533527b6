"""Cross-head top-k selection: the Ada-KV allocation rule.

Rule (ADAKV_SPEC section 3, step 5, "reserve"): each head first reserves its own best `floor` entries;
the rest of the budget goes to the globally best remaining entries, skipping heads already at `cap`.
Order is (score descending, position ascending, head ascending), so the kept set is deterministic and
the total is exact. Entries scored -inf are never kept (padding, window, invalid positions).

A head's j-th best entry can only be taken while the head has fewer than `cap` entries, and the greedy
meets a head's entries in that head's own order, so "greedy with a cap" equals "global top-R over the
entries of per-head rank in [floor, cap)". That is what the reference computes, with lax.top_k (which
breaks ties by lower index).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import backend as backend_lib


def cross_head_topk_reference(
  scores_BHN: jax.Array, total_B: jax.Array, floor_B: jax.Array, cap: int
) -> tuple[jax.Array, jax.Array]:
  """scores [B, H, N] (float; -inf = never keep); total [B] int; floor [B] int; cap: static int.

  Returns (keep_BHN bool, budgets_BH int32) with budgets.sum(-1) == min(total, #keepable).
  """
  b, h, n = scores_BHN.shape
  cap = int(min(cap, n))
  s = scores_BHN.astype(jnp.float32)
  total_B = jnp.asarray(total_B, jnp.int32).reshape(b)
  floor_B = jnp.minimum(jnp.asarray(floor_B, jnp.int32).reshape(b), cap)
  valid = s > -jnp.inf

  # Per-head ranking (ties: lower position first).
  top_s, top_i = lax.top_k(s, cap)  # [B, H, cap]
  rank = jnp.arange(cap, dtype=jnp.int32)
  top_valid = top_s > -jnp.inf
  reserved_BHc = top_valid & (rank[None, None, :] < floor_B[:, None, None])
  eligible_BHc = top_valid & ~reserved_BHc

  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  reserved = jnp.zeros((b, h, n), bool).at[bi, hi, top_i].set(reserved_BHc)
  eligible = jnp.zeros((b, h, n), bool).at[bi, hi, top_i].set(eligible_BHc)

  # Global pass over [N, H] flattened so lax.top_k's index tie-break is (position, head).
  remaining_B = jnp.maximum(total_B - jnp.sum(reserved, axis=(1, 2), dtype=jnp.int32), 0)
  flat = jnp.where(eligible & valid, s, -jnp.inf).transpose(0, 2, 1).reshape(b, n * h)
  k_static = h * cap
  g_s, g_i = lax.top_k(flat, k_static)  # [B, H*cap]
  take = (jnp.arange(k_static)[None, :] < remaining_B[:, None]) & (g_s > -jnp.inf)
  won = jnp.zeros((b, n * h), bool).at[jnp.arange(b)[:, None], g_i].set(take)
  won = won.reshape(b, n, h).transpose(0, 2, 1)

  keep = reserved | won
  return keep, jnp.sum(keep, axis=-1, dtype=jnp.int32)


# ----------------------------------------------------------------------------------------------------
# Pallas kernel: radix (bit-threshold) select over an order-preserving integer image of the scores.
#
# Every "top-k with position tie-break" below is done with counts only, so it maps to any backend
# without a sort: (1) the k-th largest key is built bit by bit from the most significant bit, keeping a
# bit whenever at least k entries are >= the candidate (32 compare-and-count passes); (2) the entries
# tied at that key are cut at the need-th smallest tie-break order, found the same way over the bits of
# the order. Sums are exact int32 counts, so the kept total is exact.

_INT_MIN = -(2**31)


def _sortable_key(s: jax.Array) -> jax.Array:
  """float32 -> int32 whose signed order is the IEEE total order lax.top_k ranks by.

  +NaN > +inf > ... > +0 > -0 > ... > -inf > -NaN: non-negative floats keep their bits, negative ones
  flip all bits but the sign so that larger magnitudes become smaller integers.
  """
  bits = lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32)
  return jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))


_KEY_POS_INF = 0x7F800000  # bits of +inf
_KEY_NEG_INF = -0x7F800001  # bits of -inf (0xFF800000) ^ 0x7FFFFFFF, as a signed int32


def _kth_largest(key, mask, k, count):
  """Largest t with count(mask & key >= t) >= k (signed int32); INT_MIN if fewer than k entries."""

  def body(i, t_u):  # t_u: threshold in the unsigned (sign-biased) domain, built from the top bit
    cand_u = t_u | lax.shift_left(jnp.int32(1), 31 - i)
    c = count(mask & (key >= (cand_u ^ _INT_MIN)))
    return jnp.where(c >= k, cand_u, t_u)

  t_u = lax.fori_loop(0, 32, body, jnp.zeros_like(k))
  return t_u ^ _INT_MIN


def _top_k_mask(key, mask, k, order, order_bits, count):
  """The k best masked entries by (key descending, order ascending); all of them if fewer than k."""
  t = _kth_largest(key, mask, k, count)
  above = mask & (key > t)
  need = k - count(above)
  tie = mask & (key == t)

  def body(i, a):  # largest a with count(tie & order < a) < need: a is the need-th tie's order
    cand = a | lax.shift_left(jnp.int32(1), order_bits - 1 - i)
    return jnp.where(count(tie & (order < cand)) < need, cand, a)

  cut = lax.fori_loop(0, order_bits, body, jnp.zeros_like(k))
  return above | (tie & (order <= cut) & (need > 0))


def _select(key_HN, total, floor, cap):
  """The allocation rule on one sequence: int32 keys [H, N] -> keep mask [H, N] (bool)."""
  h, n = key_HN.shape
  pos_HN = lax.broadcasted_iota(jnp.int32, (h, n), 1)
  head_HN = lax.broadcasted_iota(jnp.int32, (h, n), 0)
  valid = (key_HN > _KEY_NEG_INF) & (key_HN <= _KEY_POS_INF)  # -inf and NaN are never kept
  every = jnp.ones((h, n), bool)
  per_head = lambda x: jnp.sum(x.astype(jnp.int32), axis=1, keepdims=True)  # [H, 1]
  overall = lambda x: jnp.sum(per_head(x), axis=0, keepdims=True)  # [1, 1]
  pos_bits = max(1, (n - 1).bit_length())
  ones_H1 = jnp.ones((h, 1), jnp.int32)
  # Per-head rank over all entries (as lax.top_k ranks them, invalid ones included).
  in_floor = _top_k_mask(key_HN, every, ones_H1 * floor, pos_HN, pos_bits, per_head)
  in_cap = _top_k_mask(key_HN, every, ones_H1 * cap, pos_HN, pos_bits, per_head)
  reserved = in_floor & valid
  eligible = in_cap & ~in_floor & valid
  remaining = jnp.maximum(total - overall(reserved), 0)
  order_HN = pos_HN * h + head_HN  # global tie-break: lower position, then lower head
  won = _top_k_mask(key_HN, eligible, remaining, order_HN, max(1, (n * h - 1).bit_length()), overall)
  return reserved | won


def _topk_kernel_tpu(total_ref, floor_ref, key_ref, keep_ref, *, cap):
  b = pl.program_id(0)
  keep = _select(key_ref[...], total_ref[b], jnp.minimum(floor_ref[b], cap), cap)
  keep_ref[...] = keep.astype(jnp.int32)


def _topk_kernel_triton(total_ref, floor_ref, key_ref, keep_ref, *, cap):
  keep = _select(key_ref[...], total_ref[()], jnp.minimum(floor_ref[()], cap), cap)
  keep_ref[...] = keep.astype(jnp.int32)


def _topk_tpu(key_BHN, total_B, floor_B, cap, interpret):
  b, h, n = key_BHN.shape
  sq = pl.squeezed
  spec = pl.BlockSpec((sq, h, n), lambda b_, *_: (b_, 0, 0))
  mat = backend_lib.varying_axes(key_BHN, total_B, floor_B)
  return pl.pallas_call(
    functools.partial(_topk_kernel_tpu, cap=cap),
    grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=(b,), in_specs=[spec], out_specs=spec),
    out_shape=jax.ShapeDtypeStruct((b, h, n), jnp.int32, manual_axis_type=mat),
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
    interpret=interpret,
    name="cross_head_topk_tpu",
  )(total_B, floor_B, key_BHN)


def _topk_triton(key_BHN, total_B, floor_B, cap, interpret):
  """Triton tiles must be powers of two: pad heads and positions with -inf keys (never kept, ranked
  last, and after every real entry on ties, so real ranks and tie orders do not change)."""
  b, h, n = key_BHN.shape
  hp, np_ = pl.next_power_of_2(h), pl.next_power_of_2(n)
  key_BHN = jnp.pad(key_BHN, ((0, 0), (0, hp - h), (0, np_ - n)), constant_values=_KEY_NEG_INF)
  sq = pl.squeezed
  spec = pl.BlockSpec((sq, hp, np_), lambda b_: (b_, 0, 0))
  scalar = pl.BlockSpec((sq,), lambda b_: (b_,))
  mat = backend_lib.varying_axes(key_BHN, total_B, floor_B)
  keep = pl.pallas_call(
    functools.partial(_topk_kernel_triton, cap=cap),
    grid=(b,),
    in_specs=[scalar, scalar, spec],
    out_specs=spec,
    out_shape=jax.ShapeDtypeStruct((b, hp, np_), jnp.int32, manual_axis_type=mat),
    compiler_params=pltriton.CompilerParams(num_warps=4),
    interpret=interpret,
    name="cross_head_topk_triton",
  )(total_B, floor_B, key_BHN)
  return keep[:, :h, :n]


def greedy_oracle(s_HN, total, floor, cap):
  """The allocation rule as the spec states it, in plain numpy: reserve each head's best `floor`, then
  take entries in (score desc, position, head) order while the total lasts, skipping full heads."""
  h, n = s_HN.shape
  cap = min(cap, n)
  floor = min(floor, cap)
  bits = s_HN.astype(np.float32).view(np.int32).astype(np.int64)
  key = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # IEEE total order, as lax.top_k: -0.0 < +0.0
  keep = np.zeros((h, n), bool)
  for i in range(h):
    order = sorted(range(n), key=lambda j: (-key[i, j], j))
    best = [j for j in order if s_HN[i, j] > -np.inf][: max(floor, 0)]
    keep[i, best] = True
  left = max(total - keep.sum(), 0)
  for j, i in sorted(
    ((j, i) for i in range(h) for j in range(n)), key=lambda ji: (-key[ji[1], ji[0]], ji[0], ji[1])
  ):
    if left == 0:
      break
    if not keep[i, j] and s_HN[i, j] > -np.inf and keep[i].sum() < cap:
      keep[i, j] = True
      left -= 1
  return keep


# Largest H * N (N rounded up to a power of two) that `auto` sends to the kernel: a TPU program holds
# the sequence in VMEM (a few int32 copies of [H, N] in ~16 MiB); the Triton program keeps it in
# registers. Explicit backend="pallas" is honoured regardless.
AUTO_ON_CHIP_LIMIT = {"tpu": 1 << 20, "triton": 1 << 14}


def _next_pow2(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def cross_head_topk(
  scores_BHN: jax.Array,
  total_B: jax.Array,
  floor_B: jax.Array,
  cap: int,
  *,
  backend: str = "auto",
  interpret: bool | None = None,
  lowering: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Dispatch: the same (keep_BHN bool, budgets_BH int32) as cross_head_topk_reference, bit for bit.

  backend: auto | xla | pallas. lowering: 'tpu' or 'triton' (default by platform). The kernel holds a
  whole sequence's [H, N] scores on chip (one program per sequence), which bounds N * H by VMEM / SRAM.
  """
  if scores_BHN.ndim != 3:
    raise ValueError(f"scores must be [B, H, N], got shape {scores_BHN.shape}")
  b, h, n = scores_BHN.shape
  # A scalar total / floor applies to every sequence (the reference itself wants [B]).
  total_B, floor_B = (jnp.broadcast_to(x, (b,)) if jnp.ndim(x) == 0 else x for x in (total_B, floor_B))
  lowering = backend_lib.resolve_lowering(lowering)
  too_big = h * _next_pow2(n) > AUTO_ON_CHIP_LIMIT[lowering]
  if backend_lib.resolve_backend(backend) == "xla" or (backend == "auto" and too_big):
    # auto: a sequence that does not fit on chip goes to the XLA reference rather than failing to compile
    return cross_head_topk_reference(scores_BHN, total_B, floor_B, cap)
  if n * h >= 2**31:
    raise ValueError(f"H * N = {h * n} does not fit the int32 tie-break order")
  cap = int(min(cap, n))
  total_B = jnp.asarray(total_B, jnp.int32).reshape(b)
  floor_B = jnp.asarray(floor_B, jnp.int32).reshape(b)
  impl = _topk_tpu if lowering == "tpu" else _topk_triton
  keep_BHN = (
    impl(_sortable_key(scores_BHN), total_B, floor_B, cap, backend_lib.resolve_interpret(interpret, lowering))
    > 0
  )
  return keep_BHN, jnp.sum(keep_BHN, axis=-1, dtype=jnp.int32)
