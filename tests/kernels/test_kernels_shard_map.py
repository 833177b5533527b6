"""The kernels inside jax.shard_map on 8 simulated CPU devices (tests/conftest.py asks XLA for them).

Decode attention shards either the batch or the KV heads (each device runs the kernel on its slice,
no communication); the top-k selection shards the batch (it couples the heads of a sequence, so heads
must stay together).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.cross_head_topk import cross_head_topk, cross_head_topk_reference
from pallas_kernels.ragged_decode_attention import (ragged_decode_attention,
                                                    ragged_decode_attention_reference)

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs 8 devices: XLA_FLAGS was set before tests/conftest.py")


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))


@pytest.mark.parametrize("spec", [P("data"), P(None, "data")], ids=["batch", "kv_heads"])
def test_decode_attention_in_shard_map(spec):
  b, k, g, c, d = (8, 2, 2, 64, 64) if spec == P("data") else (2, 8, 2, 64, 64)
  rng = np.random.default_rng(0)
  lens = jnp.asarray(rng.choice([0, 1, 16, 17, 64, 40], size=(b, k)), jnp.int32)
  q = jnp.asarray(rng.standard_normal((b, k, g, d)), jnp.float32)
  kc, vc = (jnp.asarray(rng.standard_normal((b, k, c, d)), jnp.float32) for _ in "kv")
  mesh = _mesh()
  kernel = lambda *a: ragged_decode_attention(*a, block_size=16, num_splits=2, backend="pallas",
                                              interpret=True)
  run = jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=spec, out_specs=spec))
  args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, kc, vc, lens)]
  out = run(*args)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, spec), out.ndim)
  np.testing.assert_allclose(out, ragged_decode_attention_reference(q, kc, vc, lens), atol=1e-5)


def test_cross_head_topk_in_shard_map():
  b, h, n, cap = 8, 3, 16, 6
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.choice(np.array([1.0, 0.5, -np.inf], np.float32), size=(b, h, n)))
  total = jnp.asarray(rng.integers(0, h * cap + 2, size=b), jnp.int32)
  floor = jnp.asarray(rng.integers(0, cap + 1, size=b), jnp.int32)
  mesh = _mesh()
  select = lambda s, t, f: cross_head_topk(s, t, f, cap, backend="pallas", interpret=True)
  run = jax.jit(jax.shard_map(select, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  args = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (scores, total, floor)]
  keep, budgets = run(*args)
  keep_ref, budgets_ref = cross_head_topk_reference(scores, total, floor, cap)
  np.testing.assert_array_equal(keep, keep_ref)
  np.testing.assert_array_equal(budgets, budgets_ref)
