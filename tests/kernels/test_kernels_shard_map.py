"""The kernels inside jax.shard_map on 8 simulated CPU devices (tests/conftest.py asks XLA for them).

Paged attention shards either the batch or the KV heads, and the page pool along N: each device holds
its own slice of the pool, and its slice of the page table names pages of that slice by local id, so
the kernel runs on each device as it would alone, with no communication. The top-k selection shards
the batch (it couples the heads of a sequence, so heads must stay together).

The mesh leaves CPU device 0 out: JAX's TPU interpreter runs its callbacks' array operations on that
device while every mesh device waits at the interpreter's cross-device barrier, so a mesh that includes
device 0 can deadlock (seen with jax 0.10.2, intermittently).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.cross_head_topk import cross_head_topk, cross_head_topk_reference
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from tests.kernels.gating import default_lowering
from tests.kernels.paged_cases import paged_case

SHARDS = 4
pytestmark = pytest.mark.skipif(
  jax.device_count() < SHARDS + 1, reason="needs 5 devices: XLA_FLAGS was set before tests/conftest.py"
)


def _mesh():
  return jax.make_mesh(
    (SHARDS,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[1 : SHARDS + 1]
  )


def _sharded_paged_case(axis, g=2, t=1, d=64, page=8, max_pages=4):
  """Global arrays made of 8 local cases, plus the page table in global ids (for the reference)."""
  b, k = (1, 2) if axis == 0 else (2, 1)  # per shard
  n_local = b * k * max_pages + 2  # room for every head's pages, at random places, and spares
  cap = page * max_pages
  rng = np.random.default_rng(axis)
  lens = rng.permutation([0, 1, page, page + 1, cap, *rng.integers(1, cap + 1, size=2 * SHARDS - 5)])
  parts = [
    paged_case(
      10 + i, b, k, g, t, d, page, max_pages, num_pages=n_local, lens_BK=lens[2 * i : 2 * i + 2].reshape(b, k)
    )
    for i in range(SHARDS)
  ]
  q, kp, vp, table, lens = (
    np.concatenate(
      [np.asarray(p[j], np.float32 if j < 3 else np.int32) for p in parts], axis=0 if j in (1, 2) else axis
    )
    for j in range(5)
  )
  offset = np.concatenate(
    [np.full(np.asarray(p[3]).shape, i * n_local) for i, p in enumerate(parts)], axis=axis
  )
  live = np.arange(max_pages) < -(-lens // page)[..., None]
  global_table = np.where(live, table + offset, -1)
  return tuple(map(jnp.asarray, (q, kp, vp, table, lens))), jnp.asarray(global_table, jnp.int32)


@pytest.mark.parametrize("backend", ["pallas", "xla"])
@pytest.mark.parametrize("axis", [0, 1], ids=["batch", "kv_heads"])
def test_paged_attention_in_shard_map(axis, backend):
  (q, kp, vp, table, lens), global_table = _sharded_paged_case(axis)
  head = P("data") if axis == 0 else P(None, "data")
  specs = (head, P("data"), P("data"), head, head)  # the pools shard along N
  mesh = _mesh()
  kernel = functools.partial(
    paged_attention, backend=backend, lowering=default_lowering(), pages_per_block=2, num_splits=2
  )
  run = jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=head))
  args = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip((q, kp, vp, table, lens), specs)]
  out = run(*args)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, head), out.ndim)
  want = paged_attention_reference(q, kp, vp, global_table, lens)
  assert not np.isnan(np.asarray(out)).any()
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_cross_head_topk_in_shard_map():
  b, h, n, cap = 8, 3, 16, 6
  rng = np.random.default_rng(1)
  scores = jnp.asarray(rng.choice(np.array([1.0, 0.5, -np.inf], np.float32), size=(b, h, n)))
  total = jnp.asarray(rng.integers(0, h * cap + 2, size=b), jnp.int32)
  floor = jnp.asarray(rng.integers(0, cap + 1, size=b), jnp.int32)
  mesh = _mesh()
  select = lambda s, t, f: cross_head_topk(s, t, f, cap, backend="pallas")
  run = jax.jit(jax.shard_map(select, mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  args = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (scores, total, floor)]
  keep, budgets = run(*args)
  keep_ref, budgets_ref = cross_head_topk_reference(scores, total, floor, cap)
  np.testing.assert_array_equal(keep, keep_ref)
  np.testing.assert_array_equal(budgets, budgets_ref)
