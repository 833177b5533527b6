"""Generation with a full cache: batching, no retracing, sampling, and the errors a user can hit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import generation as gen
from adakv_jax.cache import CacheCapacityError
from tests.helpers import greedy_reference, random_prompts, tiny_model


def test_batch_of_different_lengths_equals_single_runs_and_uncached_reference():
  cfg, params = tiny_model()
  prompts = random_prompts([37, 20, 5])
  res = gen.generate(params, cfg, prompts, max_new_tokens=6, backend="xla")
  for p, out in zip(prompts, res.token_ids):
    assert out == greedy_reference(params, cfg, p, 6)
  single = gen.generate(params, cfg, prompts[1:2], max_new_tokens=6, backend="xla")
  assert single.token_ids[0] == res.token_ids[1]


def test_decode_step_compiles_once():
  cfg, params = tiny_model()
  gen.decode_step.clear_cache()
  gen.generate(params, cfg, random_prompts([12]), max_new_tokens=8, backend="xla")
  assert gen.decode_step._cache_size() == 1


def test_stops_on_eos():
  cfg, params = tiny_model()
  prompt = random_prompts([10])[0]
  free = gen.generate(params, cfg, [prompt], max_new_tokens=8, backend="xla").token_ids[0]
  stop = free[2]
  res = gen.generate(params, cfg, [prompt], max_new_tokens=8, eos_token_ids=[stop], backend="xla")
  assert res.token_ids[0] == free[:free.index(stop) + 1]


def test_sampling_is_seeded_and_top_p_small_is_greedy():
  cfg, params = tiny_model()
  prompt = random_prompts([10])
  greedy = gen.generate(params, cfg, prompt, max_new_tokens=6, backend="xla").token_ids
  nucleus = gen.generate(params, cfg, prompt, max_new_tokens=6, sampling=gen.Sampling(1.0, 1e-6),
                         backend="xla").token_ids
  assert nucleus == greedy
  hot = gen.Sampling(temperature=5.0)
  a = gen.generate(params, cfg, prompt, max_new_tokens=6, sampling=hot, seed=1, backend="xla").token_ids
  b = gen.generate(params, cfg, prompt, max_new_tokens=6, sampling=hot, seed=1, backend="xla").token_ids
  c = gen.generate(params, cfg, prompt, max_new_tokens=6, sampling=hot, seed=2, backend="xla").token_ids
  assert a == b and a != c


def test_top_p_keeps_the_nucleus_only():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  draws = {int(gen.sample(logits, jax.random.PRNGKey(i), gen.Sampling(1.0, 0.7))[0]) for i in range(64)}
  assert draws == {0, 1}


def test_full_cache_bytes_are_reported():
  cfg, params = tiny_model()
  res = gen.generate(params, cfg, random_prompts([30, 10]), max_new_tokens=4, backend="xla")
  per_entry = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
  assert res.full_cache_bytes == 2 * (30 + 4) * per_entry
  assert res.live_cache_bytes == (30 + 10) * per_entry
  assert res.cache_bytes >= res.full_cache_bytes


@pytest.mark.parametrize("prompts,match", [([[]], "empty prompt"), ([list(range(60)) * 9], "exceeds the model's context")])
def test_bad_prompts_are_rejected(prompts, match):
  cfg, params = tiny_model()
  with pytest.raises(gen.PromptError, match=match):
    gen.generate(params, cfg, prompts, max_new_tokens=4)


def test_cache_refuses_to_overflow():
  cfg, params = tiny_model()
  from adakv_jax import model as model_lib
  _, cache, _ = model_lib.prefill(params, jnp.asarray(random_prompts([16])), jnp.asarray([16]),
                                  jax.random.PRNGKey(0), cfg=cfg, capacity=18, chunk=16)
  cache.check_room(2)
  with pytest.raises(CacheCapacityError, match="capacity exhausted"):
    cache.check_room(3)


def test_decoding_past_the_capacity_fails_loudly():
  cfg, params = tiny_model()
  from adakv_jax import model as model_lib
  _, cache, _ = model_lib.prefill(params, jnp.asarray(random_prompts([16])), jnp.asarray([16]),
                                  jax.random.PRNGKey(0), cfg=cfg, capacity=17, chunk=16)
  tok = jnp.asarray([3])
  tok, _, cache = gen.decode_step(params, tok, cache, jax.random.PRNGKey(1), cfg=cfg, sampling=gen.Sampling())
  with pytest.raises(Exception, match="capacity exhausted"):
    out = gen.decode_step(params, tok, cache, jax.random.PRNGKey(2), cfg=cfg, sampling=gen.Sampling())
    jax.block_until_ready(out)
