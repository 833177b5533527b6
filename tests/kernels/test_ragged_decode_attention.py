"""Ragged decode / chunk attention: Pallas kernels (interpret mode) against the jnp references.

Each kernel call packs the length cases {0, 1, block, block + 1, capacity, random} into the heads of
one batch (B = 2, K = 4), so a parametrised case covers every length at once; cache padding is NaN, so
any read of a dead entry that reached the output would show.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backend
from pallas_kernels.ragged_decode_attention import (kv_block_index, ragged_chunk_attention,
                                                    ragged_chunk_attention_reference,
                                                    ragged_decode_attention,
                                                    ragged_decode_attention_reference)

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
decode_ref = jax.jit(ragged_decode_attention_reference, static_argnames="sm_scale")
chunk_ref = jax.jit(ragged_chunk_attention_reference, static_argnames="sm_scale")


def _lengths(cap, block, rng, batch=2, heads=4, low=0):
  cases = [0, 1, block, block + 1, cap, block - 1]
  cases += list(rng.integers(1, cap + 1, size=batch * heads - len(cases)))
  lens = np.maximum(np.array(cases[:batch * heads]), low)
  return jnp.asarray(rng.permutation(lens).reshape(batch, heads), jnp.int32)


def _inputs(seed, b, k, g, c, d, dtype, lens_BK, t=None):
  """Random q/k/v (numpy-made: no per-op compiles) with NaN written into every dead cache entry."""
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, k, g, d) if t is None else (b, k, g, t, d), np.float32)
  dead = np.arange(c)[None, None, :, None] >= np.asarray(lens_BK)[:, :, None, None]
  kc, vc = (np.where(dead, np.nan, rng.standard_normal((b, k, c, d), np.float32)) for _ in "kv")
  return tuple(jnp.asarray(x, dtype) for x in (q, kc, vc))


def _naive_decode(q, k, v, lens):
  """float64 numpy, one head at a time: the semantics the reference must have."""
  q, k, v, lens = (np.asarray(x, np.float64) for x in (q, k, v, lens))
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for h in range(q.shape[1]):
      n = int(lens[b, h])
      if n == 0:
        continue
      s = q[b, h] @ k[b, h, :n].T / math.sqrt(q.shape[-1])
      p = np.exp(s - s.max(-1, keepdims=True))
      out[b, h] = (p / p.sum(-1, keepdims=True)) @ v[b, h, :n]
  return out


def test_reference_matches_naive_softmax():
  rng = np.random.default_rng(0)
  lens = _lengths(48, 16, rng)
  q, k, v = _inputs(0, 2, 4, 3, 48, 64, jnp.float32, lens)
  out = decode_ref(q, k, v, lens)
  assert not np.isnan(np.asarray(out)).any()
  np.testing.assert_allclose(out, _naive_decode(q, k, v, lens), atol=1e-5)
  empty = np.asarray(lens) == 0
  assert empty.any() and (np.asarray(out)[empty] == 0).all()


def test_chunk_reference_is_causal_decode_per_token():
  """Query t of a T-token chunk equals a decode step that sees kv_len - T + 1 + t entries."""
  rng = np.random.default_rng(1)
  t = 3
  lens = _lengths(40, 8, rng, low=t)
  q, k, v = _inputs(1, 2, 4, 2, 40, 64, jnp.float32, lens, t=t)
  out = chunk_ref(q, k, v, lens)
  for i in range(t):
    want = decode_ref(q[:, :, :, i], k, v, lens - t + 1 + i)
    np.testing.assert_allclose(out[:, :, :, i], want, atol=1e-6)


# (group, head_dim, dtype, lowering, capacity, block_size, num_splits). Not a full cross-product: each
# row moves a few knobs so that groups 1..8, both head dims, both dtypes, both lowerings, several splits
# and a capacity that is not a multiple of the block all appear.
DECODE_CASES = [
    (1, 64, jnp.float32, "tpu", 64, 16, 1),
    (2, 128, jnp.float32, "tpu", 128, 32, 2),
    (4, 64, jnp.bfloat16, "tpu", 64, 16, 3),
    (8, 128, jnp.bfloat16, "tpu", 96, 32, 1),
    (3, 64, jnp.float32, "tpu", 100, 16, 2),  # ragged last block: 100 = 6 * 16 + 4
    (1, 128, jnp.float32, "triton", 64, 16, 2),
    (8, 64, jnp.bfloat16, "triton", 100, 32, 1),  # ragged last block read as the final full block
    (4, 128, jnp.float32, "triton", 128, 32, 4),
]


@pytest.mark.parametrize("g,d,dtype,lowering,cap,block,splits", DECODE_CASES)
def test_decode_kernel_matches_reference(g, d, dtype, lowering, cap, block, splits):
  rng = np.random.default_rng(g * 1000 + d + cap)
  lens = _lengths(cap, block, rng)
  q, k, v = _inputs(g + d, 2, 4, g, cap, d, dtype, lens)
  run = jax.jit(lambda *a: ragged_decode_attention(*a, block_size=block, num_splits=splits,
                                                   backend="pallas", interpret=True,
                                                   lowering=lowering))
  out = run(q, k, v, lens)
  assert out.shape == q.shape and out.dtype == q.dtype
  want = decode_ref(q, k, v, lens)
  assert not np.isnan(np.asarray(out, np.float32)).any()
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                             atol=TOL[dtype], rtol=TOL[dtype])
  assert (np.asarray(out, np.float32)[np.asarray(lens) == 0] == 0).all()


@pytest.mark.parametrize("lowering", ["tpu", "triton"])
def test_chunk_kernel_matches_reference(lowering):
  t, cap, block = 4, 64, 16
  rng = np.random.default_rng(7)
  lens = _lengths(cap, block, rng, low=t)  # the chunk's own T entries are already in the cache
  q, k, v = _inputs(7, 2, 4, 2, cap, 64, jnp.float32, lens, t=t)
  out = jax.jit(lambda *a: ragged_chunk_attention(*a, block_size=block, num_splits=2,
                                                  backend="pallas", interpret=True,
                                                  lowering=lowering))(q, k, v, lens)
  want = chunk_ref(q, k, v, lens)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


def test_sm_scale_and_default_block_size():
  rng = np.random.default_rng(3)
  lens = _lengths(64, 16, rng)
  q, k, v = _inputs(3, 2, 4, 2, 64, 64, jnp.float32, lens)
  out = ragged_decode_attention(q, k, v, lens, sm_scale=0.3, backend="pallas", interpret=True)
  want = decode_ref(q, k, v, lens, sm_scale=0.3)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(want - decode_ref(q, k, v, lens))).max() > 1e-3


@pytest.mark.parametrize("cap,block,splits", [(64, 16, 1), (100, 16, 3), (256, 32, 2), (96, 32, 3)])
def test_dead_blocks_are_never_fetched(cap, block, splits):
  """Walks the TPU grid in order: the K/V block index changes only onto live blocks, each once."""
  num_blocks = -(-cap // block)
  bps = -(-num_blocks // splits)
  for length in sorted({0, 1, block - 1, block, block + 1, cap // 2, cap - 1, cap}):
    names = [int(kv_block_index(length, s, j, bps, block)) for s in range(splits) for j in range(bps)]
    fetched = [n for i, n in enumerate(names) if i == 0 or n != names[i - 1]]
    live = -(-length // block)
    assert fetched == (list(range(live)) if live else [0]), (length, names)


def test_auto_backend_is_the_reference_on_cpu():
  assert backend.resolve_backend("auto") == ("xla" if jax.default_backend() == "cpu" else "pallas")
  rng = np.random.default_rng(4)
  lens = _lengths(32, 16, rng)
  q, k, v = _inputs(4, 2, 4, 2, 32, 64, jnp.float32, lens)
  np.testing.assert_array_equal(ragged_decode_attention(q, k, v, lens, backend="xla"),
                                ragged_decode_attention_reference(q, k, v, lens))


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="cuda"), "unknown kernel backend"),
    (dict(backend="pallas", lowering="mosaic"), "unknown lowering"),
    (dict(backend="pallas", block_size=65), "block_size"),
    (dict(backend="pallas", block_size=24, lowering="triton"), "power-of-two"),
    (dict(backend="pallas", block_size=16, num_splits=5), "num_splits"),
])
def test_bad_arguments_fail_clearly(kwargs, match):
  q = jnp.zeros((1, 1, 1, 64))
  k = jnp.zeros((1, 1, 64, 64))
  with pytest.raises(ValueError, match=match):
    ragged_decode_attention(q, k, k, jnp.zeros((1, 1), jnp.int32), interpret=True, **kwargs)


def test_shape_mismatch_fails_clearly():
  q = jnp.zeros((1, 2, 1, 64))
  with pytest.raises(ValueError, match="lengths"):
    ragged_decode_attention(q, jnp.zeros((1, 2, 8, 64)), jnp.zeros((1, 2, 8, 64)),
                            jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="do not match"):
    ragged_decode_attention(q, jnp.zeros((1, 2, 8, 32)), jnp.zeros((1, 2, 8, 32)),
                            jnp.zeros((1, 2), jnp.int32))


@pytest.mark.parametrize("platform,lowering,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                      ("cuda", "triton", "xla.gpu.triton")])
@pytest.mark.parametrize("dtype,chunk", [(jnp.float32, 1), (jnp.bfloat16, 3)])
def test_kernel_lowers_for_device(platform, lowering, marker, dtype, chunk):
  """Runs the real Mosaic / Triton lowering to MLIR (no device needed): catches unsupported ops and
  shapes. Compiling that MLIR to machine code needs the device and is not checked here."""
  b, k, g, c, d = 2, 4, 4, 1024, 128
  q = jnp.zeros((b, k, g, chunk, d), dtype)
  kc = jnp.zeros((b, k, c, d), dtype)
  run = lambda *a: ragged_chunk_attention(*a, backend="pallas", interpret=False, lowering=lowering)
  lowered = jax.jit(run).trace(q, kc, kc, jnp.zeros((b, k), jnp.int32))
  assert marker in lowered.lower(lowering_platforms=(platform,)).as_text()


def test_triton_refuses_shapes_it_cannot_tile_and_auto_would_route_them_away():
  from pallas_kernels.ragged_decode_attention import _triton_fits, ragged_chunk_attention

  assert _triton_fits(16, 64) and _triton_fits(4096, 128)
  assert not _triton_fits(11, 64) and not _triton_fits(64, 80) and not _triton_fits(64, 96)
  q = jnp.zeros((1, 1, 1, 1, 80), jnp.float32)
  kv = jnp.zeros((1, 1, 32, 80), jnp.float32)
  with pytest.raises(ValueError, match="power-of-two head_dim"):
    ragged_chunk_attention(q, kv, kv, jnp.ones((1, 1), jnp.int32), backend="pallas", lowering="triton",
                           interpret=True)
