"""Every parameter of the Llama-family model, described once.

One row per tensor: where it sits in the params pytree, its logical axes, how it is initialised, its
transformers checkpoint name and whether the checkpoint stores it transposed. The logical axes also fix the
shape (each axis has one size in a ModelConfig, see `axis_sizes`), so random init, the loaders' shape checks
and stacking (checkpoints/layout.py) and the sharding specs (sharding.py) are all read off `PARAMS`: adding
or renaming a parameter is one row here.

Our layout: Linear weights are [in, out] (transformers' are [out, in]) and per-layer tensors are stacked on
a leading "layers" axis for lax.scan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from adakv_jax.config import ModelConfig


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
  """Size of each logical axis a parameter has; "heads"/"kv_heads" are flattened heads * head_dim."""
  return {
    "layers": cfg.num_layers,
    "embed": cfg.hidden_size,
    "heads": cfg.num_heads * cfg.head_dim,
    "kv_heads": cfg.num_kv_heads * cfg.head_dim,
    "mlp": cfg.intermediate_size,
    "vocab": cfg.vocab_size,
  }


def _always(cfg: ModelConfig) -> bool:
  return True


def _biased(cfg: ModelConfig) -> bool:
  return cfg.attention_bias


def _untied(cfg: ModelConfig) -> bool:
  return not cfg.tie_word_embeddings


@dataclasses.dataclass(frozen=True)
class Param:
  """One tensor. A pytree leaf, so `param_specs(cfg)` maps like the params themselves."""

  path: tuple[str, ...]  # keys in the params pytree
  axes: tuple[str, ...]  # logical axes; sharding.LOGICAL_TO_MESH maps them to mesh axes
  hf_name: str  # transformers' name; "{i}" stands for the layer index of a stacked tensor
  transposed: bool = False  # the checkpoint holds the transpose of one layer's tensor (Linear [out, in])
  init_std: float | None = 1.0  # normal init's std in units of init_params' `scale`; None: ones (norms)
  present: Callable[[ModelConfig], bool] = _always  # whether `cfg` has this tensor at all
  # A checkpoint may still carry it when `present` is false (transformers saves a tied lm_head).
  tolerated_when_absent: bool = False

  @property
  def stacked(self) -> bool:
    return self.axes[0] == "layers"

  def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    sizes = axis_sizes(cfg)
    return tuple(sizes[a] for a in self.axes)

  def hf_names(self, cfg: ModelConfig) -> list[str]:
    """The checkpoint tensors this one is assembled from: one per layer if stacked."""
    if self.stacked:
      return [self.hf_name.format(i=i) for i in range(cfg.num_layers)]
    return [self.hf_name]

  def hf_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of each checkpoint tensor in `hf_names`."""
    shape = self.shape(cfg)[1:] if self.stacked else self.shape(cfg)
    return shape[::-1] if self.transposed else shape


def _layer(key: str, axes: tuple[str, ...], hf_suffix: str, **kw) -> Param:
  """A per-layer tensor: stacked on a leading "layers" axis, named model.layers.{i}.<hf_suffix>."""
  return Param(("layers", key), ("layers", *axes), "model.layers.{i}." + hf_suffix, **kw)


PARAMS: tuple[Param, ...] = (
  Param(("embed",), ("vocab", "embed"), "model.embed_tokens.weight", init_std=50.0),
  _layer("attn_norm", ("embed",), "input_layernorm.weight", init_std=None),
  _layer("wq", ("embed", "heads"), "self_attn.q_proj.weight", transposed=True),
  _layer("wk", ("embed", "kv_heads"), "self_attn.k_proj.weight", transposed=True),
  _layer("wv", ("embed", "kv_heads"), "self_attn.v_proj.weight", transposed=True),
  _layer("wo", ("heads", "embed"), "self_attn.o_proj.weight", transposed=True),
  _layer("bq", ("heads",), "self_attn.q_proj.bias", present=_biased),
  _layer("bk", ("kv_heads",), "self_attn.k_proj.bias", present=_biased),
  _layer("bv", ("kv_heads",), "self_attn.v_proj.bias", present=_biased),
  _layer("mlp_norm", ("embed",), "post_attention_layernorm.weight", init_std=None),
  _layer("w_gate", ("embed", "mlp"), "mlp.gate_proj.weight", transposed=True),
  _layer("w_up", ("embed", "mlp"), "mlp.up_proj.weight", transposed=True),
  _layer("w_down", ("mlp", "embed"), "mlp.down_proj.weight", transposed=True),
  Param(("final_norm",), ("embed",), "model.norm.weight", init_std=None),
  Param(
    ("lm_head",),
    ("embed", "vocab"),
    "lm_head.weight",
    transposed=True,
    present=_untied,
    tolerated_when_absent=True,
  ),
)
_BY_PATH = {p.path: p for p in PARAMS}


def param_at(path: Sequence[str]) -> Param:
  """The row for a params-pytree key path, e.g. ("layers", "wq")."""
  path = tuple(path)
  if path not in _BY_PATH:
    raise KeyError(
      f"params{''.join(f'[{k!r}]' for k in path)} is not a parameter of the model "
      f"(known: {', '.join('/'.join(p) for p in _BY_PATH)})"
    )
  return _BY_PATH[path]


def param_specs(cfg: ModelConfig) -> dict:
  """The params pytree's structure for `cfg`, with a `Param` at each leaf."""
  tree: dict = {}
  for p in PARAMS:
    if p.present(cfg):
      node = tree
      for k in p.path[:-1]:
        node = node.setdefault(k, {})
      node[p.path[-1]] = p
  return tree


def _map(fn: Callable[[Param], object], cfg: ModelConfig) -> dict:
  return jax.tree.map(fn, param_specs(cfg))


def param_shapes(cfg: ModelConfig) -> dict:
  """The params pytree with each leaf's shape (tuples); the contract between loaders and the model."""
  return _map(lambda p: p.shape(cfg), cfg)


def param_axes(cfg: ModelConfig) -> dict:
  """The params pytree with each leaf's logical axes (tuples of names in sharding.LOGICAL_TO_MESH)."""
  return _map(lambda p: p.axes, cfg)


def param_dtype(cfg: ModelConfig):
  return jnp.dtype(jnp.bfloat16) if cfg.dtype == "bfloat16" else jnp.dtype(jnp.float32)


def abstract_params(cfg: ModelConfig) -> dict:
  """The params pytree as jax.ShapeDtypeStructs (for eval_shape, restoring, sizing)."""
  dt = param_dtype(cfg)
  return _map(lambda p: jax.ShapeDtypeStruct(p.shape(cfg), dt), cfg)


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every checkpoint tensor `cfg` implies: transformers name -> transformers shape."""
  return {name: p.hf_shape(cfg) for p in PARAMS if p.present(cfg) for name in p.hf_names(cfg)}


def tolerated_hf_names(cfg: ModelConfig) -> set[str]:
  """Checkpoint tensors `cfg` has no use for but a faithful checkpoint may carry (a tied lm_head)."""
  return {name for p in PARAMS if p.tolerated_when_absent and not p.present(cfg) for name in p.hf_names(cfg)}


def init_params(cfg: ModelConfig, key: jax.Array, scale: float = 0.02) -> dict:
  """Random parameters in our layout (tests, benchmarks): normal(0, init_std * scale), norms ones.

  One key per tensor, split from `key` in the order of `param_specs(cfg)`'s leaves.
  """
  specs = param_specs(cfg)
  leaves, treedef = jax.tree.flatten(specs)
  keys = jax.random.split(key, len(leaves))
  dt = param_dtype(cfg)

  def init(p: Param, k: jax.Array) -> jax.Array:
    if p.init_std is None:
      return jnp.ones(p.shape(cfg), dt)
    return (p.init_std * scale * jax.random.normal(k, p.shape(cfg))).astype(dt)

  return jax.tree.unflatten(treedef, [init(p, k) for p, k in zip(leaves, keys)])
