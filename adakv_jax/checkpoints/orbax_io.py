"""Saves/loads a converted model (params via orbax, config JSON, tokenizer files) for fast reloads.

Layout of a save dir:
  adakv_model.json   format marker + ModelConfig (dataclasses.asdict, RopeScaling nested)
  params/            orbax StandardCheckpointer tree
  tokenizer.json, tokenizer_config.json   (Tokenizer.save; absent when saved without a tokenizer)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from adakv_jax.checkpoints.errors import CheckpointError
from adakv_jax.checkpoints.layout import check_params
from adakv_jax.config import ModelConfig, RopeScaling

MARKER = "adakv_model.json"
FORMAT = "adakv-jax/orbax-v1"


def is_converted_dir(path: str | os.PathLike) -> bool:
  return (Path(path) / MARKER).is_file()


def config_to_dict(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise CheckpointError(f"saved config has fields this version does not know: {', '.join(unknown)}")
  return ModelConfig(**d)


def save_converted(path: str | os.PathLike, cfg: ModelConfig, params, tokenizer=None, *,
                   overwrite: bool = False) -> Path:
  """Writes params (orbax), the config and the tokenizer under `path`."""
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  if path.exists():
    if not overwrite and any(path.iterdir()):
      raise CheckpointError(f"{str(path)!r} exists and is not empty; pass overwrite=True to replace it")
    shutil.rmtree(path)
  path.mkdir(parents=True)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(path / "params", params)
  ckpt.wait_until_finished()
  if tokenizer is not None:
    tokenizer.save(path)
  (path / MARKER).write_text(json.dumps({"format": FORMAT, "config": config_to_dict(cfg)}, indent=2))
  return path


def load_converted(path: str | os.PathLike):
  """(ModelConfig, params, Tokenizer | None) from a directory written by save_converted."""
  import orbax.checkpoint as ocp

  from adakv_jax.checkpoints.tokenizer import Tokenizer

  path = Path(path).absolute()
  if not is_converted_dir(path):
    raise CheckpointError(f"{str(path)!r} is not a converted adakv-jax model (no {MARKER})")
  try:
    meta = json.loads((path / MARKER).read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path / MARKER} is not valid JSON: {e}") from None
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{path / MARKER} has format {meta.get('format')!r}, expected {FORMAT!r}")
  cfg = config_from_dict(meta["config"])
  try:
    params = ocp.StandardCheckpointer().restore(path / "params")
  except Exception as e:  # orbax raises a variety of errors for missing or damaged trees
    raise CheckpointError(f"cannot restore params from {path / 'params'}: {type(e).__name__}: {e}") from None
  check_params(cfg, params, str(path))
  tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
  return cfg, params, tok
