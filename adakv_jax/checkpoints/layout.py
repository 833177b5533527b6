"""HF-named tensors -> our params pytree (Linear weights [in, out], layers stacked for lax.scan).

Both loaders go through here: the safetensors loader reads HF names directly and the GGUF loader renames
llama.cpp's tensors to HF names first, so shape validation and stacking live in one place. Names, shapes
and transposes come from the parameter table, adakv_jax/params.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from adakv_jax import params as params_lib
from adakv_jax.checkpoints.errors import CheckpointError
from adakv_jax.config import ModelConfig

# Buffers some checkpoints carry that the forward recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def numpy_dtype(dtype: str):
  """numpy dtype for a config dtype name (bfloat16 is ml_dtypes', which jnp.bfloat16 is)."""
  if dtype == "float32":
    return np.dtype(np.float32)
  if dtype == "bfloat16":
    return np.dtype(jnp.bfloat16)
  raise CheckpointError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")


def _shape_hint(cfg: ModelConfig) -> str:
  return (
    f"hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
    f"num_heads={cfg.num_heads}, num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, "
    f"vocab_size={cfg.vocab_size}"
  )


def _list(names, limit=8) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_names(cfg: ModelConfig, available: Iterable[str], source: str) -> None:
  """Missing tensors and tensors we would silently drop (e.g. an o_proj bias) are both errors."""
  expected = params_lib.hf_shapes(cfg)
  available = set(available)
  missing = [n for n in expected if n not in available]
  if missing:
    raise CheckpointError(f"{source}: missing {len(missing)} tensor(s) the config needs: {_list(missing)}")
  ignorable = params_lib.tolerated_hf_names(cfg)
  extra = [
    n for n in available if n not in expected and n not in ignorable and not n.endswith(IGNORED_SUFFIXES)
  ]
  if extra:
    raise CheckpointError(
      f"{source}: {len(extra)} tensor(s) this Llama-family forward has no place for (an unsupported "
      f"variant, or a config that disagrees with the weights): {_list(extra)}"
    )


def params_from_hf(
  cfg: ModelConfig, fetch: Callable[[str], np.ndarray], available: Iterable[str], source: str
) -> dict:
  """Builds the params pytree from a tensor getter keyed by HF names, validating every shape.

  Per-layer tensors are written straight into one preallocated [L, ...] host array each, so peak host
  memory is about one copy of the model, then moved to the device.
  """
  check_names(cfg, available, source)
  np_dt = numpy_dtype(cfg.dtype)

  def get(name: str, p: params_lib.Param) -> np.ndarray:
    x = fetch(name)
    if tuple(x.shape) != p.hf_shape(cfg):
      raise CheckpointError(
        f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected {p.hf_shape(cfg)} "
        f"from the config ({_shape_hint(cfg)})"
      )
    if not np.issubdtype(x.dtype, np.floating) and x.dtype != np.dtype(jnp.bfloat16):
      raise CheckpointError(f"{source}: tensor {name!r} has non-float dtype {x.dtype}")
    return x.T if p.transposed else x

  def assemble(p: params_lib.Param) -> jax.Array:
    names = p.hf_names(cfg)
    if not p.stacked:
      return jnp.asarray(np.ascontiguousarray(get(names[0], p), dtype=np_dt))
    out = np.empty(p.shape(cfg), np_dt)
    for i, name in enumerate(names):
      out[i] = get(name, p)
    return jnp.asarray(out)

  return jax.tree.map(assemble, params_lib.param_specs(cfg))


def check_params(cfg: ModelConfig, params, source: str) -> None:
  """Raises CheckpointError unless `params` has exactly the keys and shapes `cfg` implies."""
  want = params_lib.param_shapes(cfg)
  flat_want = {
    jax.tree_util.keystr(k): s
    for k, s in jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0]
  }
  flat_have = {
    jax.tree_util.keystr(k): tuple(x.shape) for k, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  missing, extra = sorted(set(flat_want) - set(flat_have)), sorted(set(flat_have) - set(flat_want))
  if missing or extra:
    raise CheckpointError(
      f"{source}: params do not match the config: missing {missing or 'none'}, unexpected {extra or 'none'}"
    )
  for k, s in flat_want.items():
    if flat_have[k] != s:
      raise CheckpointError(f"{source}: params{k} has shape {flat_have[k]}, expected {s}")
