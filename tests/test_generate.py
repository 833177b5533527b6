"""Generation with a full cache: batching, no retracing, sampling, and the errors a user can hit."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import generation as gen
from adakv_jax.cache import CacheCapacityError
from adakv_jax.testing import greedy_reference, random_prompts, tiny_model


def test_batch_of_different_lengths_equals_single_runs_and_uncached_reference():
  cfg, params = tiny_model()
  prompts = random_prompts([37, 20, 5])
  res = gen.generate(params, cfg, prompts, max_new_tokens=6, backend="xla")
  for p, out in zip(prompts, res.token_ids):
    assert out == greedy_reference(params, cfg, p, 6)
  single = gen.generate(params, cfg, prompts[1:2], max_new_tokens=6, backend="xla")
  assert single.token_ids[0] == res.token_ids[1]


def test_the_decode_loop_compiles_once_and_runs_on_device():
  cfg, params = tiny_model()
  gen.decode_loop.clear_cache()
  a = gen.generate(params, cfg, random_prompts([12]), max_new_tokens=8, backend="xla")
  b = gen.generate(params, cfg, random_prompts([11], seed=3), max_new_tokens=8, backend="xla")
  assert gen.decode_loop._cache_size() == 1  # one loop for all 7 steps, reused for the second prompt
  assert len(a.token_ids[0]) == len(b.token_ids[0]) == 8


def _while_bodies(hlo: str) -> list[str]:
  """The text of every while-loop body computation in an optimised HLO module."""
  names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  blocks = re.split(r"\n(?=\S)", hlo)  # one block per computation
  return [b for b in blocks if re.match(r"%?([\w.\-]+) \(", b) and re.match(r"%?([\w.\-]+)", b)[1] in names]


def test_the_decode_loop_reads_each_layer_weight_in_place_and_per_layer_params_change_no_token():
  """Slicing a stacked weight inside the loop would copy it on every step (XLA:CPU materialises the
  slice before the dot): the loop body must hold no array of a layer weight's shape."""
  from adakv_jax import model as model_lib
  from adakv_jax.params import param_shapes

  cfg, params = tiny_model(num_layers=3)
  cache = _prefilled(cfg, params, room=8)
  state = gen.start_decode(jnp.zeros((1,), jnp.int32), cache, jax.random.PRNGKey(0), 8, ())
  kw = dict(cfg=cfg, sampling=gen.Sampling(), eos_ids=(), steps=8, backend="xla")
  hlo = gen.decode_loop.lower(params, state, **kw).compile().as_text()
  weight_types = {
    "f32[" + ",".join(map(str, shape[1:])) + "]"
    for shape in jax.tree.leaves(param_shapes(cfg)["layers"], is_leaf=lambda x: isinstance(x, tuple))
    if len(shape) == 3
  }
  bodies = _while_bodies(hlo) if jax.default_backend() == "cpu" else ["(XLA:CPU's HLO text only)"]
  assert bodies, "no while loop in the compiled decode loop"
  copies = [
    line.strip()
    for body in bodies
    for line in body.splitlines()
    if re.search(r"= (" + "|".join(map(re.escape, weight_types)) + r")\{[\d,]*\} fusion\(", line)
  ]
  assert not copies, f"the loop body copies layer weights: {copies[:2]}"
  stacked = gen.decode_loop(params, state, **kw)
  state = gen.start_decode(
    jnp.zeros((1,), jnp.int32), _prefilled(cfg, params, room=8), jax.random.PRNGKey(0), 8, ()
  )
  split = gen.decode_loop(model_lib.per_layer_params(params), state, **kw)
  np.testing.assert_array_equal(stacked.tokens_BS, split.tokens_BS)


def test_streaming_hands_out_every_token_once_in_order():
  cfg, params = tiny_model()
  prompts = random_prompts([12, 7])
  seen = [[], []]
  res = gen.generate(
    params,
    cfg,
    prompts,
    max_new_tokens=9,
    backend="xla",
    stream_every=4,
    on_tokens=lambda new: [s.extend(n) for s, n in zip(seen, new)],
  )
  assert seen == res.token_ids


def test_stops_on_eos():
  cfg, params = tiny_model()
  prompt = random_prompts([10])[0]
  free = gen.generate(params, cfg, [prompt], max_new_tokens=8, backend="xla").token_ids[0]
  stop = free[2]
  res = gen.generate(params, cfg, [prompt], max_new_tokens=8, eos_token_ids=[stop], backend="xla")
  assert res.token_ids[0] == free[: free.index(stop) + 1]


def test_sampling_is_seeded_and_top_p_small_is_greedy():
  cfg, params = tiny_model()
  prompt = random_prompts([10])
  greedy = gen.generate(params, cfg, prompt, max_new_tokens=6, backend="xla").token_ids
  nucleus = gen.generate(
    params, cfg, prompt, max_new_tokens=6, sampling=gen.Sampling(1.0, 1e-6), backend="xla"
  ).token_ids
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


def test_full_cache_bytes_are_reported_in_whole_pages_per_head():
  cfg, params = tiny_model()
  res = gen.generate(params, cfg, random_prompts([30, 10]), max_new_tokens=4, backend="xla", page_size=8)
  per_entry = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
  assert res.cache_bytes == res.full_cache_bytes == (5 * 8 + 2 * 8) * per_entry  # ceil(34/8), ceil(14/8)
  assert res.kept_bytes == (30 + 10) * per_entry
  assert res.decode_room_bytes == 2 * 4 * per_entry
  assert res.padding_overhead == pytest.approx(56 / 48)
  assert res.pages_used == res.pages_allocated == cfg.num_layers * cfg.num_kv_heads * (5 + 2)


@pytest.mark.parametrize(
  "prompts,match", [([[]], "empty prompt"), ([list(range(60)) * 9], "exceeds the model's context")]
)
def test_bad_prompts_are_rejected(prompts, match):
  cfg, params = tiny_model()
  with pytest.raises(gen.PromptError, match=match):
    gen.generate(params, cfg, prompts, max_new_tokens=4)


def _prefilled(cfg, params, room):
  from adakv_jax import model as model_lib
  from adakv_jax.cache import plan_cache

  plan = plan_cache(cfg.num_layers, cfg.num_kv_heads, [16], room=room, page_size=8)
  return model_lib.prefill(
    params,
    jnp.asarray(random_prompts([16])),
    jnp.asarray([16]),
    jax.random.PRNGKey(0),
    cfg=cfg,
    plan=plan,
    chunk=16,
  )[1]


def test_cache_room_is_whole_pages_and_checked_on_the_host():
  cfg, params = tiny_model()
  cache = _prefilled(cfg, params, room=2)  # 16 + 2 entries -> 3 pages of 8: room for 8
  cache.check_room(8)
  with pytest.raises(CacheCapacityError, match="capacity exhausted: 9 more token"):
    cache.check_room(9)


def test_append_past_the_room_raises_the_typed_error_and_leaves_the_cache_usable():
  from adakv_jax import model as model_lib

  cfg, params = tiny_model()
  cache = _prefilled(cfg, params, room=1)  # 17 entries -> 3 pages: room for 8 more
  with pytest.raises(CacheCapacityError, match="9 more token"):
    model_lib.append(params, jnp.zeros((1, 9), jnp.int32), jnp.asarray([9]), cache, cfg=cfg)
  logits, cache = model_lib.append(params, jnp.zeros((1, 8), jnp.int32), jnp.asarray([8]), cache, cfg=cfg)
  assert np.isfinite(np.asarray(logits)).all() and cache.lengths.max() == 24


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    (dict(max_new_tokens=2.5), ValueError, "max_new_tokens must be an integer >= 1, got 2.5"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be an integer >= 1"),
    (dict(stream_every=0), ValueError, "stream_every must be an integer >= 1"),
    (dict(sampling=(1.0, 0.5)), TypeError, "sampling must be a Sampling"),
  ],
)
def test_bad_generation_arguments_name_the_argument(kwargs, error, match):
  cfg, params = tiny_model()
  with pytest.raises(error, match=match):
    gen.generate(params, cfg, random_prompts([5]), **kwargs)


@pytest.mark.parametrize(
  "temperature,top_p,match",
  [
    (float("nan"), 1.0, "temperature must be a finite number"),
    (float("inf"), 1.0, "temperature"),
    (-1.0, 1.0, "temperature"),
    (1.0, float("nan"), "top_p must be a finite number"),
    (1.0, 0.0, "top_p"),
  ],
)
def test_non_finite_sampling_parameters_are_refused(temperature, top_p, match):
  with pytest.raises(ValueError, match=match):
    gen.Sampling(temperature, top_p)


@pytest.mark.parametrize(
  "prompt,match",
  [
    ([5, 10**6, 3], "prompt 0, position 1: token id 1000000 is outside"),
    ([-5, 1], "prompt 0, position 0: token id -5 is outside"),
    ([1.5, 2.0], "flat list of integer token ids"),
  ],
)
def test_token_ids_outside_the_vocabulary_are_refused_not_clamped(prompt, match):
  cfg, params = tiny_model()
  with pytest.raises(gen.PromptError, match=match):
    gen.generate(params, cfg, [prompt], max_new_tokens=2)
  with pytest.raises(gen.PromptError, match="question 0, position 0"):
    gen.generate(params, cfg, [[1, 2, 3]], max_new_tokens=2, questions=[[cfg.vocab_size]])
