"""Causal prefill attention over key tiles against a float64 dense reference, and
the contract (padded queries output zeros and add nothing to colsum; nothing [L, L] is built)."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import attention
from adakv_jax.attention import causal_prefill_attention

HEAD_DIM = 8


def qkv(lengths, length, kv_heads, group, seed=0, dtype=jnp.float32):
  rs = np.random.RandomState(seed)
  b, h = len(lengths), kv_heads * group
  q = rs.normal(size=(b, h, length, HEAD_DIM)) * 2.0  # sharp enough that the softmax is not flat
  k = rs.normal(size=(b, kv_heads, length, HEAD_DIM))
  v = rs.normal(size=(b, kv_heads, length, HEAD_DIM))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (jnp.asarray(lengths, jnp.int32),)


def dense_reference(q, k, v, lengths):
  """float64, one query at a time over its visible keys: (o [B, H, L, D], colsum [B, H, L])."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, h, l, d = q.shape
  group = h // k.shape[1]
  o, colsum = np.zeros_like(q), np.zeros((b, h, l))
  for bi, n in enumerate(lengths):
    for hi in range(h):
      kk, vv = k[bi, hi // group], v[bi, hi // group]
      for i in range(n):
        s = kk[: i + 1] @ q[bi, hi, i] / np.sqrt(d)
        p = np.exp(s - s.max())
        p /= p.sum()
        o[bi, hi, i] = p @ vv[: i + 1]
        colsum[bi, hi, : i + 1] += p
  return o, colsum


@functools.partial(jax.jit, static_argnames=("chunk", "with_colsum"))
def attend(q, k, v, len_B, *, chunk, with_colsum):
  return causal_prefill_attention(q, k, v, len_B, chunk=chunk, with_colsum=with_colsum)


def valid(lengths, length):
  return (np.arange(length)[None, :] < np.asarray(lengths)[:, None])[:, None, :]  # [B, 1, L]


# (lengths, padded length, chunk, kv heads, group): lengths 1, chunk, chunk + 1, full and padded
CASES = [
  ([1, 8, 9, 32], 32, 8, 2, 1),
  ([32, 17, 5], 32, 16, 3, 3),
  ([24, 1, 13], 24, 24, 1, 2),
  ([48, 33, 2], 48, 16, 2, 3),
  ([700, 256, 257, 1], 768, 768, 1, 2),  # chunk > TILE: 256-wide tiles, 3 of them
]


def case_id(case):
  lengths, length, chunk, kv_heads, group = case
  return f"L{length}-chunk{chunk}-kv{kv_heads}-group{group}-lengths{'_'.join(map(str, lengths))}"


IDS = [case_id(c) for c in CASES]


@pytest.mark.parametrize("lengths,length,chunk,kv_heads,group", CASES, ids=IDS)
def test_matches_a_dense_float64_reference(lengths, length, chunk, kv_heads, group):
  q, k, v, len_B = qkv(lengths, length, kv_heads, group)
  o_ref, colsum_ref = dense_reference(q, k, v, lengths)
  o, colsum = attend(q, k, v, len_B, chunk=chunk, with_colsum=True)
  o_plain, none = attend(q, k, v, len_B, chunk=chunk, with_colsum=False)
  assert none is None and o.dtype == jnp.float32 and colsum.dtype == jnp.float32
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(o_plain, o_ref, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(colsum, colsum_ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("lengths,length,chunk,kv_heads,group", CASES[:4], ids=IDS[:4])
def test_padded_queries_output_zeros_and_colsum_counts_real_queries(lengths, length, chunk, kv_heads, group):
  q, k, v, len_B = qkv(lengths, length, kv_heads, group, seed=1)
  o, colsum = attend(q, k, v, len_B, chunk=chunk, with_colsum=True)
  pad = ~valid(lengths, length)
  assert np.all(np.asarray(o)[np.broadcast_to(pad[..., None], o.shape)] == 0.0)
  assert np.all(np.asarray(colsum)[np.broadcast_to(pad, colsum.shape)] == 0.0)  # keys no real query sees
  # every real query spreads probability 1 over its keys
  np.testing.assert_allclose(
    np.asarray(colsum).sum(-1), np.broadcast_to(np.asarray(lengths)[:, None], colsum.shape[:2]), rtol=1e-5
  )


@pytest.mark.parametrize("lengths,length,chunk,kv_heads,group", [CASES[1], CASES[3]], ids=[IDS[1], IDS[3]])
def test_bfloat16_tracks_the_reference(lengths, length, chunk, kv_heads, group):
  q, k, v, len_B = qkv(lengths, length, kv_heads, group, seed=3, dtype=jnp.bfloat16)
  o_ref, colsum_ref = dense_reference(q, k, v, lengths)
  o, colsum = attend(q, k, v, len_B, chunk=chunk, with_colsum=True)
  assert o.dtype == jnp.bfloat16 and colsum.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(o, np.float64), o_ref, atol=3e-2)
  np.testing.assert_allclose(colsum, colsum_ref, atol=3e-2)


def test_a_query_never_sees_later_keys():
  q, k, v, len_B = qkv([64], 64, 1, 2, seed=4)
  o, colsum = attend(q, k, v, len_B, chunk=16, with_colsum=True)
  k2, v2 = k.at[:, :, 40:].set(7.0), v.at[:, :, 40:].set(-7.0)
  o2, colsum2 = attend(q, k2, v2, len_B, chunk=16, with_colsum=True)
  np.testing.assert_array_equal(o2[:, :, :40], o[:, :, :40])
  assert not np.allclose(o2[:, :, 40:], o[:, :, 40:], atol=1e-2)
  assert not np.allclose(colsum2[:, :, :40], colsum[:, :, :40], atol=1e-3)  # later queries moved


def test_keys_far_below_a_querys_max_weigh_nothing_float32_can_see():
  """Scores hundreds of units apart (as a real prompt's sink and its far keys are) pass through the
  exponent floor: the output and colsum still match float64."""
  q, k, v, len_B = qkv([40], 48, 1, 2, seed=5)
  k = k.at[:, :, 3].set(100.0 * q[0, 0, 20] / jnp.linalg.norm(q[0, 0, 20]))  # dominant for query 20 on
  k = k.at[:, :, 7].set(-k[:, :, 3])  # buried hundreds below the max for the same queries
  gap = float(q[0, 0, 20] @ (k[0, 0, 3] - k[0, 0, 7])) / np.sqrt(HEAD_DIM)
  assert gap > 2 * -attention.EXP_FLOOR  # key 7's exponent for query 20 is far past the floor
  o, colsum = attend(q, k, v, len_B, chunk=16, with_colsum=True)
  o_ref, colsum_ref = dense_reference(q, k, v, [40])
  assert np.isfinite(np.asarray(o)).all()
  np.testing.assert_allclose(o, o_ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(colsum, colsum_ref, rtol=2e-5, atol=2e-5)


def test_no_intermediate_is_as_large_as_the_score_matrix():
  q, k, v, len_B = qkv([1024], 1024, 1, 2)
  jaxpr = jax.make_jaxpr(functools.partial(causal_prefill_attention, chunk=512, with_colsum=True))(
    q, k, v, len_B
  )
  b, h, l, _ = q.shape
  largest = max(_sizes(jaxpr.jaxpr))
  assert largest <= b * h * attention.TILE * attention.TILE < b * h * l * l // 4, largest


def _sizes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield int(np.prod(var.aval.shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _sizes(sub)


def test_compiled_once_for_any_prompt_lengths():
  traces = []

  @jax.jit
  def f(q, k, v, len_B):
    traces.append(1)
    return causal_prefill_attention(q, k, v, len_B, chunk=16, with_colsum=True)

  q, k, v, _ = qkv([32, 32], 32, 1, 2)
  outs = [f(q, k, v, jnp.asarray(n, jnp.int32)) for n in ([32, 1], [3, 17], [16, 16])]
  assert len(traces) == 1
  assert not np.allclose(outs[0][1], outs[1][1])


def test_bad_shapes_are_named():
  q, k, v, len_B = qkv([32], 32, 2, 2)
  with pytest.raises(ValueError, match="multiple of chunk"):
    causal_prefill_attention(q, k, v, len_B, chunk=12, with_colsum=False)
  with pytest.raises(ValueError, match="grouped"):
    causal_prefill_attention(q[:, :3], k, v, len_B, chunk=16, with_colsum=False)
  with pytest.raises(ValueError, match="len_B"):
    causal_prefill_attention(q, k, v, len_B[:, None], chunk=16, with_colsum=False)
  with pytest.raises(ValueError, match="disagree"):
    causal_prefill_attention(q, k[:, :, :16], v[:, :, :16], len_B, chunk=16, with_colsum=False)
