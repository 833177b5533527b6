"""The one place that maps logical axes to mesh axes.

Data parallel over sequences ("data"), tensor parallel over heads and the MLP ("model"). Everything
else is replicated. Jitted prefill/append run under GSPMD from these input shardings; what touches the
paged cache (selection, page writes, attention) runs per shard under `jax.shard_map` (`per_shard`):
each shard's heads own the pages of its slice of every layer's pool ("pages" spans both mesh axes), and
page tables hold ids local to that slice.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from adakv_jax import params as params_lib
from adakv_jax.cache import PagedKVCache
from adakv_jax.config import ModelConfig

LOGICAL_TO_MESH = {
  "batch": "data",
  "heads": "model",  # query heads (and flattened heads * head_dim)
  "kv_heads": "model",  # cache heads
  "mlp": "model",
  "vocab": None,
  "embed": None,
  "layers": None,
  "seq": None,
  "capacity": None,
  "head_dim": None,
  "group": None,
  "tokens": None,
  "pages": ("data", "model"),  # a layer's page pool: one slice per (data, model) shard
  "page_slots": None,
}

POOL_AXES = ("pages", "page_slots", "head_dim")
HEAD_AXES = ("layers", "batch", "kv_heads")


def cache_axes(num_layers: int) -> PagedKVCache:
  """Logical axes of every array of a paged cache with `num_layers` layers."""
  return PagedKVCache(
    k_pages=(POOL_AXES,) * num_layers,
    v_pages=(POOL_AXES,) * num_layers,
    page_table=HEAD_AXES + (None,),
    num_pages=HEAD_AXES,
    lengths=HEAD_AXES,
    pos=("batch",),
  )


def spec(axes) -> P:
  return P(*(LOGICAL_TO_MESH[a] if a is not None else None for a in axes))


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def make_mesh(data: int = 1, model: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ("data", "model") mesh with Auto axes, so GSPMD propagates shardings through the model.

  On simulated CPU devices with backend="pallas", pass devices=jax.devices()[1:]: the kernels then run
  in JAX's TPU interpreter, whose callbacks compute on CPU device 0 while the mesh's devices wait at its
  cross-device barrier, and a mesh holding device 0 can deadlock (seen with jax 0.10.2).
  """
  devices = devices if devices is not None else jax.devices()
  if data * model > len(devices):
    raise ValueError(f"mesh {data}x{model} needs {data * model} devices, only {len(devices)} present")
  return jax.make_mesh(
    (data, model),
    ("data", "model"),
    axis_types=(AxisType.Auto, AxisType.Auto),
    devices=devices[: data * model],
  )


def check_fits(cfg: ModelConfig, mesh, batch: int | None = None, cache_heads: int | None = None) -> None:
  """Clear errors for shapes that a mesh axis does not divide."""
  model = mesh.shape["model"]
  for what, n in (
    ("num_heads", cfg.num_heads),
    ("num_kv_heads", cfg.num_kv_heads),
    ("intermediate_size", cfg.intermediate_size),
    ("cache heads", cache_heads),
  ):
    if n is not None and n % model:
      raise ValueError(f"{what}={n} is not divisible by the mesh's model axis ({model})")
  if batch is not None and batch % mesh.shape["data"]:
    raise ValueError(f"batch={batch} is not divisible by the mesh's data axis ({mesh.shape['data']})")


def param_shardings(cfg: ModelConfig, mesh) -> dict:
  """The params pytree of `cfg` with each leaf's NamedSharding (e.g. jit out_shardings for init)."""
  return jax.tree.map(
    lambda axes: NamedSharding(mesh, spec(axes)),
    params_lib.param_axes(cfg),
    is_leaf=lambda x: isinstance(x, tuple),
  )


def shard_params(params, mesh):
  """Places each leaf by its logical axes in the parameter table (an unknown leaf is a KeyError)."""

  def put(path, x):
    axes = params_lib.param_at(tuple(k.key for k in path)).axes
    return jax.device_put(x, NamedSharding(mesh, spec(axes)))

  return jax.tree_util.tree_map_with_path(put, params)


def cache_shardings(mesh, num_layers: int) -> PagedKVCache:
  return jax.tree.map(lambda axes: NamedSharding(mesh, spec(axes)), cache_axes(num_layers), is_leaf=_is_axes)


def shard_cache(cache: PagedKVCache, mesh) -> PagedKVCache:
  return jax.device_put(cache, cache_shardings(mesh, cache.num_layers))


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def mesh_shards() -> tuple[int, int]:
  """(data, model) shards of the mesh being traced under (jax.set_mesh), (1, 1) without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return 1, 1
  return mesh.shape.get("data", 1), mesh.shape.get("model", 1)


def to_host(tree):
  """Every leaf as a numpy array on this host, whole: arrays that span other processes' devices (a
  multi-host mesh) are all-gathered, which every process must then call in step."""
  import numpy as np
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


def per_shard(fn, *, in_axes, out_axes):
  """Runs `fn` once per mesh shard (jax.shard_map) when traced under a mesh; else returns it.

  in_axes / out_axes: pytrees of logical-axes tuples, one per argument / output leaf.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return fn
  to_spec = lambda tree: jax.tree.map(spec, tree, is_leaf=_is_axes)
  return jax.shard_map(
    fn, mesh=mesh, in_specs=to_spec(tuple(in_axes)), out_specs=to_spec(out_axes), check_vma=False
  )
