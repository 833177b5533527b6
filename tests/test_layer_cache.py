"""The model-agnostic layer API: a press and the paged cache from one layer's own q/k/v arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import layer_cache as lc
from adakv_jax import model as model_lib
from adakv_jax.cache import CacheCapacityError
from adakv_jax.press import make_press
from adakv_jax.testing import random_prompts, tiny_model

compress = jax.jit(lc.compress_prompt, static_argnums=0, static_argnames=("plan", "layer"))


def _arrays(b=2, h=4, kh=2, n=48, d=16, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (b, h, n, d))
  k = jax.random.normal(ks[1], (b, kh, n, d))
  v = jax.random.normal(ks[2], (b, kh, n, d))
  return q, k, v


def _dense_attention(q_HD, k_CD, v_CD):
  """Softmax attention of grouped queries [H, D] over one head's entries [C, D] (numpy, float64)."""
  s = q_HD.astype(np.float64) @ k_CD.astype(np.float64).T / np.sqrt(q_HD.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v_CD.astype(np.float64)


@pytest.mark.parametrize(
  "press_name,extra", [("ada-snapkv", {}), ("snapkv", dict(gqa="query")), ("full", None)]
)
def test_attention_over_the_layer_cache_is_attention_over_the_kept_entries_and_the_new_tokens(
  press_name, extra
):
  """The spec of the three functions: after compress + append, each new token attends to exactly its
  head's kept prompt entries, the new tokens before it and itself."""
  b, h, kh, n, d, t = 2, 4, 2, 48, 16, 3
  q, k, v = _arrays(b, h, kh, n, d)
  len_B = jnp.asarray([48, 37], jnp.int32)
  press = None if extra is None else make_press(press_name, budget=16, window=4, backend="xla", **extra)
  plan = lc.plan_layers(press, 2, h, kh, [48, 37], room=t, page_size=8)
  q_win = lc.window_queries(q, len_B, 4) if press is not None else None
  cache, info = compress(press, q_win, k, v, len_B, plan=plan, layer=1)
  hc = cache.num_heads
  assert hc == (h if extra == dict(gqa="query") else kh)
  qn, kn, vn = _arrays(b, h, kh, t, d, seed=1)
  n_valid = jnp.asarray([3, 2], jnp.int32)
  cache.check_room(t)
  cache = lc.append_kv(cache, kn, vn, n_valid)
  np.testing.assert_array_equal(cache.lengths, info["budgets"] + n_valid[:, None])
  o = np.asarray(lc.attend(cache, qn, n_valid, backend="xla"))
  pos = np.asarray(info["positions"])
  k_, v_, kn_, vn_, qn_ = map(np.asarray, (k, v, kn, vn, qn))
  g = h // hc
  for bi in range(b):
    for hi in range(hc):
      kv = hi * kh // hc
      kept = pos[bi, hi, : int(info["budgets"][bi, hi])]
      assert (kept >= 0).all() and (kept < int(len_B[bi])).all()
      for ti in range(int(n_valid[bi])):
        keys = np.concatenate([k_[bi, kv, kept], kn_[bi, kv, : ti + 1]])
        vals = np.concatenate([v_[bi, kv, kept], vn_[bi, kv, : ti + 1]])
        want = _dense_attention(qn_[bi, hi * g : (hi + 1) * g, ti], keys, vals)
        np.testing.assert_allclose(o[bi, hi * g : (hi + 1) * g, ti], want, rtol=2e-5, atol=2e-5)


def test_a_layer_compressed_alone_equals_that_layer_of_the_models_prefill():
  """The library's own prefill writes its pages through the same functions: one layer's arrays are
  enough to reproduce that layer's cache."""
  cfg, params = tiny_model()
  prompts = random_prompts([60, 41])
  press = make_press("ada-pyramidkv", budget=20, window=4, backend="xla")
  lens = [len(p) for p in prompts]
  plan = lc.plan_layers(press, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, lens, room=5, page_size=8)
  tokens = jnp.asarray([p + [0] * (64 - len(p)) for p in prompts])
  len_B = jnp.asarray(lens, jnp.int32)
  _, cache, info = model_lib.prefill(
    params, tokens, len_B, jax.random.PRNGKey(0), cfg=cfg, press=press, plan=plan, chunk=16
  )
  _, captured = model_lib.run_prefill(
    params, tokens, len_B, cfg=cfg, chunk=16, tap=model_lib.CaptureTap(window=4, with_colsum=False)
  )
  for l in range(cfg.num_layers):
    mine, my_info = compress(
      press, captured.q_win_BHWD[l], captured.k_BKLD[l], captured.v_BKLD[l], len_B, plan=plan, layer=l
    )
    theirs = lc.layer_of(cache, l)
    for name in ("k_pages", "v_pages", "page_table", "num_pages", "lengths"):
      np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name), err_msg=f"{name} {l}")
    np.testing.assert_array_equal(my_info["positions"], info["positions"][l])
    np.testing.assert_allclose(my_info["retained_mass"], info["retained_mass"][l], rtol=1e-6)
  layers = [lc.layer_of(cache, l) for l in range(cfg.num_layers)]
  again = lc.stack_layers(layers, cache.pos)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), again, cache))


def test_the_layer_functions_trace_under_jit_with_static_press_plan_and_layer():
  q, k, v = _arrays()
  len_B = jnp.asarray([48, 30], jnp.int32)
  press = make_press("ada-snapkv", budget=16, window=4, backend="xla")
  plan = lc.plan_layers(press, 1, 4, 2, [48, 30], room=1, page_size=8)

  @jax.jit
  def run(q, k, v, len_B):
    cache, _ = lc.compress_prompt(press, lc.window_queries(q, len_B, 4), k, v, len_B, plan=plan, layer=0)
    cache = lc.append_kv(cache, k[:, :, :1], v[:, :, :1])
    return lc.attend(cache, q[:, :, :1]), cache

  o, cache = run(q, k, v, len_B)
  left = cache.room_left()
  assert o.shape == (2, 4, 1, 16) and left == int(jnp.min(cache.num_pages * 8 - cache.lengths)) >= 0
  cache.check_room(left)
  with pytest.raises(CacheCapacityError, match=f"{left + 1} more token"):
    cache.check_room(left + 1)


def test_bad_layer_inputs_are_refused_with_the_problem_named():
  q, k, v = _arrays()
  len_B = jnp.asarray([48, 30], jnp.int32)
  press = make_press("ada-snapkv", budget=16, window=8, backend="xla")
  plan = lc.plan_layers(press, 2, 4, 2, [48, 30], room=1, page_size=8)
  with pytest.raises(ValueError, match="last >= 8 queries"):
    lc.compress_prompt(press, lc.window_queries(q, len_B, 4), k, v, len_B, plan=plan, layer=0)
  with pytest.raises(ValueError, match="layer 2 is outside the plan's 2 layers"):
    lc.compress_prompt(press, q, k, v, len_B, plan=plan, layer=2)
  with pytest.raises(ValueError, match=r"keys .* and values .* must both be \[B, K, L, D\]"):
    lc.compress_prompt(press, q, k, v[:, :, :10], len_B, plan=plan, layer=0)
  with pytest.raises(ValueError, match="needs colsum_BHL"):
    lc.compress_prompt(press.replace(scorer="h2o", kernel=1), q, k, v, len_B, plan=plan, layer=0)
  with pytest.raises(ValueError, match="num_heads=3 is not a multiple of num_kv_heads=2"):
    lc.plan_layers(press, 2, 3, 2, [48], room=1)
  cache, _ = lc.compress_prompt(press, q, k, v, len_B, plan=plan, layer=0)
  with pytest.raises(ValueError, match="H a multiple of the 2 cache heads"):
    lc.attend(cache, q[:, :3, :1])
  with pytest.raises(ValueError, match=r"n_valid_B has shape \(3,\)"):
    lc.append_kv(cache, k[:, :, :1], v[:, :, :1], jnp.ones((3,), jnp.int32))
