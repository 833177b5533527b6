"""Press: validation, presets, budgets and schedules, and the per-layer selection (ADAKV_SPEC 3, 8).

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
from hypothesis import given, settings
from hypothesis import strategies as st

from adakv_jax.press import PRESETS, Press, make_press, schedules, select
from adakv_jax.press.press import SCORER_NAMES
from adakv_jax.testing import tiny_config

CFG = tiny_config(
  vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=4, head_dim=8, max_position_embeddings=4096
)
W = 4
BUDGET = 12  # B' = 8 per head
N = 40
LENS = (40, 23, 3)  # long, medium, shorter than the window
P = 8  # page size of the page-granular cases


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
    out[b, :, W - take :] = q_BHnD[b, :, n - take : n]
  return out


def _select(press, inputs, lens, layer=0, fn=select, groups=None):
  """One layer's selection as the model runs it; returns numpy (keep_BHL, info, units_B)."""
  q, k, v, colsum = inputs
  lens_arr = jnp.asarray(lens, jnp.int32)
  units = press.layer_units(CFG.num_layers, lens_arr, P)
  keep, info = fn(
    press,
    jnp.asarray(_window(q, lens)),
    jnp.asarray(k),
    lens_arr,
    units[layer],
    page_size=P,
    colsum_BHL=jnp.asarray(colsum),
    rng=jax.random.PRNGKey(0),
    groups=groups,
  )
  return np.asarray(keep), jax.tree.map(np.asarray, info), np.asarray(units[layer])


INPUTS = _make_inputs()

COMBOS = [
  Press(scorer=s, allocation=a, schedule=sch, budget=BUDGET, window=W)
  for s, a, sch in itertools.product(SCORER_NAMES, ("uniform", "adaptive"), ("flat", "pyramid"))
]
VARIANTS = [
  Press(budget=BUDGET, window=W, gqa="query"),
  Press(budget=BUDGET, window=W, gqa_reduce="max", pool="avg", kernel=3),
  Press(budget=BUDGET, window=W, floor_mode="mix"),
  Press(budget=BUDGET, window=W, schedule="pyramid", floor_alpha=0.0),
  Press(budget=None, compression_ratio=0.5, window=W),
  Press(budget=W + 2 * P, window=W, granularity="page"),
  Press(budget=W + 2 * P, window=W, granularity="page", allocation="uniform", chunk_score="max"),
  Press(budget=None, compression_ratio=0.3, window=W, granularity="page", schedule="pyramid"),
  Press(budget=BUDGET, window=W, head_groups=2),
]


def _label(p):
  return (
    f"{p.scorer}-{p.allocation}-{p.schedule}-{p.gqa}-{p.floor_mode}-{p.pool}{p.kernel}-"
    f"r{p.compression_ratio}-{p.granularity}-g{p.head_groups}"
  )


# ---- validation and presets ----------------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(floor_alpha=1.5), r"floor_alpha must lie in \[0, 1\]"),
    (dict(floor_alpha=-0.1), r"floor_alpha must lie in \[0, 1\]"),
    (dict(scorer="tova"), "unknown scorer 'tova'; valid: snapkv, h2o, streamingllm, knorm, random"),
    (dict(allocation="greedy"), "unknown allocation 'greedy'"),
    (dict(schedule="cosine"), "unknown schedule 'cosine'"),
    (dict(pool="min"), "unknown pool 'min'"),
    (dict(gqa="group"), "unknown gqa 'group'"),
    (dict(gqa_reduce="sum"), "unknown gqa_reduce 'sum'"),
    (dict(floor_mode="clip"), "unknown floor_mode 'clip'"),
    (dict(window=0), "window must be an integer >= 1"),
    (dict(budget=16, window=32), "budget smaller than the window: budget 16 < window 32"),
    (dict(budget=None, compression_ratio=1.0), r"compression_ratio must lie in \[0, 1\)"),
    (dict(budget=None, compression_ratio=-0.2), r"compression_ratio must lie in \[0, 1\)"),
    (dict(compression_ratio=0.5), "exactly one of budget and compression_ratio"),
    (dict(budget=None), "exactly one of budget and compression_ratio"),
    (dict(budget=128.7), "budget must be an integer >= 1"),
    (dict(window=16.0), "window must be an integer >= 1"),
    (dict(granularity="chunk"), "unknown granularity 'chunk'; valid: token, page"),
    (dict(chunk_score="sum"), "unknown chunk_score 'sum'"),
    (dict(head_groups=0), "head_groups must be an integer >= 1"),
    (dict(floor_alpha=float("nan")), r"floor_alpha must lie in \[0, 1\]"),
    (dict(kernel=4), "odd integer >= 1"),
    (dict(kernel=0), "odd integer >= 1"),
    (dict(pyramid_beta=0), "pyramid_beta must be an integer >= 1"),
  ],
)
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
  with pytest.raises(ValueError, match="press 'full' keeps the whole cache: budget would have no effect"):
    make_press("full", budget=64)


def test_cache_heads_and_colsum_need():
  assert Press().cache_heads(4, 2) == 2 and Press(gqa="query").cache_heads(4, 2) == 4
  assert make_press("h2o").needs_colsum and make_press("ada-h2o").needs_colsum
  assert not make_press("ada-snapkv").needs_colsum


# ---- budgets and schedules ---------------------------------------------------------------------


def test_flat_and_pyramid_layer_budgets_follow_the_spec():
  lens = jnp.array([5000, 3000])
  flat = np.asarray(Press(budget=128).layer_units(32, lens, 16))
  assert flat.shape == (32, 2) and np.all(flat == 96)  # B' = B - w selectable entries per head
  pyr = np.asarray(Press(budget=128, schedule="pyramid").layer_units(32, lens, 16))  # B' = 96
  assert pyr[0, 0] == 2 * 96 - 96 // 20 == 188  # max = 2B' - min
  assert pyr[-1, 0] == 96 // 20 == 4  # min = B' / beta
  assert np.all(np.diff(pyr[:, 0]) <= 0)  # larger budgets in lower layers
  np.testing.assert_array_equal(pyr.sum(0), [32 * 96, 32 * 96])  # exact total


_pyramid = jax.jit(schedules.pyramid, static_argnums=(1, 2))


@settings(max_examples=40, deadline=None)
@given(
  st.lists(st.integers(0, 600), min_size=3, max_size=3),
  st.sampled_from([1, 2, 3, 7, 32]),
  st.sampled_from([1, 3, 20]),
)
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
  got = np.asarray(press.layer_units(5, jnp.array([5000, 182, 150, 128, 60]), 16))
  np.testing.assert_array_equal(got[:, 0], [188, 142, 96, 50, 4])
  np.testing.assert_array_equal(got[:, 1], [150, 123, 96, 69, 42])  # max = prefix 150, min = 2B' - 150
  np.testing.assert_array_equal(got[:, 2], [118, 107, 96, 85, 74])
  np.testing.assert_array_equal(got[:, 3], [96] * 5)  # len <= B: flat, nothing to evict anywhere
  np.testing.assert_array_equal(got[:, 4], [96] * 5)
  np.testing.assert_array_equal(got.sum(0), [5 * 96] * 5)


def test_ratio_mode_budgets_come_from_each_sequence_length():
  press = Press(budget=None, compression_ratio=0.3, window=W)
  lens = jnp.array([100, 10, 5])
  got = np.asarray(jax.jit(press.layer_units, static_argnums=(0, 2))(3, lens, P)) + W
  # floor(len * 0.7) exactly (10 * float32(0.7) would floor to 6); never below the window.
  np.testing.assert_array_equal(got, [[70, 7, W]] * 3)
  pyr = np.asarray(
    Press(budget=None, compression_ratio=0.5, window=W, schedule="pyramid").layer_units(
      5, jnp.array([400, 100]), P
    )
  )
  np.testing.assert_array_equal(pyr.sum(0), [5 * (200 - W), 5 * (50 - W)])


def test_page_granularity_counts_budgets_in_whole_pages():
  press = Press(budget=128, window=32, granularity="page")
  np.testing.assert_array_equal(press.layer_units(2, jnp.array([5000, 60]), 16), [[6, 6], [6, 6]])  # 96 // 16
  pyr = np.asarray(press.replace(schedule="pyramid").layer_units(4, jnp.array([5000]), 16))
  assert pyr.sum() == 4 * 6 and pyr[0, 0] > pyr[-1, 0]  # the pyramid runs in pages: totals stay exact
  ratio = Press(budget=None, compression_ratio=0.5, window=32, granularity="page")
  np.testing.assert_array_equal(ratio.layer_units(1, jnp.array([300]), 16), [[7]])  # (150 - 32) // 16
  with pytest.raises(ValueError, match="budget 100 - window 32 = 68 is not a multiple of page size 16"):
    Press(budget=100, window=32, granularity="page").check_page_size(16)
  Press(budget=100, window=32).check_page_size(16)  # token granularity takes any budget


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


# ---- the per-layer selection -------------------------------------------------------------------------


def _expected_kept(press, n, units, hg):
  """(kept entries summed over a head group, tail entries per head) the spec asks for."""
  prefix, win = max(n - W, 0), min(n, W)
  if press.granularity == "page":
    chunks = prefix // P
    tail = win + prefix - chunks * P
    return hg * tail + P * min(hg * units, hg * chunks), tail
  return hg * win + min(hg * units, hg * prefix), win


@pytest.mark.parametrize("press", COMBOS + VARIANTS, ids=_label)
def test_select_keeps_the_window_and_exact_group_totals(press):
  hp = press.cache_heads(CFG.num_heads, CFG.num_kv_heads)
  hg = hp // press.head_groups
  for layer in (0, CFG.num_layers - 1):
    keep, info, units = _select(press, INPUTS, LENS, layer=layer)
    assert keep.shape == (3, hp, N)
    np.testing.assert_array_equal(info["budgets"], keep.sum(-1))
    for b, n in enumerate(LENS):
      assert not keep[b, :, n:].any()  # padding is never kept
      total, tail = _expected_kept(press, n, units[b], hg)
      assert keep[b, :, n - tail : n].all()  # the window (and at page granularity the cut tail) always
      if press.floor_mode == "reserve":  # exact per head group: H_g * B' selected, or everything
        for g in range(press.head_groups):
          assert keep[b, g * hg : (g + 1) * hg].sum() == total
      if press.granularity == "page":  # whole chunks only, outside the tail
        chunks = keep[b, :, : (n - tail) // P * P].reshape(hp, -1, P)
        assert np.all(chunks.all(-1) | ~chunks.any(-1))
      if press.allocation == "adaptive" and press.floor_mode == "reserve":
        floor = units[b] * press.floor_alpha // 1
        unit_count = keep[b, :, : n - tail].sum(-1) // (P if press.granularity == "page" else 1)
        assert np.all(unit_count >= min(floor, (n - tail) // (P if press.granularity == "page" else 1)))
      assert 0.0 < info["retained_mass"][b] <= 1.0 + 1e-6
    assert info["retained_mass"][2] == pytest.approx(1.0, abs=1e-6)  # shorter than the window: all kept
  traced = _select(press, INPUTS, LENS, fn=_eval_shape)  # and it traces with abstract inputs
  assert traced[0].shape == keep.shape


def _eval_shape(press, *args, **kw):
  shapes = jax.eval_shape(functools.partial(select, press, **kw), *args)
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "full"])
def test_every_preset_selects_and_traces(name):
  press = make_press(name, budget=BUDGET, window=W)
  keep, info, units = _select(press, INPUTS, LENS)
  assert keep.shape == (3, 2, N) and info["retained_mass"].shape == (3,)
  assert keep[0].sum() == 2 * (units[0] + W)  # the layer's total; uniform presses also per head
  if press.allocation == "uniform":
    np.testing.assert_array_equal(keep.sum(-1)[0], [units[0] + W] * 2)


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "ada-pyramidkv"])
@pytest.mark.parametrize("granularity", ["token", "page"])
def test_budget_at_least_the_prompt_keeps_everything(name, granularity):
  press = make_press(name, budget=N + W, window=W, granularity=granularity)
  for layer in (0, CFG.num_layers - 1):
    keep, info, _ = _select(press, INPUTS, LENS, layer=layer)
    for b, n in enumerate(LENS):
      assert keep[b, :, :n].all() and not keep[b, :, n:].any()
    np.testing.assert_allclose(info["retained_mass"], 1.0, atol=1e-6)


@pytest.mark.parametrize(
  "name,extra",
  [
    ("ada-snapkv", {}),
    ("pyramidkv", dict(pool="avg", kernel=3)),
    ("ada-h2o", {}),
    ("ada-snapkv", dict(granularity="page", budget=W + P)),
  ],
)
def test_each_sequence_of_a_padded_batch_selects_as_if_alone(name, extra):
  # ada-h2o reads colsum, whose padding columns hold garbage.
  press = make_press(name, **{"budget": BUDGET, "window": W, **extra})
  batch, binfo, _ = _select(press, INPUTS, LENS, layer=1)
  for b, n in enumerate(LENS):
    alone_inputs = tuple(x[b : b + 1, :, :n] for x in INPUTS)  # no padding at all
    alone, ainfo, _ = _select(press, alone_inputs, [n], layer=1, fn=_jit_select)
    np.testing.assert_array_equal(batch[b, :, :n], alone[0])
    np.testing.assert_allclose(binfo["retained_mass"][b], ainfo["retained_mass"][0], rtol=1e-5)


# One compile per new shape beats eager there (eager compiles every primitive for every new shape).
_jit_select = jax.jit(select, static_argnums=0, static_argnames=("page_size", "groups"))


@pytest.mark.parametrize("granularity", ["token", "page"])
def test_adaptive_with_alpha_one_equals_uniform(granularity):
  budget = W + 2 * P if granularity == "page" else BUDGET
  for sched in ("flat", "pyramid"):
    uni = Press(allocation="uniform", schedule=sched, budget=budget, window=W, granularity=granularity)
    ada = uni.replace(allocation="adaptive", floor_alpha=1.0)
    for layer in (0, 2):
      np.testing.assert_array_equal(
        _select(ada, INPUTS, LENS, layer)[0], _select(uni, INPUTS, LENS, layer)[0]
      )


def test_adaptive_retains_at_least_the_attention_mass_of_uniform():
  # Without pooling and with mean GQA reduction the SnapKV score IS each entry's share of the retained
  # mass, so the global top-k (alpha = 0, no cap) maximises it: the spec's section 2 claim.
  common = dict(budget=BUDGET, window=W, kernel=1, floor_alpha=0.0)
  uni = _select(Press(allocation="uniform", **common), INPUTS, LENS)[1]["retained_mass"]
  ada = _select(Press(allocation="adaptive", **common), INPUTS, LENS)[1]["retained_mass"]
  assert np.all(ada >= uni - 1e-6)
  assert ada[0] > uni[0]  # and here strictly more


def test_head_groups_select_each_group_on_its_own():
  """head_groups=2 equals selecting each half of the heads as its own layer (what a 2-shard mesh runs)."""
  press = Press(budget=BUDGET, window=W, gqa="query", head_groups=2)
  keep, _, _ = _select(press, INPUTS, LENS)
  q, k, v, colsum = INPUTS
  for g in range(2):  # query heads 2g, 2g+1 read KV head g
    part = (q[:, 2 * g : 2 * g + 2], k[:, g : g + 1], v[:, g : g + 1], colsum[:, 2 * g : 2 * g + 2])
    alone, _, _ = _select(press.replace(head_groups=1), part, LENS)
    np.testing.assert_array_equal(keep[:, 2 * g : 2 * g + 2], alone)
  whole, _, _ = _select(press.replace(head_groups=1), INPUTS, LENS)
  assert not np.array_equal(whole, keep)  # one group of 4 reallocates across the halves


@st.composite
def page_problems(draw):
  lens = draw(st.lists(st.integers(1, N), min_size=1, max_size=3))
  pages = draw(st.integers(0, 4))
  alpha = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
  # few distinct key rows: many exactly tied scores, so the tie rule matters
  seed = draw(st.integers(0, 3))
  return lens, pages, alpha, seed


@settings(max_examples=25, deadline=None)
@given(page_problems())
def test_page_granularity_keeps_whole_pages_with_exact_totals_floors_and_ties(problem):
  lens, pages, alpha, seed = problem
  q, k, v, colsum = _make_inputs(lens=lens, seed=seed)
  k = np.round(k)  # integer keys: many tied chunk scores
  press = Press(budget=W + pages * P, window=W, granularity="page", floor_alpha=alpha, kernel=1)
  keep, info, units = _select(press, (q, k, v, colsum), lens, fn=_jit_select)
  again, _, _ = _select(press, (q, k, v, colsum), lens, fn=_jit_select)
  np.testing.assert_array_equal(keep, again)  # deterministic
  for b, n in enumerate(lens):
    prefix = max(n - W, 0)
    chunks, tail = prefix // P, min(n, W) + prefix % P
    assert keep[b, :, n - tail : n].all() and not keep[b, :, n:].any()
    body = keep[b, :, : chunks * P].reshape(2, chunks, P)
    assert np.all(body.all(-1) | ~body.any(-1))  # whole pages only besides the tail
    per_head = body.all(-1).sum(-1)
    assert per_head.sum() == min(2 * units[b], 2 * chunks)  # exact total, in pages
    assert np.all(per_head >= min(int(units[b] * alpha), chunks))  # the floor, in pages


def test_select_runs_inside_a_jitted_scan_over_layers():
  """As the model calls it: per-layer units and inputs arrive as traced slices of stacked arrays."""
  press = make_press("ada-pyramidkv", budget=BUDGET, window=W)
  q, k, v, colsum = INPUTS
  lens = jnp.asarray(LENS, jnp.int32)
  stack = lambda x: jnp.stack([jnp.asarray(x) * (1 + 0.1 * l) for l in range(CFG.num_layers)])
  xs = (stack(_window(q, LENS)), stack(k), press.layer_units(CFG.num_layers, lens, P))

  @jax.jit
  def prefill_tail(xs, lens):
    def body(carry, x):
      q_l, k_l, units_l = x
      keep, info = select(press, q_l, k_l, lens, units_l, page_size=P)
      return carry, (keep, info["retained_mass"])

    return jax.lax.scan(body, 0, xs)[1]

  keep_L, mass_LB = prefill_tail(xs, lens)
  for l in range(CFG.num_layers):
    want, info = select(press, xs[0][l], xs[1][l], lens, xs[2][l], page_size=P)
    np.testing.assert_array_equal(np.asarray(keep_L[l]), np.asarray(want))
    np.testing.assert_allclose(np.asarray(mass_LB[l]), np.asarray(info["retained_mass"]), rtol=1e-5)


def test_select_rejects_a_window_of_the_wrong_size():
  q, k, v, _ = INPUTS
  with pytest.raises(ValueError, match="q_win_BHWD has shape"):
    select(
      Press(budget=BUDGET, window=W + 1),
      jnp.asarray(_window(q, LENS)),
      jnp.asarray(k),
      jnp.asarray(LENS),
      jnp.asarray([8] * 3),
      page_size=P,
    )
