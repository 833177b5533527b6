"""Loads a transformers checkpoint directory (config.json + safetensors, single file or sharded)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from adakv_jax.checkpoints.errors import CheckpointError
from adakv_jax.checkpoints.layout import params_from_hf
from adakv_jax.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(path: str | os.PathLike, dtype: str = "float32") -> ModelConfig:
  """ModelConfig from `path/config.json` (transformers 4.x or 5.x layout)."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
  if not path.is_dir():
    raise CheckpointError(f"{str(path)!r} is not a directory (expected a transformers checkpoint dir)")
  cfg_file = path / "config.json"
  if not cfg_file.is_file():
    raise CheckpointError(f"{str(path)!r} has no config.json, so it is not a transformers checkpoint")
  try:
    raw = json.loads(cfg_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
  if not isinstance(raw, dict):
    raise CheckpointError(f"{cfg_file} must hold a JSON object, got {type(raw).__name__}")
  return ModelConfig.from_hf_dict(raw, dtype=dtype)


def _weight_files(path: Path) -> dict[str, Path]:
  """Tensor name -> the safetensors file that holds it."""
  index = path / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from None
    files = {name: path / shard for name, shard in weight_map.items()}
    absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
    if absent:
      raise CheckpointError(f"{index} names shard(s) that are not in {str(path)!r}: {', '.join(absent)}")
    return files
  single = path / SINGLE_FILE
  if single.is_file():
    return {name: single for name in _open_and_list(single)}
  if any(path.glob("*.bin")) or any(path.glob("*.pt")):
    raise CheckpointError(
      f"{str(path)!r} holds only PyTorch pickle weights; re-save it with "
      f"save_pretrained(..., safe_serialization=True) to get {SINGLE_FILE}"
    )
  raise CheckpointError(f"{str(path)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _open(file: Path):
  try:
    return safe_open(str(file), framework="numpy")
  except (SafetensorError, OSError) as e:
    raise CheckpointError(
      f"{file} is not a readable safetensors file (truncated or corrupted?): {e}"
    ) from None


def _open_and_list(file: Path) -> list[str]:
  with _open(file) as f:
    return list(f.keys())


def read_bf16_raw(file: str | os.PathLike, name: str) -> np.ndarray:
  """Decodes a BF16 tensor from the raw file (for safetensors versions whose numpy backend refuses bf16)."""
  with open(file, "rb") as fh:
    (n,) = struct.unpack("<Q", fh.read(8))
    header = json.loads(fh.read(n))
    info = header[name]
    if info["dtype"] != "BF16":
      raise CheckpointError(f"{file}: tensor {name!r} is {info['dtype']}, not BF16")
    start, end = info["data_offsets"]
    fh.seek(8 + n + start)
    buf = fh.read(end - start)
  if len(buf) != end - start:
    raise CheckpointError(f"{file}: tensor {name!r} is cut short (file truncated)")
  return np.frombuffer(buf, dtype="<u2").view(jnp.bfloat16).reshape(info["shape"])


def _get(handle, file: Path, name: str) -> np.ndarray:
  try:
    return handle.get_tensor(name)
  except (SafetensorError, TypeError, ValueError) as e:
    if handle.get_slice(name).get_dtype() == "BF16":
      return read_bf16_raw(file, name)
    raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from None


def load_hf_checkpoint(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from a transformers checkpoint dir; every tensor is shape-checked."""
  path = Path(path)
  cfg = read_hf_config(path, dtype)
  files = _weight_files(path)
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(_open(f)) for f in sorted(set(files.values()))}
    for f, h in handles.items():  # an index that promises tensors a shard lacks is a broken checkpoint
      have = set(h.keys())
      lost = [n for n, g in files.items() if g == f and n not in have]
      if lost:
        raise CheckpointError(f"{INDEX_FILE} places {lost[0]!r} in {f.name}, which does not contain it")

    def fetch(name: str) -> np.ndarray:
      return _get(handles[files[name]], files[name], name)

    params = params_from_hf(cfg, fetch, files.keys(), source=str(path))
  return cfg, params
