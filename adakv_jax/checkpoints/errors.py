"""Error types of the checkpoint layer (kept apart so every loader can raise them without import cycles)."""

from adakv_jax.config import ConfigError


class CheckpointError(ValueError):
  """A checkpoint cannot be read: missing, truncated or corrupted files, or tensors that do not fit the
  config."""


__all__ = ["CheckpointError", "ConfigError"]
