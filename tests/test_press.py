"""Press: validation, presets, budgets/schedules/capacity, and compress_layer end to end (ADAKV_SPEC 3).

Most runs are eager: every configuration shares the same few shapes, so after the first run the
primitives are compiled and each further configuration costs milliseconds. Jittability is checked with
jax.eval_shape (trace only) for every combination and one real jit of a scan over layers.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from adakv_jax.config import ModelConfig
from adakv_jax.press import PRESETS, Press, compress_layer, make_press, schedules
from adakv_jax.press.press import SCORER_NAMES

CFG = ModelConfig(architecture="llama", vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=4,
                  num_heads=4, num_kv_heads=2, head_dim=8)
W = 4
BUDGET = 12  # B' = 8 per head
N = 40
LENS = (40, 23, 3)  # long, medium, shorter than the window
EXTRA = 3


def _make_inputs(lens=LENS, n=N, seed=0):
  """Model-like layer inputs for right-padded prompts: padding holds garbage that must never matter."""
  r = np.random.default_rng(seed)
  b = len(lens)
  q = r.normal(size=(b, CFG.num_heads, n, CFG.head_dim)).astype(np.float32)
  k = r.normal(size=(b, CFG.num_kv_heads, n, CFG.head_dim)).astype(np.float32)
  v = r.normal(size=(b, CFG.num_kv_heads, n, CFG.head_dim)).astype(np.float32)
  colsum = r.random((b, CFG.num_heads, n)).astype(np.float32)
  return q, k, v, colsum


def _window(q_BHnD, lens):
  """Each sequence's last W queries; a prompt shorter than W is left-padded with garbage (here: 7.0)."""
  out = np.full(q_BHnD.shape[:2] + (W, q_BHnD.shape[-1]), 7.0, np.float32)
  for b, n in enumerate(lens):
    take = min(n, W)
    out[b, :, W - take:] = q_BHnD[b, :, n - take:n]
  return out


def _compress(press, inputs, lens, layer=0, capacity=None, fn=compress_layer):
  q, k, v, colsum = inputs
  lens_arr = jnp.asarray(lens, jnp.int32)
  budgets = press.layer_budgets(CFG.num_layers, lens_arr)
  capacity = capacity or press.capacity(CFG.num_layers, N, EXTRA)
  out = fn(press, CFG, q_win_BHWD=jnp.asarray(_window(q, lens)), k_BKLD=jnp.asarray(k), v_BKLD=jnp.asarray(v),
           prompt_len_B=lens_arr, budget_B=budgets[layer], colsum_BHL=jnp.asarray(colsum),
           rng=jax.random.PRNGKey(0), capacity=capacity, return_positions=True)
  k_c, v_c, lengths, info = jax.tree.map(np.asarray, out)
  return k_c, v_c, lengths, info, np.asarray(budgets[layer])


INPUTS = _make_inputs()

COMBOS = [Press(scorer=s, allocation=a, schedule=sch, budget=BUDGET, window=W)
          for s, a, sch in itertools.product(SCORER_NAMES, ("uniform", "adaptive"), ("flat", "pyramid"))]
VARIANTS = [
    Press(budget=BUDGET, window=W, gqa="query"),
    Press(budget=BUDGET, window=W, gqa_reduce="max", pool="avg", kernel=3),
    Press(budget=BUDGET, window=W, floor_mode="mix"),
    Press(budget=BUDGET, window=W, schedule="pyramid", floor_alpha=0.0, head_cap_factor=1.0),
    Press(budget=None, compression_ratio=0.5, window=W),
]


def _label(p):
  return f"{p.scorer}-{p.allocation}-{p.schedule}-{p.gqa}-{p.floor_mode}-{p.pool}{p.kernel}-r{p.compression_ratio}"


# ---- validation and presets ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(floor_alpha=1.5), r"floor_alpha must lie in \[0, 1\]"),
    (dict(floor_alpha=-0.1), r"floor_alpha must lie in \[0, 1\]"),
    (dict(scorer="tova"), "unknown scorer 'tova'; valid: snapkv, h2o, streamingllm, knorm, random"),
    (dict(allocation="greedy"), "unknown allocation 'greedy'"),
    (dict(schedule="cosine"), "unknown schedule 'cosine'"),
    (dict(pool="min"), "unknown pool 'min'"),
    (dict(gqa="group"), "unknown gqa 'group'"),
    (dict(gqa_reduce="sum"), "unknown gqa_reduce 'sum'"),
    (dict(floor_mode="clip"), "unknown floor_mode 'clip'"),
    (dict(window=0), "window must be a positive integer"),
    (dict(budget=16, window=32), "budget smaller than the window: budget 16 < window 32"),
    (dict(budget=None, compression_ratio=1.0), r"compression_ratio must lie in \[0, 1\)"),
    (dict(budget=None, compression_ratio=-0.2), r"compression_ratio must lie in \[0, 1\)"),
    (dict(compression_ratio=0.5), "exactly one of budget and compression_ratio"),
    (dict(budget=None), "exactly one of budget and compression_ratio"),
    (dict(head_cap_factor=0.1, floor_alpha=0.5), "per-head cap below the floor"),
    (dict(head_cap_factor=0.5), "head_cap_factor must be >= 1"),
    (dict(kernel=4), "odd integer >= 1"),
    (dict(kernel=0), "odd integer >= 1"),
    (dict(pyramid_beta=0), "pyramid_beta must be an integer >= 1"),
])
def test_invalid_configurations_raise_clear_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Press(**kwargs)


def test_presets_compose_scorer_allocation_schedule():
  assert make_press("full") is None
  assert make_press("snapkv") == Press(allocation="uniform")
  assert make_press("ada-snapkv") == Press()
  assert make_press("pyramidkv") == Press(allocation="uniform", schedule="pyramid")
  assert make_press("ada-pyramidkv") == Press(schedule="pyramid")
  assert make_press("h2o") == Press(scorer="h2o", allocation="uniform", kernel=1)
  assert make_press("ada-h2o") == Press(scorer="h2o", kernel=1)
  for name in ("streamingllm", "knorm", "random"):
    p = make_press(name)
    assert (p.scorer, p.allocation, p.kernel) == (name, "uniform", 1)
  assert make_press("ada-snapkv", budget=256).budget == 256
  p = make_press("snapkv", compression_ratio=0.5)  # a ratio override switches off the default budget
  assert (p.budget, p.compression_ratio) == (None, 0.5)
  assert hash(make_press("ada-snapkv")) == hash(Press())  # static jit argument
  with pytest.raises(ValueError, match="unknown press 'ada-foo'; valid: full, snapkv, ada-snapkv"):
    make_press("ada-foo")


def test_cache_heads_and_colsum_need():
  assert Press().cache_heads(CFG) == 2 and Press(gqa="query").cache_heads(CFG) == 4
  assert make_press("h2o").needs_colsum and make_press("ada-h2o").needs_colsum
  assert not make_press("ada-snapkv").needs_colsum


# ---- budgets, schedules, capacity ----------------------------------------------------------------


def test_flat_and_pyramid_layer_budgets_follow_the_spec():
  lens = jnp.array([5000, 3000])
  flat = np.asarray(Press(budget=128).layer_budgets(32, lens))
  assert flat.shape == (32, 2) and np.all(flat == 128)
  pyr = np.asarray(Press(budget=128, schedule="pyramid").layer_budgets(32, lens)) - 32  # B' = 96
  assert pyr[0, 0] == 2 * 96 - 96 // 20 == 188  # max = 2B' - min
  assert pyr[-1, 0] == 96 // 20 == 4  # min = B' / beta
  assert np.all(np.diff(pyr[:, 0]) <= 0)  # larger budgets in lower layers
  np.testing.assert_array_equal(pyr.sum(0), [32 * 96, 32 * 96])  # exact total


_pyramid = jax.jit(schedules.pyramid, static_argnums=(1, 2))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 600), min_size=3, max_size=3), st.sampled_from([1, 2, 3, 7, 32]),
       st.sampled_from([1, 3, 20]))
def test_pyramid_sums_exactly_and_is_a_nonincreasing_line(bps, num_layers, beta):
  sel = np.asarray(_pyramid(jnp.asarray(bps, jnp.int32), num_layers, beta))
  assert sel.shape == (num_layers, len(bps))
  np.testing.assert_array_equal(sel.sum(0), np.array(bps) * num_layers)
  assert np.all(np.diff(sel, axis=0) <= 0) and np.all(sel >= 0)
  for j, bp in enumerate(bps):
    assert sel[0, j] == schedules.max_selectable("pyramid", bp, num_layers, beta)
    line = np.linspace(2 * bp - bp // beta, bp // beta, num_layers) if num_layers > 1 else np.array([bp])
    assert np.all(np.abs(sel[:, j] - line) < 1.0 + 1e-9)  # integer rounding of the real line only


def test_pyramid_moves_budget_a_short_prefix_cannot_use_to_upper_layers():
  press = Press(budget=128, window=32, schedule="pyramid")  # B' = 96: unclipped max is 188
  got = np.asarray(press.layer_budgets(5, jnp.array([5000, 182, 150, 128, 60]))) - 32
  np.testing.assert_array_equal(got[:, 0], [188, 142, 96, 50, 4])
  np.testing.assert_array_equal(got[:, 1], [150, 123, 96, 69, 42])  # max = prefix 150, min = 2B' - 150
  np.testing.assert_array_equal(got[:, 2], [118, 107, 96, 85, 74])
  np.testing.assert_array_equal(got[:, 3], [96] * 5)  # len <= B: flat, nothing to evict anywhere
  np.testing.assert_array_equal(got[:, 4], [96] * 5)
  np.testing.assert_array_equal(got.sum(0), [5 * 96] * 5)


def test_ratio_mode_budgets_come_from_each_sequence_length():
  press = Press(budget=None, compression_ratio=0.3, window=W)
  lens = jnp.array([100, 10, 5])
  got = np.asarray(jax.jit(press.layer_budgets, static_argnums=0)(3, lens))
  # floor(len * 0.7) exactly (10 * float32(0.7) would floor to 6); never below the window.
  np.testing.assert_array_equal(got, [[70, 7, W]] * 3)
  pyr = np.asarray(Press(budget=None, compression_ratio=0.5, window=W, schedule="pyramid")
                   .layer_budgets(5, jnp.array([400, 100])))
  np.testing.assert_array_equal(pyr.sum(0) - 5 * W, [5 * (200 - W), 5 * (50 - W)])


def test_capacity_holds_cap_plus_window_plus_extra():
  assert make_press("snapkv", budget=BUDGET, window=W).capacity(4, 100, 5) == 8 + W + 5
  assert make_press("ada-snapkv", budget=BUDGET, window=W).capacity(4, 100, 5) == 16 + W + 5
  assert make_press("ada-snapkv", budget=BUDGET, window=W, head_cap_factor=1.5).capacity(4, 100, 5) == 12 + W + 5
  # one capacity serves every layer: max(the bottom layer's B' = 2*8, factor * mean B'), not factor * 16
  assert make_press("ada-pyramidkv", budget=BUDGET, window=W).capacity(4, 100, 5) == 16 + W + 5
  assert make_press("ada-pyramidkv", budget=BUDGET, window=W, head_cap_factor=3.0).capacity(4, 100, 5) == 24 + W + 5
  assert make_press("ada-snapkv", budget=BUDGET, window=W).capacity(4, 10, 5) == 10 + 5  # <= prompt + extra
  assert make_press("snapkv", compression_ratio=0.5, window=W).capacity(4, 100, 0) == 50


def test_check_prompt_notes_uncompressed_prompts_and_rejects_empty_ones():
  press = make_press("ada-snapkv")  # budget 128, window 32
  assert press.check_prompt([500]) == []
  notes = press.check_prompt([50, 20, 500])
  assert len(notes) == 2
  assert "prompt of 50 tokens <= budget 128: nothing to evict" in notes[0]
  assert "20 tokens <= window 32" in notes[1]
  notes = make_press("snapkv", compression_ratio=0.9).check_prompt([100])
  assert "would keep 10 of 100 tokens, fewer than the window 32" in notes[0]
  with pytest.raises(ValueError, match="not a positive integer"):
    press.check_prompt([10, 0])


# ---- compress_layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("press", COMBOS + VARIANTS, ids=_label)
def test_compress_layer_keeps_window_and_exact_layer_totals(press):
  hp = press.cache_heads(CFG)
  cap = press.head_cap(CFG.num_layers, N)
  for layer in (0, CFG.num_layers - 1):
    k_c, v_c, lengths, info, budget_B = _compress(press, INPUTS, LENS, layer=layer)
    pos = info["positions"]
    assert pos.shape == (3, hp, press.capacity(CFG.num_layers, N, EXTRA))
    np.testing.assert_array_equal(info["budgets"], lengths)
    for b, n in enumerate(LENS):
      prefix, bp = max(n - W, 0), budget_B[b] - W
      for h in range(hp):
        live = pos[b, h, :lengths[b, h]]
        assert np.all(pos[b, h, lengths[b, h]:] == -1)
        assert np.all(np.diff(live) > 0) and live.min() >= 0 and live.max() < n  # ascending, no padding
        assert set(range(prefix, n)) <= set(live.tolist())  # the window is always kept
        assert lengths[b, h] <= cap + W
        if press.allocation == "adaptive" and press.floor_mode == "reserve":
          assert lengths[b, h] >= min(bp * press.floor_alpha // 1, prefix) + min(n, W)
        src = (h * CFG.num_kv_heads) // hp
        np.testing.assert_array_equal(k_c[b, h, :lengths[b, h]], INPUTS[1][b, src, live])
        np.testing.assert_array_equal(v_c[b, h, :lengths[b, h]], INPUTS[2][b, src, live])
        assert not k_c[b, h, lengths[b, h]:].any()
      if press.floor_mode == "reserve":  # exact: H' * B' selected plus the window, or everything
        assert lengths[b].sum() == hp * (min(bp, prefix) + min(n, W))
      assert 0.0 < info["retained_mass"][b] <= 1.0 + 1e-6
    assert info["retained_mass"][2] == pytest.approx(1.0, abs=1e-6)  # shorter than the window: all kept
  traced = _compress(press, INPUTS, LENS, fn=_eval_shape)  # and it traces with abstract inputs
  assert traced[0].shape == k_c.shape and traced[3]["positions"].shape == pos.shape


def _eval_shape(press, cfg, *, capacity, return_positions, **arrays):
  shapes = jax.eval_shape(functools.partial(compress_layer, press, cfg, capacity=capacity,
                                            return_positions=return_positions), **arrays)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "full"])
def test_every_preset_constructs_runs_and_traces(name):
  press = make_press(name, budget=BUDGET, window=W)
  k_c, _, lengths, info, _ = _compress(press, INPUTS, LENS)
  cap = press.capacity(CFG.num_layers, N, EXTRA)
  assert k_c.shape == (3, 2, cap, CFG.head_dim) and lengths.shape == (3, 2)
  assert np.all(lengths[0] <= cap) and info["retained_mass"].shape == (3,)
  q, k, v, colsum = INPUTS
  lens = jnp.asarray(LENS, jnp.int32)
  traced = jax.eval_shape(  # abstract (traced) inputs, as inside the model's jit
      functools.partial(compress_layer, press, CFG, capacity=cap, return_positions=True),
      q_win_BHWD=jnp.asarray(_window(q, LENS)), k_BKLD=jnp.asarray(k), v_BKLD=jnp.asarray(v),
      prompt_len_B=lens, budget_B=press.layer_budgets(CFG.num_layers, lens)[0],
      colsum_BHL=jnp.asarray(colsum), rng=jax.random.PRNGKey(0))
  assert traced[0].shape == k_c.shape and traced[3]["positions"].shape == (3, 2, cap)


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "ada-pyramidkv"])
def test_budget_at_least_the_prompt_keeps_everything(name):
  press = make_press(name, budget=N, window=W)
  for layer in (0, CFG.num_layers - 1):
    k_c, _, lengths, info, _ = _compress(press, INPUTS, LENS, layer=layer)
    for b, n in enumerate(LENS):
      np.testing.assert_array_equal(lengths[b], [n, n])
      for h in range(2):
        np.testing.assert_array_equal(info["positions"][b, h, :n], np.arange(n))
        np.testing.assert_array_equal(k_c[b, h, :n], INPUTS[1][b, h, :n])
    np.testing.assert_allclose(info["retained_mass"], 1.0, atol=1e-6)


@pytest.mark.parametrize("name", ["ada-snapkv", "pyramidkv", "ada-h2o"])
def test_each_sequence_of_a_padded_batch_compresses_as_if_alone(name):
  # pyramidkv with avg pooling; ada-h2o reads colsum, whose padding columns hold garbage.
  extra = dict(pool="avg", kernel=3) if name == "pyramidkv" else {}
  press = make_press(name, budget=BUDGET, window=W, **extra)
  capacity = press.capacity(CFG.num_layers, N, EXTRA)
  batch = _compress(press, INPUTS, LENS, layer=1, capacity=capacity)
  for b, n in enumerate(LENS):
    alone_inputs = tuple(x[b:b + 1, :, :n] for x in INPUTS)  # no padding at all
    alone = _compress(press, alone_inputs, [n], layer=1, capacity=capacity, fn=_jit_compress)
    np.testing.assert_array_equal(batch[3]["positions"][b], alone[3]["positions"][0])
    np.testing.assert_array_equal(batch[2][b], alone[2][0])
    np.testing.assert_array_equal(batch[0][b], alone[0][0])
    np.testing.assert_array_equal(batch[1][b], alone[1][0])
    np.testing.assert_allclose(batch[3]["retained_mass"][b], alone[3]["retained_mass"][0], rtol=1e-5)


# One compile per new shape beats eager there (eager compiles every primitive for every new shape).
_jit_compress = jax.jit(compress_layer, static_argnums=(0, 1), static_argnames=("capacity", "return_positions"))


def test_adaptive_with_alpha_one_equals_uniform():
  for sched in ("flat", "pyramid"):
    uni = Press(allocation="uniform", schedule=sched, budget=BUDGET, window=W)
    ada = Press(allocation="adaptive", schedule=sched, budget=BUDGET, window=W, floor_alpha=1.0)
    for layer in (0, 2):
      want = _compress(uni, INPUTS, LENS, layer)[3]["positions"]
      got = _compress(ada, INPUTS, LENS, layer)[3]["positions"]  # larger capacity: the cap factor
      np.testing.assert_array_equal(got[:, :, :want.shape[-1]], want)
      assert np.all(got[:, :, want.shape[-1]:] == -1)


def test_adaptive_retains_at_least_the_attention_mass_of_uniform():
  # Without pooling and with mean GQA reduction the SnapKV score IS each entry's share of the retained
  # mass, so the global top-k (alpha = 0, no binding cap) maximises it: the spec's section 2 claim.
  common = dict(budget=BUDGET, window=W, kernel=1, floor_alpha=0.0, head_cap_factor=8.0)
  uni = _compress(Press(allocation="uniform", **common), INPUTS, LENS)[3]["retained_mass"]
  ada = _compress(Press(allocation="adaptive", **common), INPUTS, LENS)[3]["retained_mass"]
  assert np.all(ada >= uni - 1e-6)
  assert ada[0] > uni[0]  # and here strictly more


def test_compress_layer_runs_inside_a_jitted_scan_over_layers():
  """As the model calls it: per-layer budgets and inputs arrive as traced slices of stacked arrays."""
  press = make_press("ada-pyramidkv", budget=BUDGET, window=W)
  q, k, v, colsum = INPUTS
  lens = jnp.asarray(LENS, jnp.int32)
  capacity = press.capacity(CFG.num_layers, N, EXTRA)
  stack = lambda x: jnp.stack([jnp.asarray(x) * (1 + 0.1 * l) for l in range(CFG.num_layers)])
  xs = (stack(_window(q, LENS)), stack(k), stack(v), press.layer_budgets(CFG.num_layers, lens))

  @jax.jit
  def prefill_tail(xs, lens):
    def body(carry, x):
      q_l, k_l, v_l, budget_l = x
      k_c, _, lengths, info = compress_layer(press, CFG, q_win_BHWD=q_l, k_BKLD=k_l, v_BKLD=v_l,
                                             prompt_len_B=lens, budget_B=budget_l, capacity=capacity)
      return carry, (lengths, info["retained_mass"])
    return jax.lax.scan(body, 0, xs)[1]

  lengths_LBH, mass_LB = prefill_tail(xs, lens)
  for l in range(CFG.num_layers):
    _, _, want, info = compress_layer(press, CFG, q_win_BHWD=xs[0][l], k_BKLD=xs[1][l], v_BKLD=xs[2][l],
                                      prompt_len_B=lens, budget_B=xs[3][l], capacity=capacity)
    np.testing.assert_array_equal(np.asarray(lengths_LBH[l]), np.asarray(want))
    np.testing.assert_allclose(np.asarray(mass_LB[l]), np.asarray(info["retained_mass"]), rtol=1e-5)


def test_compress_layer_rejects_a_window_of_the_wrong_size():
  q, k, v, _ = INPUTS
  with pytest.raises(ValueError, match="q_win_BHWD has shape"):
    compress_layer(Press(budget=BUDGET, window=W + 1), CFG, q_win_BHWD=jnp.asarray(_window(q, LENS)),
                   k_BKLD=jnp.asarray(k), v_BKLD=jnp.asarray(v), prompt_len_B=jnp.asarray(LENS),
                   budget_B=jnp.asarray([BUDGET] * 3), capacity=20)
