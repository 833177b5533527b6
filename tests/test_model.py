"""The model forward: chunked prefill, the cache path and the full path agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import model as model_lib
from adakv_jax.cache import plan_cache
from adakv_jax.testing import random_prompts, tiny_model


def test_chunked_prefill_equals_unchunked():
  cfg, params = tiny_model()
  toks = jnp.asarray(random_prompts([64]))
  full = model_lib.forward_full(params, toks, cfg)
  for chunk in (16, 32):
    np.testing.assert_allclose(model_lib.forward_full(params, toks, cfg, chunk=chunk), full, atol=1e-5)


def test_chunked_attention_never_sees_the_future():
  cfg, params = tiny_model()
  a = random_prompts([40], seed=1)[0]
  b = a[:20] + random_prompts([20], seed=2)[0]
  la = model_lib.forward_full(params, jnp.asarray([a]), cfg, chunk=8)
  lb = model_lib.forward_full(params, jnp.asarray([b]), cfg, chunk=8)
  np.testing.assert_allclose(la[0, :20], lb[0, :20], atol=1e-5)
  assert not np.allclose(la[0, 20:], lb[0, 20:], atol=1e-3)


@pytest.mark.parametrize("bias,tied,kv_heads", [(False, False, 2), (True, True, 4), (False, True, 1)])
def test_prefill_then_append_matches_full_forward(bias, tied, kv_heads):
  cfg, params = tiny_model(attention_bias=bias, tie_word_embeddings=tied, num_kv_heads=kv_heads)
  prompt = random_prompts([23])[0]
  extra = random_prompts([5], seed=3)[0]
  ref = model_lib.forward_full(params, jnp.asarray([prompt + extra]), cfg)
  toks = jnp.asarray([prompt + [0] * 9])
  plan = plan_cache(cfg.num_layers, kv_heads, [23], room=5, page_size=8)
  logits, cache, _ = model_lib.prefill(
    params, toks, jnp.asarray([23]), jax.random.PRNGKey(0), cfg=cfg, plan=plan, chunk=16
  )
  np.testing.assert_allclose(logits[0], ref[0, 22], atol=1e-4)
  # a 3-token chunk then 2 single tokens: the chunk is causal inside itself
  lg, cache = model_lib.append(
    params, jnp.asarray([extra[:3]]), jnp.asarray([3]), cache, cfg=cfg, backend="xla"
  )
  np.testing.assert_allclose(lg[0], ref[0, 25], atol=1e-4)
  for i in (3, 4):
    lg, cache = model_lib.append(
      params, jnp.asarray([[extra[i]]]), jnp.asarray([1]), cache, cfg=cfg, backend="xla"
    )
    np.testing.assert_allclose(lg[0], ref[0, 23 + i], atol=1e-4)
  assert cache.lengths.tolist() == [[[28] * kv_heads]] * cfg.num_layers
  assert cache.pos.tolist() == [28]
  assert cache.num_pages.tolist() == [[[4] * kv_heads]] * cfg.num_layers  # ceil((23 + 5) / 8)


def test_a_capture_tap_sees_what_the_cache_tap_writes():
  """Experiments tap the same scan: the captured K/V are exactly the entries prefill writes."""
  cfg, params = tiny_model()
  prompts = random_prompts([30, 17], seed=4)
  toks = jnp.asarray([p + [0] * (32 - len(p)) for p in prompts])
  len_B = jnp.asarray([30, 17])
  last, cap = jax.jit(model_lib.run_prefill, static_argnames=("cfg", "chunk", "tap"))(
    params, toks, len_B, cfg=cfg, chunk=16, tap=model_lib.CaptureTap(window=4)
  )
  plan = plan_cache(cfg.num_layers, cfg.num_kv_heads, [30, 17], room=1, page_size=8)
  logits, cache, info = model_lib.prefill(
    params, toks, len_B, jax.random.PRNGKey(0), cfg=cfg, plan=plan, chunk=16
  )
  np.testing.assert_allclose(model_lib.logits_of(params, last, cfg), logits, atol=1e-6)
  assert cap.k_BKLD.shape == (cfg.num_layers, 2, cfg.num_kv_heads, 32, cfg.head_dim)
  assert cap.q_win_BHWD.shape == (cfg.num_layers, 2, cfg.num_heads, 4, cfg.head_dim)
  for l in range(cfg.num_layers):
    table = np.asarray(cache.page_table[l])
    for b, n in enumerate([30, 17]):
      for h in range(cfg.num_kv_heads):
        for j in (0, n - 1):
          row = np.asarray(cache.k_pages[l])[table[b, h, j // 8], j % 8]
          np.testing.assert_allclose(row, np.asarray(cap.k_BKLD)[l, b, h, j], atol=1e-6)


def test_prefill_refuses_a_padded_length_that_is_not_a_multiple_of_the_chunk():
  cfg, params = tiny_model()
  plan = plan_cache(cfg.num_layers, cfg.num_kv_heads, [30], room=1, page_size=8)
  with pytest.raises(ValueError, match="padded prompt length 30 must be a multiple of chunk 16"):
    model_lib.prefill(
      params,
      jnp.zeros((1, 30), jnp.int32),
      jnp.asarray([30]),
      jax.random.PRNGKey(0),
      cfg=cfg,
      plan=plan,
      chunk=16,
    )


def test_bfloat16_tracks_float32():
  cfg, params = tiny_model()
  cfg16 = cfg.replace(dtype="bfloat16")
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  toks = jnp.asarray(random_prompts([32]))
  l32 = model_lib.forward_full(params, toks, cfg)
  l16 = model_lib.forward_full(p16, toks, cfg16)
  assert l16.dtype == jnp.float32
  p32, q16 = jax.nn.softmax(l32, -1), jax.nn.softmax(l16, -1)
  assert float(jnp.max(jnp.abs(p32 - q16))) < 5e-2


@pytest.mark.parametrize("press_name", [None, "ada-snapkv", pytest.param("ada-h2o", marks=pytest.mark.slow)])
def test_one_capture_compresses_exactly_as_prefill_does(press_name):
  from adakv_jax.press import make_press

  cfg, params = tiny_model()
  prompts = random_prompts([60, 37], seed=5)
  toks = jnp.asarray([p + [0] * (64 - len(p)) for p in prompts])
  len_B = jnp.asarray([60, 37])
  press = make_press(press_name, budget=16, window=4) if press_name else None
  plan = plan_cache(cfg.num_layers, cfg.num_kv_heads, [60, 37], room=3, press=press, page_size=8)
  key = jax.random.PRNGKey(3)
  _, cache, info = model_lib.prefill(params, toks, len_B, key, cfg=cfg, press=press, plan=plan, chunk=32)
  _, cap = model_lib.run_prefill(params, toks, len_B, cfg=cfg, chunk=32, tap=model_lib.CaptureTap(window=8))
  got, got_info = model_lib.cache_from_capture(cap, len_B, key, cfg=cfg, press=press, plan=plan)
  for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  np.testing.assert_array_equal(info["positions"], got_info["positions"])
