"""Per-layer selectable budgets B'_l (ADAKV_SPEC 3.6): flat, or PyramidKV's linear pyramid.

B' is the selectable part of the per-head budget (the window excluded). Both schedules keep the sum over
layers exactly num_layers * B', so a pyramid moves budget between layers without changing the total.
Inputs are int32 arrays [B] (one B' per sequence, possibly traced); outputs are int32 [num_layers, B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SCHEDULES = ("flat", "pyramid")


def flat(selectable_B: jax.Array, num_layers: int) -> jax.Array:
  """Every layer gets the same B'."""
  bp_B = jnp.asarray(selectable_B, jnp.int32)
  return jnp.broadcast_to(bp_B[None, :], (num_layers, bp_B.shape[0]))


def pyramid(
  selectable_B: jax.Array, num_layers: int, beta: int, prefix_B: jax.Array | None = None
) -> jax.Array:
  """Linear from max = 2B' - min at layer 0 down to min = B' // beta at the last layer.

  With prefix_B (evictable entries per head, len - w), a max above the prefix is clipped to it and min
  raised to 2B' - max, as PyramidKV does: lower layers cannot use more than the whole prefix, so the
  budget they would waste goes to the upper layers instead. A prefix within B' gives a flat schedule.
  The real-valued line sums to exactly num_layers * B' (max + min = 2B'); its values are floored in
  exact integer arithmetic and the rounding remainder goes, one each, to the layers with the largest
  fractional parts (ties: lower layer first), so the integer sum is exact too.
  """
  bp_B = jnp.asarray(selectable_B, jnp.int32)
  if num_layers == 1:
    return bp_B[None, :]
  n1 = num_layers - 1
  lo_B = bp_B // beta
  hi_B = 2 * bp_B - lo_B
  if prefix_B is not None:
    hi_B = jnp.minimum(hi_B, jnp.maximum(jnp.asarray(prefix_B, jnp.int32), bp_B))
    lo_B = 2 * bp_B - hi_B
  layer = jnp.arange(num_layers, dtype=jnp.int32)[:, None]
  num_NB = hi_B[None, :] * n1 - (hi_B - lo_B)[None, :] * layer  # value * (n - 1)
  base_NB = num_NB // n1
  frac_NB = num_NB % n1
  rem_B = num_layers * bp_B - jnp.sum(base_NB, axis=0)
  order_NB = jnp.argsort(-frac_NB, axis=0, stable=True)
  rank_NB = jnp.argsort(order_NB, axis=0, stable=True)
  return base_NB + (rank_NB < rem_B[None, :]).astype(jnp.int32)


def layer_selectable(
  schedule: str, selectable_B: jax.Array, num_layers: int, beta: int, prefix_B: jax.Array | None = None
) -> jax.Array:
  """B'_l for every layer and sequence: int32 [num_layers, B]."""
  if schedule == "flat":
    return flat(selectable_B, num_layers)
  if schedule == "pyramid":
    return pyramid(selectable_B, num_layers, beta, prefix_B)
  raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def max_selectable(schedule: str, selectable: int, num_layers: int, beta: int) -> int:
  """Static (host) largest B'_l over layers for a given B': what the padded cache must hold."""
  if schedule == "pyramid" and num_layers > 1:
    return 2 * selectable - selectable // beta
  return selectable
