"""Paged per-head attention: every implementation equals the reference, which equals a float64 loop.

Inputs come from tests/kernels/paged_cases.py: all length cases packed into the heads of one call,
page tables that permute the pool with out-of-range garbage past the live pages, NaN in every dead
entry and unowned page. Kernel calls run under jit with interpret=None: natively on their own
accelerator, in the interpreter on CPU (tests/kernels/gating.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backend
from pallas_kernels import paged_attention as pa
from pallas_kernels.paged_attention import (
  check_page_size,
  paged_attention,
  paged_attention_reference,
  paged_attention_xla,
  paged_decode_attention,
)
from tests.kernels.gating import lowering_param
from tests.kernels.paged_cases import naive_attention, paged_case

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
reference = jax.jit(paged_attention_reference, static_argnames="sm_scale")


def _close(out, want, dtype):
  out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
  assert not np.isnan(out).any()
  np.testing.assert_allclose(out, want, atol=TOL[dtype], rtol=TOL[dtype])


def _empty_rows(lens, t):
  """[B, K, T] rows that see nothing (len - T + 1 + t <= 0)."""
  return np.asarray(lens)[:, :, None] - t + 1 + np.arange(t) <= 0


@pytest.mark.parametrize("t,page,dtype", [(1, 16, jnp.float32), (3, 8, jnp.float32), (2, 32, jnp.bfloat16)])
def test_reference_matches_float64_loop(t, page, dtype):
  case = paged_case(t + page, 2, 4, 3, t, 64, page, 5, dtype)
  out = reference(*case)
  assert out.shape == case[0].shape and out.dtype == dtype
  # The loop sees the same (rounded) inputs, so only the output rounding differs for bf16.
  _close(out, naive_attention(*case), jnp.float32 if dtype == jnp.float32 else dtype)
  scaled = reference(*case, sm_scale=0.3)
  _close(scaled, naive_attention(*case, sm_scale=0.3), jnp.float32 if dtype == jnp.float32 else dtype)
  assert np.abs(np.asarray(scaled, np.float32) - np.asarray(out, np.float32)).max() > 0.1
  empty = _empty_rows(case[4], t)
  assert empty.any() and (np.asarray(out, np.float32).transpose(0, 1, 3, 2, 4)[empty] == 0).all()


def test_chunk_row_t_is_a_decode_step_over_its_prefix():
  t = 4
  q, kp, vp, table, lens = paged_case(5, 2, 4, 2, t, 64, 16, 4)
  out = reference(q, kp, vp, table, lens)
  for i in range(t):
    # Entries past a decode step's own length are dead to it: the same pages, a shorter length.
    want = reference(q[:, :, :, i : i + 1], kp, vp, table, jnp.maximum(lens - t + 1 + i, 0))
    np.testing.assert_allclose(out[:, :, :, i : i + 1], want, atol=1e-6)


XLA_FORMULATIONS = {"all_rows": pa._all_rows_attention, "gathered": pa._gathered_attention}


@pytest.mark.parametrize("formulation", list(XLA_FORMULATIONS))
@pytest.mark.parametrize(
  "g,t,d,page,dtype",
  [
    (1, 1, 64, 8, jnp.float32),
    (8, 1, 128, 16, jnp.float32),
    (4, 3, 64, 32, jnp.bfloat16),
    (2, 5, 128, 16, jnp.bfloat16),
  ],
)
def test_xla_formulations_match_reference(formulation, g, t, d, page, dtype):
  """Both formulations paged_attention_xla chooses between, on the same inputs."""
  case = paged_case(g * 10 + t, 2, 4, g, t, d, page, 5, dtype)
  fn = XLA_FORMULATIONS[formulation]
  if formulation == "gathered":
    fn = functools.partial(
      fn, compute_dtype=dtype, precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    )
  if formulation == "all_rows":
    fn = functools.partial(fn, finite_dead=False)
  out = jax.jit(functools.partial(fn, sm_scale=1 / math.sqrt(d)))(*case)
  assert out.shape == case[0].shape and out.dtype == dtype
  _close(out, reference(*case), dtype)


@pytest.mark.parametrize(
  "b,k,g,t,d,page,m,dtype",
  [
    (1, 6, 3, 1, 64, 16, 4, jnp.float32),
    (2, 3, 1, 1, 128, 8, 3, jnp.float32),
    (1, 6, 8, 3, 64, 32, 2, jnp.bfloat16),
    (2, 4, 2, 5, 128, 16, 3, jnp.bfloat16),
  ],
)
@pytest.mark.parametrize("finite_dead", [False, True])
def test_a_pool_in_table_order_is_attended_as_a_dense_cache(b, k, g, t, d, page, m, dtype, finite_dead):
  """A full cache's layout (head h owns pages h * M .. h * M + M - 1): paged_attention_xla takes the
  dense formulation, which equals the reference on lengths 0, 1, P, P + 1 and M * P."""
  q, kp, vp, table, lens = paged_case(b * 100 + g * 10 + t, b, k, g, t, d, page, m, dtype, contiguous=True)
  assert set(np.asarray(lens).ravel()) >= {0, 1, page, page + 1, m * page}
  if finite_dead:  # what the library's cache holds in dead entries
    kp, vp = jnp.nan_to_num(kp, nan=3.0), jnp.nan_to_num(vp, nan=-5.0)
  assert bool(pa._is_contiguous(table, lens, kp.shape[0], page))
  dense = functools.partial(pa._contiguous_attention, sm_scale=1 / math.sqrt(d), finite_dead=finite_dead)
  want = reference(q, kp, vp, table, lens)
  _close(jax.jit(dense)(q, kp, vp, table, lens), want, dtype)
  xla = jax.jit(functools.partial(paged_attention_xla, finite_dead=finite_dead))
  _close(xla(q, kp, vp, table, lens), want, dtype)


def test_only_a_pool_in_table_order_counts_as_dense():
  b, k, m, page = 1, 6, 3, 8
  q, kp, vp, table, lens = paged_case(7, b, k, 2, 1, 64, page, m, contiguous=True)
  is_dense = lambda table, lens, n=kp.shape[0]: pa._is_contiguous(table, lens, n, page)
  assert bool(is_dense(table, lens))
  assert is_dense(table, lens, n=kp.shape[0] + 1) is None  # a pool of another size: statically not
  swapped = table.at[0, 0, 0].set(table[0, 1, 0]).at[0, 1, 0].set(table[0, 0, 0])
  heads_with_pages = np.asarray(lens[0]) > 0
  assert bool(is_dense(swapped, lens)) != (heads_with_pages[0] or heads_with_pages[1])
  permuted = paged_case(7, b, k, 2, 1, 64, page, m, num_pages=b * k * m)
  assert not bool(is_dense(permuted[3], permuted[4]))
  # slots past a head's live pages are never looked at: garbage there keeps the pool dense
  assert bool(is_dense(table, jnp.zeros_like(lens)))
  # and a permuted pool still gets the reference's output through the general path
  _close(jax.jit(paged_attention_xla)(*permuted), reference(*permuted), jnp.float32)


def test_finite_dead_entries_let_the_all_rows_path_skip_zeroing_v():
  """With finite garbage in every dead entry (what the library's cache holds) finite_dead=True gives the
  reference's output; with NaN garbage it would not (that is why it is opt-in)."""
  q, kp, vp, table, lens = paged_case(3, 2, 4, 2, 1, 64, 8, 4)
  finite = jnp.nan_to_num(kp, nan=3.0), jnp.nan_to_num(vp, nan=-5.0)
  fast = jax.jit(functools.partial(paged_attention_xla, finite_dead=True))
  np.testing.assert_allclose(fast(q, *finite, table, lens), reference(q, *finite, table, lens), atol=1e-5)
  assert np.isnan(np.asarray(fast(q, kp, vp, table, lens))).any()


def _recorded(calls, name, fn, *args, **kwargs):
  calls.append(name)
  return fn(*args, **kwargs)


def test_xla_path_switches_formulation_above_the_documented_threshold(monkeypatch):
  calls = []
  for name in ("_all_rows_attention", "_gathered_attention"):
    monkeypatch.setattr(pa, name, functools.partial(_recorded, calls, name, getattr(pa, name)))
  limit = pa.XLA_ALL_ROWS_MAX_QUERY_ROWS
  assert limit % 8 == 0
  for g in (limit // 8, limit // 8 + 1):  # B * K = 8 heads, T = 1
    out = jax.jit(lambda *a: paged_attention_xla(*a))(*paged_case(0, 2, 4, g, 1, 64, 8, 2))
    assert not np.isnan(np.asarray(out)).any()
  assert calls == ["_all_rows_attention", "_gathered_attention"]


# (lowering, group, head_dim, dtype, T, page, M, pages_per_block, num_splits, sm_scale). Not a
# cross-product: each row moves a few knobs so that groups from 1 to 8, both head dims, both dtypes,
# T = 1 and T > 1, page sizes 8/16/32, one page per block and several, a partial last block (M not a
# multiple of the block), one split and several, and the defaults appear for both lowerings. T = 1
# rows go through paged_decode_attention.
KERNEL_CASES = [
  lowering_param("tpu", 1, 64, jnp.float32, 1, 8, 6, 4, 2, None),
  lowering_param("tpu", 4, 128, jnp.bfloat16, 1, 16, 4, 2, 1, 0.3),
  lowering_param("tpu", 8, 64, jnp.bfloat16, 3, 32, 3, 1, 2, None),
  lowering_param("tpu", 3, 128, jnp.float32, 4, 16, 9, None, None, None),
  lowering_param("triton", 1, 128, jnp.float32, 1, 8, 6, 2, 2, None),
  lowering_param("triton", 8, 64, jnp.bfloat16, 2, 16, 5, 1, 1, None),
  lowering_param("triton", 4, 64, jnp.float32, 3, 32, 3, None, None, None),
  lowering_param("triton", 6, 128, jnp.bfloat16, 1, 8, 12, 4, 3, 0.3),
]


@pytest.mark.parametrize("lowering,g,d,dtype,t,page,m,ppb,splits,scale", KERNEL_CASES)
def test_kernel_matches_reference(lowering, g, d, dtype, t, page, m, ppb, splits, scale):
  q, kp, vp, table, lens = paged_case(g * 100 + d + page, 2, 4, g, t, d, page, m, dtype)
  kw = dict(sm_scale=scale, backend="pallas", lowering=lowering, pages_per_block=ppb, num_splits=splits)
  if t == 1:
    out = jax.jit(functools.partial(paged_decode_attention, **kw))(q[:, :, :, 0], kp, vp, table, lens)
    out = out[:, :, :, None]
  else:
    out = jax.jit(functools.partial(paged_attention, **kw))(q, kp, vp, table, lens)
  assert out.shape == q.shape and out.dtype == dtype
  _close(out, reference(q, kp, vp, table, lens, sm_scale=scale), dtype)
  empty = _empty_rows(lens, t)
  assert empty.any() and (np.asarray(out, np.float32).transpose(0, 1, 3, 2, 4)[empty] == 0).all()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the TPU interpreter's bounds checks")
def test_interpreter_would_catch_a_dereferenced_dead_id():
  """The garbage ids of the other tests prove something only if reading one fails: a live slot that
  names a page past the pool makes the interpreted DMA raise."""
  q, kp, vp, table, lens = paged_case(4, 1, 2, 1, 1, 64, 8, 2, lens_BK=np.array([[3, 9]]))
  bad = table.at[0, 1, 1].set(kp.shape[0])
  run = jax.jit(functools.partial(paged_attention, backend="pallas", lowering="tpu", pages_per_block=2))
  try:
    with pytest.raises(Exception, match="Out-of-bounds read"):
      jax.block_until_ready(run(q, kp, vp, bad, lens))
  finally:
    pltpu.reset_tpu_interpret_mode_state()


@pytest.mark.parametrize("page,ppb,splits", [(8, 4, 2), (16, 1, 3), (16, 3, 1), (32, 2, 4)])
def test_splits_cover_each_heads_live_blocks_once(page, ppb, splits):
  m = 12
  for length in range(0, m * page + 1, 5):
    ranges = [
      tuple(
        int(x) for x in pa.split_blocks(length, s, page_size=page, pages_per_block=ppb, num_splits=splits)
      )
      for s in range(splits)
    ]
    covered = [blk for first, end in ranges for blk in range(first, end)]
    pages = -(-length // page)
    assert covered == list(range(-(-pages // ppb))), (length, ranges)


def test_default_pages_per_block():
  assert pa.default_pages_per_block(16, 64, "tpu") == 8  # 128 entries
  assert pa.default_pages_per_block(8, 64, "tpu") == 16
  assert pa.default_pages_per_block(256, 64, "tpu") == 1
  assert pa.default_pages_per_block(16, 5, "tpu") == 5  # capped by M
  assert pa.default_pages_per_block(16, 64, "triton", itemsize=2) == 8
  assert pa.default_pages_per_block(16, 64, "triton", itemsize=4) == 4
  assert pa.default_pages_per_block(8, 6, "triton") == 4  # a power of two <= M


def test_auto_backend_takes_the_xla_path_on_cpu(monkeypatch):
  assert backend.resolve_backend("auto") == ("xla" if jax.default_backend() == "cpu" else "pallas")
  calls = []
  monkeypatch.setattr(
    pa, "paged_attention_xla", functools.partial(_recorded, calls, "xla", pa.paged_attention_xla)
  )
  case = paged_case(6, 2, 4, 2, 1, 64, 16, 3)
  jax.eval_shape(paged_attention, *case)  # traces the dispatch, computes nothing
  assert calls == (["xla"] if jax.default_backend() == "cpu" else [])


@pytest.mark.parametrize("page", [1, 4, 12, 24, 512, 16.0, "16"])
def test_page_size_rule_rejects(page):
  with pytest.raises(ValueError, match="power of two in \\[8, 256\\]"):
    check_page_size(page)


@pytest.mark.parametrize("page", [8, 16, 32, 64, 128, 256])
def test_page_size_rule_accepts(page):
  check_page_size(page)


def _zeros_case(b=1, k=2, g=1, t=1, d=64, n=6, page=16, m=4, dtype=jnp.float32):
  return (
    jnp.zeros((b, k, g, t, d), dtype),
    jnp.zeros((n, page, d), dtype),
    jnp.zeros((n, page, d), dtype),
    jnp.zeros((b, k, m), jnp.int32),
    jnp.zeros((b, k), jnp.int32),
  )


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(backend="cuda"), "unknown kernel backend"),
    (dict(backend="pallas", lowering="mosaic"), "unknown lowering"),
    (dict(backend="pallas", pages_per_block=0), "pages_per_block"),
    (dict(backend="pallas", pages_per_block=5), "pages_per_block"),
    (dict(backend="pallas", pages_per_block=3, lowering="triton"), "power of two >= 16"),
    (dict(backend="pallas", num_splits=0), "num_splits"),
    (dict(backend="pallas", pages_per_block=2, num_splits=3), "num_splits"),
  ],
)
def test_bad_kernel_arguments_fail_clearly(kwargs, match):
  with pytest.raises(ValueError, match=match):
    paged_attention(*_zeros_case(), **kwargs)


def test_kernels_refuse_pages_and_head_dims_they_cannot_tile():
  with pytest.raises(ValueError, match="page size 12"):
    paged_attention(*_zeros_case(page=12), backend="pallas")
  with pytest.raises(ValueError, match="power-of-two head_dim"):
    paged_attention(*_zeros_case(d=80), backend="pallas", lowering="triton")
  with pytest.raises(ValueError, match="power of two >= 16"):
    paged_attention(*_zeros_case(page=8, m=1), backend="pallas", lowering="triton")
  assert not pa._pallas_fits("triton", 16, 4, 80) and not pa._pallas_fits("tpu", 12, 4, 64)
  assert pa._pallas_fits("tpu", 16, 4, 80) and pa._pallas_fits("triton", 8, 2, 64)
  # The XLA path takes any page size.
  case = paged_case(8, 1, 2, 2, 1, 64, 12, 3)
  out = jax.jit(functools.partial(paged_attention, backend="xla"))(*case)
  np.testing.assert_allclose(out, naive_attention(*case), atol=1e-5)


def test_shape_mismatches_fail_clearly():
  q, kp, vp, table, lens = _zeros_case()
  bad = {
    "must be \\[B, K, G, T, D\\]": (q[0], kp, vp, table, lens),
    "must both be \\[N, P, D\\]": (q, kp[..., :32], vp[..., :32], table, lens),
    "differ in dtype": (q, kp, vp.astype(jnp.bfloat16), table, lens),
    "page table .* must be \\[B, K, M\\]": (q, kp, vp, table[:, :1], lens),
    "lengths .* must be \\[B, K\\]": (q, kp, vp, table, lens[0]),
    "page table must be integer": (q, kp, vp, table.astype(jnp.float32), lens),
  }
  for match, args in bad.items():
    for fn in (paged_attention, paged_attention_xla, paged_attention_reference):
      with pytest.raises(ValueError, match=match):
        fn(*args)
  with pytest.raises(ValueError, match="must be \\[B, K, G, D\\]"):
    paged_decode_attention(q, kp, vp, table, lens)


@pytest.mark.parametrize(
  "platform,lowering,marker", [("tpu", "tpu", "tpu_custom_call"), ("cuda", "triton", "xla.gpu.triton")]
)
@pytest.mark.parametrize(
  "dtype,chunk,page", [(jnp.float32, 1, 16), (jnp.bfloat16, 3, 8), (jnp.bfloat16, 1, 32)]
)
def test_kernel_lowers_for_device(platform, lowering, marker, dtype, chunk, page):
  """Runs the real Mosaic / Triton lowering to MLIR (no device needed): catches unsupported ops and
  shapes. Compiling that MLIR to machine code needs the device and is not checked here."""
  b, k, g, d, m, n = 2, 4, 4, 128, 64, 600
  args = _zeros_case(b, k, g, chunk, d, n, page, m, dtype)
  run = functools.partial(paged_attention, backend="pallas", interpret=False, lowering=lowering)
  lowered = jax.jit(run).trace(*args)
  assert marker in lowered.lower(lowering_platforms=(platform,)).as_text()
