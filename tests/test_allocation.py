"""Allocation across heads (ADAKV_SPEC 2 and 3.5): the worked example, and the greedy rule as properties."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adakv_jax.press.allocation import allocate

NEG_INF = -math.inf
TIE_VALUES = (NEG_INF, 0.0, 0.25, 0.5, 1.0, 2.0)  # few values: many ties, some never-keep entries
SHAPES = ((1, 3, 5), (2, 4, 8), (2, 1, 6))  # few shapes keep compiles down; -inf entries vary the rest

# Spec section 2: three heads, six tokens each.
EXAMPLE = np.array(
  [
    [0.32, 0.01, 0.18, 0.08, 0.22, 0.19],
    [0.89, 0.01, 0.05, 0.02, 0.01, 0.02],
    [0.68, 0.01, 0.08, 0.04, 0.09, 0.10],
  ],
  np.float32,
)


@functools.partial(jax.jit, static_argnames=("mode", "alpha"))
def _allocate(scores, total, floor, mode, alpha=0.0):
  return allocate(scores, total, floor, mode, alpha=alpha)


def _run(scores_HN, total, floor, mode="adaptive", alpha=0.0):
  keep, budgets = _allocate(
    jnp.asarray(scores_HN, jnp.float32)[None], jnp.array([total]), jnp.array([floor]), mode=mode, alpha=alpha
  )
  return np.asarray(keep[0]), np.asarray(budgets[0])


def greedy_reference(scores, total, floor, cap):
  """The rule in plain Python: reserve each head's top floor by (score desc, pos asc), then take the rest
  in (score desc, pos asc, head asc) order, skipping heads at cap, until the total is reached."""
  h_n, n = len(scores), len(scores[0])
  keep = [[False] * n for _ in range(h_n)]
  count = [0] * h_n
  for h in range(h_n):
    own = sorted((j for j in range(n) if scores[h][j] > NEG_INF), key=lambda j: (-scores[h][j], j))
    for j in own[: min(floor, cap)]:
      keep[h][j] = True
      count[h] += 1
  remaining = total - sum(count)
  rest = sorted(
    ((h, j) for h in range(h_n) for j in range(n) if scores[h][j] > NEG_INF and not keep[h][j]),
    key=lambda hj: (-scores[hj[0]][hj[1]], hj[1], hj[0]),
  )
  for h, j in rest:
    if remaining <= 0:
      break
    if count[h] < cap:
      keep[h][j] = True
      count[h] += 1
      remaining -= 1
  return np.array(keep, bool)


def test_worked_example_uniform_keeps_2_26():
  keep, budgets = _run(EXAMPLE, total=6, floor=0, mode="uniform")
  np.testing.assert_array_equal(budgets, [2, 2, 2])
  assert EXAMPLE[keep].sum() == pytest.approx(2.26, abs=1e-5)


@pytest.mark.parametrize("floor", [0, 1])  # alpha=0.2 of B'=2 floors to 0; a floor of 1 changes nothing here
def test_worked_example_adaptive_keeps_2_48_with_budgets_4_1_1(floor):
  keep, budgets = _run(EXAMPLE, total=6, floor=floor, mode="adaptive")
  np.testing.assert_array_equal(budgets, [4, 1, 1])
  assert EXAMPLE[keep].sum() == pytest.approx(2.48, abs=1e-5)
  np.testing.assert_array_equal(keep[0], [True, False, True, False, True, True])


def test_no_cap_a_sharp_head_may_take_nearly_the_whole_layer():
  """Only the floor limits adaptivity: one head that owns the mass takes all but the others' floors."""
  scores = np.full((3, 10), 0.01, np.float32)
  scores[0] = np.linspace(1.0, 0.5, 10)
  _, budgets = _run(scores, total=12, floor=1, mode="adaptive")
  np.testing.assert_array_equal(budgets, [10, 1, 1])  # 2.5x the mean of 4, capped only by its prefix


def test_adaptive_never_keeps_less_mass_than_uniform_on_the_example():
  for bp in range(1, 7):
    uni, _ = _run(EXAMPLE, total=3 * bp, floor=0, mode="uniform")
    ada, _ = _run(EXAMPLE, total=3 * bp, floor=0, mode="adaptive")
    assert EXAMPLE[ada].sum() >= EXAMPLE[uni].sum() - 1e-6


@st.composite
def allocation_problems(draw):
  b, h, n = draw(st.sampled_from(SHAPES))
  scores = np.array(
    draw(st.lists(st.sampled_from(TIE_VALUES), min_size=b * h * n, max_size=b * h * n)), np.float32
  ).reshape(b, h, n)
  floors = [draw(st.integers(0, n)) for _ in range(b)]
  totals = [draw(st.integers(h * f, h * n)) for f in floors]
  return scores, np.array(totals), np.array(floors)


@settings(max_examples=50, deadline=None)
@given(allocation_problems())
def test_adaptive_matches_greedy_reference_and_respects_floor_and_total(problem):
  scores, totals, floors = problem
  cap = scores.shape[-1]  # no per-head cap: a head may take up to all its valid entries
  keep, budgets = _allocate(jnp.asarray(scores), jnp.asarray(totals), jnp.asarray(floors), mode="adaptive")
  keep, budgets = np.asarray(keep), np.asarray(budgets)
  again, _ = _allocate(jnp.asarray(scores), jnp.asarray(totals), jnp.asarray(floors), mode="adaptive")
  np.testing.assert_array_equal(keep, np.asarray(again))  # deterministic
  for b in range(scores.shape[0]):
    want = greedy_reference(scores[b].tolist(), int(totals[b]), int(floors[b]), cap)
    np.testing.assert_array_equal(keep[b], want)
    valid_h = (scores[b] > NEG_INF).sum(-1)
    np.testing.assert_array_equal(budgets[b], keep[b].sum(-1))
    assert budgets[b].sum() == min(totals[b], np.minimum(valid_h, cap).sum())  # exact total
    assert np.all(budgets[b] >= np.minimum(floors[b], valid_h))  # floor, where the head has the entries
    assert np.all(budgets[b] <= cap)
    assert not np.any(keep[b] & (scores[b] == NEG_INF))  # -inf is never kept


@settings(max_examples=30, deadline=None)
@given(allocation_problems(), st.integers(0, 8))
def test_alpha_one_equals_uniform_equals_per_head_top_k(problem, bp):
  scores, _, _ = problem
  invalid = scores[:, :1] == NEG_INF  # as in a layer: all heads of a sequence share the invalid positions
  scores = np.where(invalid, NEG_INF, np.where(scores == NEG_INF, 0.0, scores))
  b, h, n = scores.shape
  bp = min(bp, n)
  totals = np.full((b,), h * bp)
  ada, _ = _allocate(jnp.asarray(scores), jnp.asarray(totals), jnp.asarray(totals // h), mode="adaptive")
  uni, _ = _allocate(jnp.asarray(scores), jnp.asarray(totals), jnp.zeros((b,), jnp.int32), mode="uniform")
  np.testing.assert_array_equal(np.asarray(ada), np.asarray(uni))
  for bi in range(b):
    for hi in range(h):
      want = greedy_reference([scores[bi, hi].tolist()], bp, bp, n)[0]  # one head: its own top bp
      np.testing.assert_array_equal(np.asarray(uni)[bi, hi], want)


def test_mix_mode_blends_adaptive_budgets_towards_the_average():
  # Floor-free adaptive budgets are 4/1/1 (B' = 2); alpha = 0.5 gives round(3, 1.5, 1.5) = 3/2/2.
  keep, budgets = _run(EXAMPLE, total=6, floor=0, mode="mix", alpha=0.5)
  np.testing.assert_array_equal(budgets, [3, 2, 2])  # total 7: the authors' rule may drift
  np.testing.assert_array_equal(keep[0], [True, False, False, False, True, True])  # each head's own top b_h
  np.testing.assert_array_equal(keep[1], [True, False, True, False, False, False])
  _, budgets = _run(EXAMPLE, total=6, floor=0, mode="mix", alpha=1.0)
  np.testing.assert_array_equal(budgets, [2, 2, 2])
  _, budgets = _run(EXAMPLE, total=6, floor=0, mode="mix", alpha=0.0)
  np.testing.assert_array_equal(budgets, [4, 1, 1])


def test_total_zero_keeps_nothing_and_unknown_mode_is_rejected():
  keep, budgets = _run(EXAMPLE, total=0, floor=0)
  assert not keep.any() and not budgets.any()
  with pytest.raises(ValueError, match="unknown allocation mode 'greedy'"):
    allocate(jnp.asarray(EXAMPLE)[None], jnp.array([6]), jnp.array([0]), "greedy")
