"""The KV cache: padded-plus-mask per head, shared by the full and the compressed paths.

Layers are stacked on a leading axis so the model can `lax.scan` over them (one compiled layer body).
Entry j of head h of sequence b is live iff j < lengths[l, b, h]; everything past it is padding whose
content never matters. Keys are stored after RoPE, so the order of entries is irrelevant to attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


class CacheCapacityError(RuntimeError):
  """Raised before a write that would run past the cache's static capacity."""


@struct.dataclass
class KVCache:
  k: jax.Array  # [layers, batch, heads, capacity, head_dim]
  v: jax.Array  # [layers, batch, heads, capacity, head_dim]
  lengths: jax.Array  # [layers, batch, heads] int32: live entries per head
  pos: jax.Array  # [batch] int32: absolute position (RoPE) of the next token

  @classmethod
  def empty(cls, layers: int, batch: int, heads: int, capacity: int, head_dim: int, dtype) -> "KVCache":
    shape = (layers, batch, heads, capacity, head_dim)
    return cls(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        lengths=jnp.zeros((layers, batch, heads), jnp.int32),
        pos=jnp.zeros((batch,), jnp.int32),
    )

  @property
  def capacity(self) -> int:
    return self.k.shape[3]

  @property
  def num_heads(self) -> int:
    return self.k.shape[2]

  def nbytes(self) -> int:
    """Bytes the cache occupies on device (allocated, padding included)."""
    return sum(int(x.size) * x.dtype.itemsize for x in (self.k, self.v, self.lengths, self.pos))

  def live_bytes(self) -> int:
    """Bytes of K/V entries that are live (kept); nbytes() / live_bytes() is the padding overhead."""
    per_entry = 2 * self.k.shape[-1] * self.k.dtype.itemsize
    return int(jnp.sum(self.lengths)) * per_entry

  def rollback(self, lengths: jax.Array, pos: jax.Array) -> "KVCache":
    """Forget everything appended after a saved (lengths, pos): entries past a head's length are dead."""
    return self.replace(lengths=lengths, pos=pos)

  def check_room(self, new_tokens: int) -> None:
    """Host-side guard before appending `new_tokens` tokens (one device read of the lengths)."""
    longest = int(jnp.max(self.lengths)) if self.lengths.size else 0
    if longest + new_tokens > self.capacity:
      raise CacheCapacityError(
          f"KV cache capacity exhausted: a head holds {longest} of {self.capacity} entries and "
          f"{new_tokens} more token(s) were asked for; allocate a larger capacity (max_new_tokens / "
          f"extra_capacity)")

