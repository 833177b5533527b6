"""The Llama-family model as a Flax NNX module: the functional params as `nnx.Param`s, nothing else.

    m = LlamaNNX.from_params(cfg, params)          # or LlamaNNX(cfg, rngs=nnx.Rngs(0))
    logits_BV, cache, info = m.prefill(tokens_BL, len_B, rng, press=press, plan=plan, chunk=chunk)
    logits_BV, cache = m(next_BT, cache)           # model.append_step: T new tokens against the cache

Every method calls the pure functions of model.py on `m.params` (the same pytree, read off the Params),
so the module splits, merges and jits like any NNX module (`nnx.split`, `nnx.merge`, `nnx.jit`) and
computes exactly what the functional path computes. Layers stay stacked on a leading axis, as in
params.py: one Param per tensor, not one module per layer, so the prefill scan is the functional one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from adakv_jax import model as model_lib
from adakv_jax.cache import CachePlan, PagedKVCache
from adakv_jax.config import ModelConfig
from adakv_jax.params import init_params, param_shapes


class LlamaNNX(nnx.Module):
  """cfg is static (part of the graph definition); the tensors are `nnx.Param`s named as in params.py."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, params: dict | None = None):
    if (rngs is None) == (params is None):
      raise ValueError("give exactly one of rngs (random init, params.init_params) and params")
    if params is None:
      params = init_params(cfg, rngs.params())
    _check_tree(cfg, params)
    self.cfg = cfg
    self.embed = nnx.Param(params["embed"])
    self.layers = nnx.Dict({k: nnx.Param(v) for k, v in params["layers"].items()})
    self.final_norm = nnx.Param(params["final_norm"])
    self.lm_head = nnx.Param(params["lm_head"]) if "lm_head" in params else None

  @classmethod
  def from_params(cls, cfg: ModelConfig, params: dict) -> LlamaNNX:
    return cls(cfg, params=params)

  @property
  def params(self) -> dict:
    """The functional params pytree (the Params' current values)."""
    tree = {
      "embed": self.embed[...],
      "layers": {k: p[...] for k, p in self.layers.items()},
      "final_norm": self.final_norm[...],
    }
    if self.lm_head is not None:
      tree["lm_head"] = self.lm_head[...]
    return tree

  def prefill(
    self, tokens_BL: jax.Array, len_B: jax.Array, rng: jax.Array, *, press, plan: CachePlan, chunk: int
  ):
    """model.prefill: (last-token logits [B, V], PagedKVCache, info) for a right-padded batch."""
    return model_lib.prefill(
      self.params, tokens_BL, len_B, rng, cfg=self.cfg, press=press, plan=plan, chunk=chunk
    )

  def __call__(
    self,
    tokens_BT: jax.Array,
    cache: PagedKVCache,
    n_valid_B: jax.Array | None = None,
    *,
    backend: str = "auto",
    all_logits: bool = False,
  ):
    """model.append_step: T new tokens (n_valid_B real ones, default all) -> (logits, cache).

    The cache is donated when called outside a jit (use the returned one). No host-side room check, so it
    traces under nnx.jit: check cache.check_room(T) first, or size the plan's room for every token."""
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    if n_valid_B is None:
      n_valid_B = jnp.full((tokens_BT.shape[0],), tokens_BT.shape[1], jnp.int32)
    return model_lib.append_step(
      self.params,
      tokens_BT,
      jnp.asarray(n_valid_B, jnp.int32),
      cache,
      cfg=self.cfg,
      backend=backend,
      all_logits=all_logits,
    )

  def forward_full(self, tokens_BL: jax.Array) -> jax.Array:
    """model.forward_full: logits [B, L, V] of an unpadded batch, no cache."""
    return model_lib.forward_full(self.params, tokens_BL, self.cfg)


def _check_tree(cfg: ModelConfig, params: dict) -> None:
  got, want = jax.tree.map(lambda x: tuple(x.shape), params), param_shapes(cfg)
  if got != want:
    raise ValueError(f"params do not match the config's shapes: got {got}, expected {want}")


__all__ = ["LlamaNNX"]
