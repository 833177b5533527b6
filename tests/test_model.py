"""The model forward: chunked prefill, the cache path and the full path agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import model as model_lib
from tests.helpers import random_prompts, tiny_model


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
  logits, cache, _ = model_lib.prefill(params, toks, jnp.asarray([23]), jax.random.PRNGKey(0), cfg=cfg,
                                       capacity=40, chunk=16)
  np.testing.assert_allclose(logits[0], ref[0, 22], atol=1e-4)
  # a 3-token chunk then 2 single tokens: the chunk is causal inside itself
  lg, cache = model_lib.append(params, jnp.asarray([extra[:3]]), jnp.asarray([3]), cache, cfg=cfg,
                               backend="xla")
  np.testing.assert_allclose(lg[0], ref[0, 25], atol=1e-4)
  for i in (3, 4):
    lg, cache = model_lib.append(params, jnp.asarray([[extra[i]]]), jnp.asarray([1]), cache, cfg=cfg,
                                 backend="xla")
    np.testing.assert_allclose(lg[0], ref[0, 23 + i], atol=1e-4)
  assert cache.lengths.tolist() == [[[28] * kv_heads]] * cfg.num_layers
  assert cache.pos.tolist() == [28]


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
