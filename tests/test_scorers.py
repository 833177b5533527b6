"""Scorers and score post-processing (ADAKV_SPEC 3.1-3.3), checked against direct NumPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax.press import Press, scorers
from adakv_jax.testing import tiny_config

CFG = tiny_config(
  vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=2, head_dim=8, max_position_embeddings=4096
)
W = 3


def _inputs(seed=0, b=2, n=10):
  r = np.random.default_rng(seed)
  q = r.normal(size=(b, CFG.num_heads, W, CFG.head_dim)).astype(np.float32)
  k = r.normal(size=(b, CFG.num_kv_heads, n, CFG.head_dim)).astype(np.float32)
  return q, k


def _numpy_snapkv(q_HWD, k_KLD, length):
  """Per query head: mean over the valid window queries of softmax(q k / sqrt(d)) over keys <= its
  position."""
  h, w, d = q_HWD.shape
  g = h // k_KLD.shape[0]
  out = np.zeros((h, k_KLD.shape[1]))
  rows = 0
  for i in range(w):
    qpos = length - w + i
    if qpos < 0:
      continue
    rows += 1
    for hh in range(h):
      logits = k_KLD[hh // g, : qpos + 1] @ q_HWD[hh, i] / np.sqrt(d)
      p = np.exp(logits - logits.max())
      out[hh, : qpos + 1] += p / p.sum()
  return out / rows


@pytest.mark.parametrize("gqa,reduce", [("kv", "mean"), ("kv", "max"), ("query", "mean")])
def test_snapkv_matches_numpy_with_gqa_reduction(gqa, reduce):
  q, k = _inputs()
  lens = np.array([10, 7])
  press = Press(window=W, budget=W, gqa=gqa, gqa_reduce=reduce)
  got = np.asarray(scorers.snapkv(jnp.asarray(q), jnp.asarray(k), None, jnp.asarray(lens), None, press))
  assert got.shape == (2, press.cache_heads(CFG.num_heads, CFG.num_kv_heads), 10)
  for b in range(2):
    want = _numpy_snapkv(q[b], k[b], lens[b])
    if gqa == "kv":
      want = want.reshape(2, 2, -1)
      want = want.max(1) if reduce == "max" else want.mean(1)
    np.testing.assert_allclose(got[b], want, atol=1e-5)
  assert np.all(got[1, :, 7:] == 0)  # keys past the prompt get no attention


def test_window_attention_masks_garbage_queries_of_short_prompts():
  q, k = _inputs()
  lens = jnp.array([10, 2])  # sequence 1 is shorter than the window: query slot 0 is left padding
  probs, qvalid = scorers.window_attention(jnp.asarray(q), jnp.asarray(k), lens)
  np.testing.assert_array_equal(np.asarray(qvalid), [[True] * 3, [False, True, True]])
  np.testing.assert_allclose(np.asarray(probs).sum(-1)[0], 1.0, atol=1e-6)
  assert np.all(np.asarray(probs)[1, :, 0] == 0)
  np.testing.assert_allclose(np.asarray(probs)[1, :, 1:].sum(-1), 1.0, atol=1e-6)
  assert np.all(np.asarray(probs)[1, :, 1, 1:] == 0)  # causal: query at position 0 sees key 0 only
  q2 = q.copy()
  q2[1, :, 0] = 100.0  # the garbage query's content must not matter
  s1 = scorers.snapkv(jnp.asarray(q), jnp.asarray(k), None, lens, None, Press(window=W, budget=W))
  s2 = scorers.snapkv(jnp.asarray(q2), jnp.asarray(k), None, lens, None, Press(window=W, budget=W))
  np.testing.assert_allclose(np.asarray(s1)[1], np.asarray(s2)[1], atol=1e-6)


def test_h2o_reduces_colsum_over_groups_and_requires_it():
  colsum = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
  q, k = _inputs(n=5)
  press = Press(scorer="h2o", window=W, budget=W)
  got = scorers.h2o(None, jnp.asarray(k), jnp.asarray(colsum), None, None, press)
  np.testing.assert_allclose(np.asarray(got), colsum.reshape(2, 2, 2, 5).mean(2))
  with pytest.raises(ValueError, match="needs colsum"):
    scorers.h2o(jnp.asarray(q), jnp.asarray(k), None, jnp.array([5, 5]), None, press)


def test_streamingllm_ranks_sinks_first_then_recency():
  q, k = _inputs(n=8)
  press = Press(scorer="streamingllm", window=W, budget=W, sink_tokens=2, kernel=1)
  s = np.asarray(scorers.streamingllm(jnp.asarray(q), jnp.asarray(k), None, None, None, press))
  order = list(np.argsort(-s[0, 0], kind="stable"))
  assert order[:2] == [0, 1] and order[2:] == [7, 6, 5, 4, 3, 2]


def test_knorm_is_negative_key_norm_and_random_follows_rng():
  q, k = _inputs(n=5)
  press = Press(scorer="knorm", window=W, budget=W, gqa="query")
  s = np.asarray(scorers.knorm(jnp.asarray(q), jnp.asarray(k), None, None, None, press))
  want = -np.linalg.norm(k, axis=-1)
  np.testing.assert_allclose(s, np.repeat(want, 2, axis=1), rtol=1e-5)  # gqa="query": one row per query head
  rp = Press(scorer="random", window=W, budget=W)
  a = scorers.random(jnp.asarray(q), jnp.asarray(k), None, None, jax.random.PRNGKey(1), rp)
  b = scorers.random(jnp.asarray(q), jnp.asarray(k), None, None, jax.random.PRNGKey(1), rp)
  c = scorers.random(jnp.asarray(q), jnp.asarray(k), None, None, jax.random.PRNGKey(2), rp)
  assert a.shape == (2, 2, 5) and np.all((np.asarray(a) >= 0) & (np.asarray(a) < 1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_pooling_sees_only_the_prefix_and_masks_the_rest():
  raw = np.array([[[0.0, 5.0, 0.0, 0.0, 0.0, 9.0, 9.0, 9.0]]], np.float32)  # 9s sit in the window
  prefix = jnp.arange(8)[None, :] < 5
  mx = np.asarray(scorers.finish_scores(jnp.asarray(raw), prefix, Press(window=W, budget=W, kernel=3)))
  np.testing.assert_array_equal(mx[0, 0], [5, 5, 5, 0, 0, -np.inf, -np.inf, -np.inf])
  av = np.asarray(
    scorers.finish_scores(jnp.asarray(raw), prefix, Press(window=W, budget=W, kernel=3, pool="avg"))
  )
  np.testing.assert_allclose(av[0, 0, :5], [5 / 3, 5 / 3, 5 / 3, 0, 0])  # zero padding counts in the divisor
  none = np.asarray(scorers.finish_scores(jnp.asarray(raw), prefix, Press(window=W, budget=W, kernel=1)))
  np.testing.assert_array_equal(none[0, 0], [0, 5, 0, 0, 0, -np.inf, -np.inf, -np.inf])
  wide = np.asarray(scorers.finish_scores(jnp.asarray(raw), prefix, Press(window=W, budget=W, kernel=7)))
  np.testing.assert_array_equal(wide[0, 0, :5], [5, 5, 5, 5, 5])  # kernel 7 still stops at the prefix end


def test_chunk_scores_average_or_max_whole_chunks_inside_the_prefix():
  tok = jnp.asarray(np.arange(2 * 1 * 24, dtype=np.float32).reshape(2, 1, 24))
  mean = np.asarray(scorers.chunk_scores(tok, jnp.array([3, 1]), 8, "mean"))
  np.testing.assert_allclose(mean[0, 0], [3.5, 11.5, 19.5])
  np.testing.assert_allclose(mean[1, 0], [27.5, -np.inf, -np.inf])  # only whole chunks of the prefix
  mx = np.asarray(scorers.chunk_scores(tok, jnp.array([3, 1]), 8, "max"))
  np.testing.assert_allclose(mx[0, 0], [7, 15, 23])
