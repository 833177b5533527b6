"""Cross-head top-k: the radix-select kernel must equal the lax.top_k reference bit for bit.

Shapes and caps are fixed per compiled function (static cap), so hypothesis varies only the data and
each example reuses one compile. Scores come from a tiny set of values to force heavy ties. Kernel
calls pass interpret=None: native on an accelerator (the platform's own lowering unless a test names
one), interpreted on CPU (tests/kernels/gating.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.cross_head_topk import cross_head_topk, cross_head_topk_reference
from pallas_kernels.cross_head_topk import greedy_oracle as _greedy_oracle
from tests.kernels.gating import lowering_param

B, H, N = 4, 3, 20
TIE_VALUES = np.array([0.5, 0.25, 0.0, -0.0, -1.0, -np.inf], np.float32)


@functools.cache
def _kernel(cap, lowering):
  return jax.jit(lambda s, t, f: cross_head_topk(s, t, f, cap, backend="pallas", lowering=lowering))


@functools.cache
def _reference(cap):
  return jax.jit(lambda s, t, f: cross_head_topk_reference(s, t, f, cap))


def _check(scores, total, floor, cap, lowering=None):
  s, t, f = jnp.asarray(scores, jnp.float32), jnp.asarray(total), jnp.asarray(floor)
  keep, budgets = _kernel(cap, lowering)(s, t, f)
  keep_ref, budgets_ref = _reference(cap)(s, t, f)
  np.testing.assert_array_equal(keep, keep_ref)
  np.testing.assert_array_equal(budgets, budgets_ref)
  assert keep.dtype == jnp.bool_ and budgets.dtype == jnp.int32
  return np.asarray(keep), np.asarray(budgets)


def test_spec_worked_example():
  """ADAKV_SPEC section 2: global top-6 gives budgets 4 / 1 / 1; floor = cap = 2 is uniform."""
  s = np.array(
    [
      [0.32, 0.01, 0.18, 0.08, 0.22, 0.19],
      [0.89, 0.01, 0.05, 0.02, 0.01, 0.02],
      [0.68, 0.01, 0.08, 0.04, 0.09, 0.10],
    ],
    np.float32,
  )[None]
  keep, budgets = cross_head_topk(s, 6, 0, 6, backend="pallas")
  np.testing.assert_array_equal(budgets, [[4, 1, 1]])
  np.testing.assert_allclose(np.sum(np.where(keep, s, 0)), 2.48, atol=1e-6)
  _, budgets = cross_head_topk(s, 6, 2, 2, backend="pallas")
  np.testing.assert_array_equal(budgets, [[2, 2, 2]])


@pytest.mark.parametrize("cap", [1, 7, N, N + 5])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_kernel_equals_reference_and_greedy(cap, data):
  idx = data.draw(st.lists(st.integers(0, len(TIE_VALUES) - 1), min_size=B * H * N, max_size=B * H * N))
  scores = TIE_VALUES[np.array(idx)].reshape(B, H, N)
  total = np.array(data.draw(st.lists(st.integers(0, H * N + 3), min_size=B, max_size=B)))
  floor = np.array(data.draw(st.lists(st.integers(0, min(cap, N) + 2), min_size=B, max_size=B)))
  keep, budgets = _check(scores, total, floor, cap)
  for b in range(B):
    np.testing.assert_array_equal(keep[b], _greedy_oracle(scores[b], total[b], floor[b], cap))
  assert not keep[scores == -np.inf].any()
  assert (budgets <= min(cap, N)).all()


@pytest.mark.parametrize("lowering", [lowering_param("tpu"), lowering_param("triton")])
def test_seeded_ties_floors_caps(lowering):
  """Many sequences per call: each row of the batch a different (total, floor) regime."""
  rng = np.random.default_rng(0)
  cap, b = 9, 8
  scores = rng.choice(np.array([1.0, 2.0, -np.inf], np.float32), size=(b, H, N), p=[0.45, 0.45, 0.1])
  scores[0] = 1.0  # a single value everywhere: pure position/head tie-break
  scores[1, 1] = -np.inf  # an empty head: its floor cannot be met
  total = np.array([10, 30, 0, H * cap, H * cap + 4, 5, 17, 3])
  floor = np.array([0, 4, 3, cap, 2, 9, 100, 1])  # floor > total, floor == cap, floor > cap
  keep, budgets = _check(scores, total, floor, cap, lowering)
  keepable = np.minimum((scores > -np.inf).sum(-1), cap).sum(-1)
  reserved = np.minimum((scores > -np.inf).sum(-1), np.minimum(floor, cap)[:, None]).sum(-1)
  np.testing.assert_array_equal(budgets.sum(-1), np.maximum(np.minimum(total, keepable), reserved))
  # Row 0, all ties, no floor: the 10 winners are the first positions, heads in order within one.
  np.testing.assert_array_equal(np.argwhere(keep[0].T)[:, 0], [0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
  assert budgets[1, 1] == 0


def test_nan_and_signed_zero_rank_like_lax_top_k():
  """+NaN ranks above everything (taking a rank slot) but is never kept; -0.0 ranks below +0.0."""
  rng = np.random.default_rng(1)
  scores = rng.choice(np.array([0.0, -0.0, np.nan, -np.nan, 1.0, -np.inf], np.float32), size=(B, H, N))
  keep, _ = _check(scores, np.array([5, 20, 40, 60]), np.array([0, 2, 5, 1]), 7)
  assert not keep[np.isnan(scores)].any()


def test_bf16_scores_are_upcast():
  s = jnp.asarray(np.random.default_rng(2).standard_normal((B, H, N)), jnp.bfloat16)
  keep, budgets = jax.jit(lambda s: cross_head_topk(s, 12, 1, 8, backend="pallas"))(s)  # scalars broadcast
  keep_ref, budgets_ref = _reference(8)(s, jnp.full(B, 12), jnp.ones(B, jnp.int32))
  np.testing.assert_array_equal(keep, keep_ref)
  np.testing.assert_array_equal(budgets, budgets_ref)


def test_bad_arguments_fail_clearly():
  with pytest.raises(ValueError, match="unknown kernel backend"):
    cross_head_topk(jnp.zeros((1, 2, 4)), 2, 0, 2, backend="tpu")
  with pytest.raises(ValueError, match=r"\[B, H, N\]"):
    cross_head_topk(jnp.zeros((2, 4)), 2, 0, 2, backend="pallas")


@pytest.mark.parametrize(
  "platform,lowering,marker", [("tpu", "tpu", "tpu_custom_call"), ("cuda", "triton", "xla.gpu.triton")]
)
def test_kernel_lowers_for_device(platform, lowering, marker):
  """Runs the real Mosaic / Triton lowering to MLIR (no device needed); compiling it is not checked."""
  run = lambda s, t: cross_head_topk(s, t, t, 64, backend="pallas", interpret=False, lowering=lowering)
  lowered = jax.jit(run).trace(jnp.zeros((2, 8, 1000)), jnp.zeros(2, jnp.int32))
  assert marker in lowered.lower(lowering_platforms=(platform,)).as_text()
