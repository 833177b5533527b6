"""The one place that maps logical axes to mesh axes.

Data parallel over sequences ("data"), tensor parallel over heads and the MLP ("model"). Everything
else is replicated. Jitted prefill/append run under GSPMD from these input shardings; the Pallas
kernels, which XLA cannot partition, run per shard under `jax.shard_map` (see kernel_shard_map).
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from adakv_jax import params as params_lib
from adakv_jax.cache import KVCache
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
}

CACHE_AXES = KVCache(k=("layers", "batch", "kv_heads", "capacity", "head_dim"),
                     v=("layers", "batch", "kv_heads", "capacity", "head_dim"),
                     lengths=("layers", "batch", "kv_heads"), pos=("batch",))


def spec(axes) -> P:
  return P(*(LOGICAL_TO_MESH[a] for a in axes))


def make_mesh(data: int = 1, model: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ("data", "model") mesh with Auto axes, so GSPMD propagates shardings through the model."""
  devices = devices if devices is not None else jax.devices()
  if data * model > len(devices):
    raise ValueError(f"mesh {data}x{model} needs {data * model} devices, only {len(devices)} present")
  return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices[:data * model])


def check_fits(cfg: ModelConfig, mesh, batch: int | None = None, cache_heads: int | None = None) -> None:
  """Clear errors for shapes that a mesh axis does not divide."""
  model = mesh.shape["model"]
  for what, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                  ("intermediate_size", cfg.intermediate_size), ("cache heads", cache_heads)):
    if n is not None and n % model:
      raise ValueError(f"{what}={n} is not divisible by the mesh's model axis ({model})")
  if batch is not None and batch % mesh.shape["data"]:
    raise ValueError(f"batch={batch} is not divisible by the mesh's data axis ({mesh.shape['data']})")


def param_shardings(cfg: ModelConfig, mesh) -> dict:
  """The params pytree of `cfg` with each leaf's NamedSharding (e.g. jit out_shardings for init)."""
  return jax.tree.map(lambda axes: NamedSharding(mesh, spec(axes)), params_lib.param_axes(cfg),
                      is_leaf=lambda x: isinstance(x, tuple))


def shard_params(params, mesh):
  """Places each leaf by its logical axes in the parameter table (an unknown leaf is a KeyError)."""
  def put(path, x):
    axes = params_lib.param_at(tuple(k.key for k in path)).axes
    return jax.device_put(x, NamedSharding(mesh, spec(axes)))

  return jax.tree_util.tree_map_with_path(put, params)


def cache_shardings(mesh) -> KVCache:
  return jax.tree.map(lambda axes: NamedSharding(mesh, spec(axes)), CACHE_AXES,
                      is_leaf=lambda x: isinstance(x, tuple))


def shard_cache(cache: KVCache, mesh) -> KVCache:
  return jax.device_put(cache, cache_shardings(mesh))


def batch_sharding(mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def kernel_shard_map(fn, *, in_axes, out_axes):
  """Wraps a per-shard kernel in shard_map when traced under a mesh (jax.set_mesh); else returns it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a) for a in in_axes), out_specs=spec(out_axes),
                       check_vma=False)

