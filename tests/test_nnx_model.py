"""LlamaNNX: the Llama-family model as a Flax NNX module over the same pure functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adakv_jax import generation as gen
from adakv_jax import model as model_lib
from adakv_jax.cache import plan_cache
from adakv_jax.nnx_model import LlamaNNX
from adakv_jax.press import make_press
from adakv_jax.testing import random_prompts, tiny_model


def test_every_tensor_of_the_params_pytree_is_one_nnx_param():
  cfg, params = tiny_model(tie_word_embeddings=False)
  m = LlamaNNX.from_params(cfg, params)
  state = nnx.state(m, nnx.Param)
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(params)) == 12
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), m.params, params))
  fresh = LlamaNNX(cfg, rngs=nnx.Rngs(params=3))
  assert jax.tree.map(jnp.shape, fresh.params) == jax.tree.map(jnp.shape, params)
  with pytest.raises(ValueError, match="params do not match the config's shapes"):
    LlamaNNX.from_params(cfg.replace(num_layers=2), params)
  with pytest.raises(ValueError, match="exactly one of rngs"):
    LlamaNNX(cfg)


def test_split_merge_and_an_nnx_jit_decode_loop_give_the_functional_generate_tokens():
  cfg, params = tiny_model()
  prompts = random_prompts([40, 27], seed=1)
  press = make_press("ada-snapkv", budget=16, window=4, backend="xla")
  steps = 5
  ref = gen.generate(params, cfg, prompts, max_new_tokens=steps, press=press, eos_token_ids=(), backend="xla")

  graphdef, state = nnx.split(LlamaNNX.from_params(cfg, params))
  m = nnx.merge(graphdef, state)
  lens = [len(p) for p in prompts]
  plan = plan_cache(cfg.num_layers, cfg.num_kv_heads, lens, room=steps, press=press)
  tokens = np.zeros((2, model_lib.padded_length(max(lens))), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  rng = jax.random.split(jax.random.PRNGKey(0))[1]
  logits, cache, info = m.prefill(
    jnp.asarray(tokens),
    jnp.asarray(lens),
    rng,
    press=press,
    plan=plan,
    chunk=model_lib.prompt_chunk(max(lens)),
  )
  np.testing.assert_array_equal(info["budgets"], ref.budgets)
  cache = cache.trim()

  @nnx.jit
  def step(m, tok_B, cache):
    logits, cache = m(tok_B[:, None], cache, backend="xla")
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

  tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  out = [tok]
  for _ in range(steps - 1):
    tok, cache = step(m, tok, cache)
    out.append(tok)
  assert np.stack(out, axis=1).tolist() == ref.token_ids
  np.testing.assert_allclose(
    m.forward_full(jnp.asarray([prompts[1]])),
    model_lib.forward_full(params, jnp.asarray([prompts[1]]), cfg),
    rtol=1e-6,
  )
