"""Checkpoint loading: transformers safetensors dirs, llama.cpp GGUF files, and our own orbax saves.

`load_model(name_or_path)` picks the loader; every loader returns params in the model's layout
(Linear weights [in, out], layers stacked on a leading axis; see adakv_jax/params.py) and validates every
shape.
"""

from __future__ import annotations

import os
from pathlib import Path

from adakv_jax.checkpoints.contexts import ContextMismatchError, load_context, save_context
from adakv_jax.checkpoints.errors import CheckpointError, ConfigError
from adakv_jax.checkpoints.gguf import load_gguf
from adakv_jax.checkpoints.hf import load_hf_checkpoint
from adakv_jax.checkpoints.layout import check_params
from adakv_jax.checkpoints.orbax_io import (
  SaveTargetError,
  check_save_target,
  is_converted_dir,
  load_converted,
  save_converted,
)
from adakv_jax.checkpoints.registry import REGISTRY, is_registered, resolve_model
from adakv_jax.checkpoints.tokenizer import ChatTemplateError, Tokenizer


def load_model(name_or_path: str | os.PathLike, dtype: str = "float32"):
  """(ModelConfig, params, Tokenizer) from a registry name, a .gguf file, a transformers dir or an orbax
  save."""
  if isinstance(name_or_path, str) and is_registered(name_or_path) and not Path(name_or_path).exists():
    name_or_path = resolve_model(name_or_path)
  path = Path(name_or_path)
  if path.suffix.lower() == ".gguf" or (path.is_file() and _has_gguf_magic(path)):
    cfg, params, meta = load_gguf(path, dtype)
    return cfg, params, Tokenizer.from_gguf_metadata(meta)
  if path.is_dir() and is_converted_dir(path):
    cfg, params, tok = load_converted(path)
    if tok is None:
      raise CheckpointError(f"{str(path)!r} was saved without a tokenizer")
    if cfg.dtype != dtype:
      cfg, params = _cast(cfg, params, dtype)
    return cfg, params, tok
  if path.is_dir() and (path / "config.json").is_file():
    cfg, params = load_hf_checkpoint(path, dtype)
    return cfg, params, Tokenizer.from_hf_dir(path)
  if not path.exists():
    raise CheckpointError(
      f"{str(name_or_path)!r} is neither a registered model name nor an existing path "
      f"(registered: {', '.join(sorted(REGISTRY))})"
    )
  raise CheckpointError(
    f"do not know how to load {str(path)!r}: expected a .gguf file, a transformers checkpoint dir "
    f"(config.json + safetensors) or a dir written by save_converted"
  )


def _has_gguf_magic(path: Path) -> bool:
  with open(path, "rb") as fh:
    return fh.read(4) == b"GGUF"


def _cast(cfg, params, dtype):
  import jax
  import jax.numpy as jnp

  cfg = cfg.replace(dtype=dtype)  # validates the name
  return cfg, jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)


__all__ = [
  "ChatTemplateError",
  "CheckpointError",
  "ConfigError",
  "ContextMismatchError",
  "load_context",
  "save_context",
  "SaveTargetError",
  "Tokenizer",
  "check_params",
  "check_save_target",
  "load_converted",
  "load_gguf",
  "load_hf_checkpoint",
  "load_model",
  "resolve_model",
  "save_converted",
]
