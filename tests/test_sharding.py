"""SPMD: the same tokens on a (data, model) mesh of simulated CPU devices as on one device."""

import jax
import numpy as np
import pytest

from adakv_jax import generation as gen
from adakv_jax import sharding
from adakv_jax.testing import random_prompts, tiny_model

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.mark.parametrize("backend", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_sharded_generation_matches_single_device(backend):
  cfg, params = tiny_model(num_kv_heads=2, num_heads=4)
  prompts = random_prompts([21, 9, 14, 30])
  ref = gen.generate(params, cfg, prompts, max_new_tokens=4, backend="xla")
  # Interpreted Pallas kernels run their callbacks' array ops on CPU device 0; a mesh that includes it
  # can deadlock at the interpreter's cross-device barrier (tests/kernels/test_kernels_shard_map.py).
  mesh = sharding.make_mesh(data=2, model=2, devices=jax.devices()[1:] if backend == "pallas" else None)
  res = gen.generate(
    sharding.shard_params(params, mesh), cfg, prompts, max_new_tokens=4, backend=backend, mesh=mesh
  )
  assert res.token_ids == ref.token_ids


def test_mesh_that_does_not_divide_is_refused():
  cfg, params = tiny_model(num_kv_heads=2, num_heads=4)
  mesh = sharding.make_mesh(data=2, model=4)
  with pytest.raises(ValueError, match="not divisible by the mesh's model axis"):
    gen.generate(params, cfg, random_prompts([5, 6]), max_new_tokens=2, mesh=mesh)


@pytest.mark.parametrize(
  "extra",
  [
    dict(),
    pytest.param(dict(granularity="page", budget=4 + 16), marks=pytest.mark.slow),
    pytest.param(dict(gqa="query"), marks=pytest.mark.slow),
    pytest.param(dict(compression_ratio=0.5, budget=None), marks=pytest.mark.slow),
  ],
)
def test_a_compressed_mesh_run_equals_one_device_configured_with_the_same_head_groups(extra):
  """Each model shard owns its heads' pages and selects within them: head_groups = model shards."""
  from adakv_jax.press import make_press

  cfg, params = tiny_model(num_kv_heads=2, num_heads=4)
  prompts = random_prompts([70, 33, 52, 40], seed=4)
  press = make_press("ada-snapkv", **{"budget": 20, "window": 4, "backend": "xla", **extra})
  mesh = sharding.make_mesh(data=2, model=2)
  res = gen.generate(
    sharding.shard_params(params, mesh), cfg, prompts, max_new_tokens=4, press=press, backend="xla", mesh=mesh
  )
  assert res.press.head_groups == 2
  ref = gen.generate(
    params, cfg, prompts, max_new_tokens=4, press=press.replace(head_groups=2), backend="xla"
  )
  assert res.token_ids == ref.token_ids
  np.testing.assert_array_equal(res.budgets, ref.budgets)
  with pytest.raises(ValueError, match="head_groups=3 is not a multiple of the mesh's model axis"):
    gen.generate(params, cfg, prompts, max_new_tokens=2, press=press.replace(head_groups=3), mesh=mesh)
