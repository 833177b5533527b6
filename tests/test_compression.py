"""The compressed cache end to end: prefill -> press -> padded per-head cache -> decode / questions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import generation as gen
from adakv_jax import model as model_lib
from adakv_jax.press import make_press
from tests.helpers import random_prompts, tiny_model

ALL_PRESSES = ("snapkv", "ada-snapkv", "pyramidkv", "ada-pyramidkv", "h2o", "ada-h2o", "streamingllm",
               "knorm", "random")


def _masked_decode_reference(params, cfg, full_cache, keep_LBKC, token_B):
  """One decode step over the FULL cache with evicted entries masked out (plain jnp, per layer)."""
  b = token_B.shape[0]
  x = params["embed"][token_B[:, None]].astype(jnp.float32)
  pos = full_cache.pos[:, None]
  for i in range(cfg.num_layers):
    lp = jax.tree.map(lambda a: a[i], params["layers"])
    q, k, v = model_lib._qkv(lp, x, pos, cfg)
    ck = jnp.concatenate([full_cache.k[i], k], axis=2)
    cv = jnp.concatenate([full_cache.v[i], v], axis=2)
    keep = jnp.concatenate([keep_LBKC[i], jnp.ones((b, cfg.num_kv_heads, 1), bool)], axis=2)
    g = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(b, cfg.num_kv_heads, g, cfg.head_dim)
    s = jnp.einsum("bkgd,bkcd->bkgc", qg, ck) / np.sqrt(cfg.head_dim)
    p = jax.nn.softmax(jnp.where(keep[:, :, None, :], s, -jnp.inf), axis=-1)
    o = jnp.einsum("bkgc,bkcd->bkgd", p, cv).reshape(b, cfg.num_heads, 1, cfg.head_dim)
    x = model_lib._out_and_mlp(lp, x, o, cfg)
  return model_lib._logits(params, x[:, 0], cfg)


@pytest.mark.parametrize("name", ["ada-snapkv", "pyramidkv", "ada-h2o"])
def test_compressed_decode_equals_masked_dense_attention(name):
  cfg, params = tiny_model()
  lens = [60, 41]
  prompts = random_prompts(lens)
  toks = jnp.asarray(gen._pad_batch(prompts, 64))
  len_B = jnp.asarray(lens)
  press = make_press(name, budget=24, window=8, backend="xla")
  cap = press.capacity(cfg.num_layers, 60, 1)
  _, cache, info = model_lib.prefill(params, toks, len_B, jax.random.PRNGKey(0), cfg=cfg, press=press,
                                     capacity=cap, chunk=64, return_positions=True)
  _, full, _ = model_lib.prefill(params, toks, len_B, jax.random.PRNGKey(0), cfg=cfg, capacity=64, chunk=64)
  pos = np.asarray(info["positions"])  # [L, B, K, C]
  keep = np.zeros((cfg.num_layers, 2, cfg.num_kv_heads, 64), bool)
  for l, b, h, c in zip(*np.nonzero(pos >= 0)):
    keep[l, b, h, pos[l, b, h, c]] = True
  assert keep.sum() == int(np.asarray(cache.lengths).sum())  # positions are unique and complete
  assert (keep.sum(-1) < np.asarray(lens)[None, :, None]).all()  # something was really evicted
  token = jnp.asarray([5, 7])
  ref = _masked_decode_reference(params, cfg, full, jnp.asarray(keep), token)
  for backend in ("xla", "pallas"):
    got, _ = model_lib.append(params, token[:, None], jnp.ones(2, jnp.int32),
                              jax.tree.map(jnp.copy, cache), cfg=cfg, backend=backend)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_PRESSES)
def test_budget_at_least_the_prompt_reproduces_the_full_cache(name):
  cfg, params = tiny_model()
  prompts = random_prompts([30, 18])
  full = gen.generate(params, cfg, prompts, max_new_tokens=5, backend="xla")
  res = gen.generate(params, cfg, prompts, max_new_tokens=5, backend="xla",
                     press=make_press(name, budget=32, window=4))
  assert res.token_ids == full.token_ids
  np.testing.assert_allclose(res.final_logits, full.final_logits, atol=1e-5)
  assert any("nothing to evict" in n for n in res.notes)
  assert res.budgets[:, 0].tolist() == [[30, 30]] * cfg.num_layers


@pytest.mark.parametrize("name", ["ada-snapkv", "ada-pyramidkv", "streamingllm"])
def test_batch_equals_single_runs(name):
  cfg, params = tiny_model()
  prompts = random_prompts([70, 33, 52], seed=4)
  press = make_press(name, budget=20, window=4, backend="xla")
  batch = gen.generate(params, cfg, prompts, max_new_tokens=5, press=press, backend="xla")
  for i, p in enumerate(prompts):
    single = gen.generate(params, cfg, [p], max_new_tokens=5, press=press, backend="xla")
    assert single.token_ids[0] == batch.token_ids[i]
    np.testing.assert_array_equal(single.budgets[:, 0], batch.budgets[:, i])


def test_budgets_sum_to_the_layer_totals_and_memory_shrinks():
  cfg, params = tiny_model()
  prompt = random_prompts([200], seed=5)
  for name in ("ada-snapkv", "snapkv", "ada-pyramidkv"):
    press = make_press(name, budget=32, window=8)
    res = gen.generate(params, cfg, prompt, max_new_tokens=3, press=press, backend="xla")
    totals = res.budgets[:, 0].sum(-1)
    if "pyramid" in name:
      assert totals.sum() == cfg.num_layers * cfg.num_kv_heads * 32
      assert totals[0] > totals[-1]
    else:
      assert (totals == cfg.num_kv_heads * 32).all()
    assert res.cache_bytes < 0.5 * res.full_cache_bytes
    assert (res.retained_mass > 0).all() and (res.retained_mass <= 1 + 1e-5).all()


def test_question_agnostic_answers_equal_fresh_runs():
  cfg, params = tiny_model()
  context = random_prompts([90], seed=6)
  q1, q2 = random_prompts([7, 4], seed=7)
  press = make_press("ada-snapkv", budget=24, window=8)
  res = gen.generate(params, cfg, context, max_new_tokens=6, press=press, questions=[q1, q2], backend="xla")
  for q, ans in zip((q1, q2), res.answers):
    # a fresh run: compress the same context, append this one question, decode greedily
    toks = jnp.asarray(gen._pad_batch(context, 128))
    cap = press.capacity(cfg.num_layers, 90, 7 + 6)
    _, cache, _ = model_lib.prefill(params, toks, jnp.asarray([90]), jax.random.split(jax.random.PRNGKey(0))[1],
                                    cfg=cfg, press=press, capacity=cap, chunk=128)
    logits, cache = model_lib.append(params, jnp.asarray([q]), jnp.asarray([len(q)]), cache, cfg=cfg)
    out = [int(jnp.argmax(logits[0]))]
    for _ in range(5):
      logits, cache = model_lib.append(params, jnp.asarray([[out[-1]]]), jnp.asarray([1]), cache, cfg=cfg)
      out.append(int(jnp.argmax(logits[0])))
    assert ans[0] == out
  assert res.answers[0] != res.answers[1]


def test_question_agnostic_differs_from_question_aware():
  """Compressing without the question in the window changes what is kept (the paper's harder setting)."""
  cfg, params = tiny_model()
  context = random_prompts([90], seed=6)
  q = random_prompts([8], seed=8)[0]
  press = make_press("ada-snapkv", budget=24, window=8)
  aware = gen.generate(params, cfg, [context[0] + q], max_new_tokens=1, press=press, backend="xla",
                       return_positions=True)
  agnostic = gen.generate(params, cfg, context, max_new_tokens=1, press=press, backend="xla",
                          return_positions=True)
  assert not np.array_equal(aware.positions[..., :16], agnostic.positions[..., :16])


def test_a_tight_cap_binds_and_is_reported():
  cfg, params = tiny_model()
  prompt = random_prompts([200], seed=9)
  loose = gen.generate(params, cfg, prompt, max_new_tokens=1, backend="xla",
                       press=make_press("ada-snapkv", budget=32, window=8, head_cap_factor=3.0))
  tight = gen.generate(params, cfg, prompt, max_new_tokens=1, backend="xla",
                       press=make_press("ada-snapkv", budget=32, window=8, head_cap_factor=1.0))
  assert tight.head_cap == 24 + 8 and loose.head_cap == 72 + 8
  assert (tight.budgets <= tight.head_cap).all() and (loose.budgets <= loose.head_cap).all()
  assert tight.heads_at_cap == 1.0  # cap = mean budget: every head is exactly at it (uniform)
  assert loose.heads_at_cap < 1.0 and loose.budgets.max() > tight.budgets.max()
  assert tight.cache_bytes < loose.cache_bytes


@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_ratio_mode_leaves_room_to_decode_when_the_prompt_is_padded(ratio):
  """The per-head cap is sized on the longest real prompt, not the padded one (100 -> 128 here)."""
  cfg, params = tiny_model()
  prompts = random_prompts([100, 61], seed=10)
  press = make_press("ada-snapkv", compression_ratio=ratio, window=8)
  res = gen.generate(params, cfg, prompts, max_new_tokens=6, press=press, backend="xla")
  assert [len(t) for t in res.token_ids] == [6, 6]
  kept = int(100 * (1 - ratio))
  assert res.budgets[:, 0].sum(-1).tolist() == [cfg.num_kv_heads * kept] * cfg.num_layers
