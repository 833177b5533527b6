"""Budget allocation across the heads of one layer (ADAKV_SPEC 3.5), on the cross-head top-k rule.

All three modes return a boolean keep mask over scored entries plus the per-head counts:
- uniform: each head keeps its own top total // H, nothing more (a head short of valid entries leaves
  its share unused, as SnapKV does);
- adaptive: Ada-KV. Each head reserves its top `floor`, the rest of the total goes to the globally best
  remaining entries. No per-head cap: a head may take any share, up to its own valid entries. The total
  is exact (ties broken by position, then head);
- mix: the authors' b_h = round((1 - alpha) f_h + alpha B') with f_h the floor-free adaptive budget.
  Kept for reproduction only; its total can drift by rounding.
Entries scored -inf are never kept. The same rule serves entries and whole pages (page granularity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.cross_head_topk import cross_head_topk

MODES = ("uniform", "adaptive", "mix")


def allocate(
  scores_BHN: jax.Array,
  total_B: jax.Array,
  floor_B: jax.Array,
  mode: str = "adaptive",
  *,
  alpha: float = 0.0,
  backend: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """Chooses the kept entries (or pages) of one head group.

  scores [B, H, N] float (-inf = never keep); total_B int [B]: units to keep over all heads;
  floor_B int [B]: per-head reserve (adaptive only); alpha: mix weight.
  Returns (keep_BHN bool, budgets_BH int32).
  """
  b, h, n = scores_BHN.shape
  cap = n
  total_B = jnp.broadcast_to(jnp.asarray(total_B, jnp.int32), (b,))
  floor_B = jnp.broadcast_to(jnp.asarray(floor_B, jnp.int32), (b,))
  if mode not in MODES:
    raise ValueError(f"unknown allocation mode {mode!r}; valid: {', '.join(MODES)}")
  if n == 0:
    return jnp.zeros((b, h, n), bool), jnp.zeros((b, h), jnp.int32)
  if mode == "uniform":
    keep = keep_top_per_head(scores_BHN, jnp.broadcast_to((total_B // h)[:, None], (b, h)), cap)
    return keep, jnp.sum(keep, axis=-1, dtype=jnp.int32)
  if mode == "adaptive":
    return cross_head_topk(scores_BHN, total_B, floor_B, cap, backend=backend)

  # mix: per-head budgets from the floor-free global top-k, blended towards the average.
  _, free_BH = cross_head_topk(scores_BHN, total_B, jnp.zeros_like(total_B), cap, backend=backend)
  avg_B = total_B.astype(jnp.float32) / h
  mixed_BH = (1.0 - alpha) * free_BH.astype(jnp.float32) + alpha * avg_B[:, None]
  budgets_BH = jnp.clip(jnp.floor(mixed_BH + 0.5).astype(jnp.int32), 0, cap)
  keep = keep_top_per_head(scores_BHN, budgets_BH, cap)
  return keep, jnp.sum(keep, axis=-1, dtype=jnp.int32)


def keep_top_per_head(scores_BHN: jax.Array, budgets_BH: jax.Array, cap: int) -> jax.Array:
  """Each head keeps its own best budgets_BH[b, h] (<= cap) valid entries (ties: lower position)."""
  b, h, n = scores_BHN.shape
  top_s, top_i = lax.top_k(scores_BHN.astype(jnp.float32), cap)
  rank = jnp.arange(cap, dtype=jnp.int32)[None, None, :]
  take = (rank < budgets_BH[:, :, None]) & (top_s > -jnp.inf)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  return jnp.zeros((b, h, n), bool).at[bi, hi, top_i].set(take)
