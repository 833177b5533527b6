"""Saved compressed contexts: compress a document once, answer questions about it in later processes.

Layout of a saved context:
  adakv_context.json  format marker, the press, the prompt lengths, page size, cache dtype, the model's
                      fingerprint, the tokenizer's hash, free-form meta, and the name, size and crc32 of
                      every other file; written last, so a dir without it is never taken for a save
  entries/            orbax tree: k, v [E, D] (every head's kept entries, packed: no page padding and no
                      decode room), positions [E] (each entry's prompt position), lengths [L, B, H'], pos [B]

The saved bytes are at most the kept entries' plus 4 bytes of position per entry and orbax's metadata
(orbax compresses the arrays: 0.93x the kept bytes on SmolLM2). Restoring lays the entries out again
(cache.cache_from_entries) with the room the questions need, exactly as the cache of a direct
question-agnostic run. A context restores only into the model and with the press that
made it: keys and values are that model's, and the kept set is that press's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from adakv_jax.checkpoints.errors import CheckpointError
from adakv_jax.checkpoints.orbax_io import (
  _check_files_present,
  _some,
  check_target,
  config_to_dict,
  read_format_json,
  restore_tree,
  write_and_swap,
  write_marker,
)

CONTEXT_MARKER = "adakv_context.json"
CONTEXT_FORMAT = "adakv-jax/context-v1"
CONTEXT_ENTRIES = frozenset({CONTEXT_MARKER, "entries"})
_SAVED = object()  # load_context's default press: the one the context was saved with


class ContextMismatchError(CheckpointError):
  """A saved context restored into another model, with another tokenizer or another press."""


def model_fingerprint(cfg, params) -> str:
  """sha256 of the config, every parameter's path, shape and dtype, and 64 values spread over each
  parameter (cheap: a few small device reads), so another checkpoint of the same shapes differs too."""
  import jax

  h = hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True, default=str).encode())
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    flat = x.reshape(-1)
    idx = np.unique(np.linspace(0, flat.shape[0] - 1, 64).astype(np.int64))
    h.update(f"{jax.tree_util.keystr(path)}:{tuple(x.shape)}:{x.dtype}".encode())
    h.update(np.asarray(flat[idx], np.float32).tobytes())
  return h.hexdigest()


def tokenizer_hash(tokenizer) -> str | None:
  """sha256 of the tokenizer's serialised JSON and chat template (what encodes the questions)."""
  if tokenizer is None:
    return None
  h = hashlib.sha256(tokenizer.backend.to_str().encode())
  h.update((tokenizer.chat_template or "").encode())
  return h.hexdigest()


def press_to_dict(press) -> dict | None:
  return dataclasses.asdict(press) if press is not None else None


def press_from_dict(d: dict | None):
  from adakv_jax.press import Press

  return Press(**d) if d is not None else None


def check_context_target(path, overwrite: bool = False) -> None:
  """Raises SaveTargetError unless `path` is absent, empty or (with overwrite) a saved context."""
  check_target(
    path,
    overwrite,
    marker=CONTEXT_MARKER,
    entries=CONTEXT_ENTRIES,
    kind="a saved adakv-jax context",
    short="a saved context",
  )


def save_context(
  path: str | os.PathLike, context, *, cfg, params, tokenizer=None, overwrite: bool = False
) -> Path:
  """Writes a CompressedContext (generation.compress_context) under `path`, with the fingerprint of the
  model and the hash of the tokenizer it must be restored with. Single-process caches only."""
  import orbax.checkpoint as ocp

  from adakv_jax.cache import live_entries

  path = Path(path).absolute()
  check_context_target(path, overwrite)
  k, v, lengths = live_entries(context.cache)
  positions = _packed_positions(np.asarray(context.positions), lengths)
  tree = {
    "k": k,
    "v": v,
    "positions": positions,
    "lengths": lengths.astype(np.int32),
    "pos": np.asarray(context.cache.pos, np.int32),
  }
  meta = {
    "format": CONTEXT_FORMAT,
    "model_fingerprint": model_fingerprint(cfg, params),
    "tokenizer_sha256": tokenizer_hash(tokenizer),
    "press": press_to_dict(context.press),
    "prompt_lens": [int(n) for n in context.prompt_lens],
    "page_size": context.page_size,
    "dtype": str(k.dtype),
    "kept_entries": int(lengths.sum()),
    "kept_bytes": int(k.nbytes + v.nbytes),
    "retained_mass": (None if context.retained_mass is None else np.asarray(context.retained_mass).tolist()),
    "prefill_s": float(context.prefill_s),
    "meta": dict(context.meta),
  }

  def write(out: Path) -> None:
    with contextlib.closing(ocp.StandardCheckpointer()) as ckpt:
      ckpt.save(out / "entries", tree)
      ckpt.wait_until_finished()
    write_marker(out, CONTEXT_MARKER, meta)

  return write_and_swap(path, write)


def _packed_positions(positions_LBHC: np.ndarray, lengths_LBH: np.ndarray) -> np.ndarray:
  live = np.arange(positions_LBHC.shape[-1]) < lengths_LBH[..., None]
  return positions_LBHC[live].astype(np.int32)


def saved_bytes(path: str | os.PathLike) -> int:
  """Bytes of every file of a save, the marker included."""
  return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def read_context_marker(path: str | os.PathLike) -> dict:
  """The marker of a complete save; a dir without it (an interrupted save leaves none) is refused."""
  path = Path(path).absolute()
  if not (path / CONTEXT_MARKER).is_file():
    what = "does not exist" if not path.exists() else f"has no {CONTEXT_MARKER}"
    raise CheckpointError(
      f"{str(path)!r} is not a saved adakv-jax context: it {what} (a save writes it "
      "last, so an interrupted save is never complete)"
    )
  return read_format_json(path / CONTEXT_MARKER, CONTEXT_FORMAT)


def _damaged(path: Path, what: str) -> CheckpointError:
  return CheckpointError(f"the saved context {str(path)!r} is incomplete or corrupted: {what}; save it again")


def load_context(path: str | os.PathLike, *, cfg, params, tokenizer=None, press=_SAVED):
  """The CompressedContext saved under `path`, for `answer_questions`.

  Refused with ContextMismatchError when cfg/params are not the model the context was compressed with,
  when a tokenizer is given and differs from the saver's, or when `press` is given (None = the full
  cache) and is not the press that compressed it (backends aside); by default the saved press is used.
  """
  from adakv_jax.cache import cache_from_entries
  from adakv_jax.generation import CompressedContext
  from adakv_jax.press import press_label

  path = Path(path).absolute()
  meta = read_context_marker(path)
  _check_files_present(path, meta.get("files", {}), damaged=_damaged)
  if meta["model_fingerprint"] != model_fingerprint(cfg, params):
    raise ContextMismatchError(
      f"the saved context {str(path)!r} was compressed by another model (fingerprint "
      f"{meta['model_fingerprint'][:12]}, this model's is {model_fingerprint(cfg, params)[:12]}): its keys "
      "and values mean nothing to this model; load the model it was saved with, or compress again"
    )
  mine, theirs = tokenizer_hash(tokenizer), meta.get("tokenizer_sha256")
  if mine is not None and theirs is not None and mine != theirs:
    raise ContextMismatchError(
      f"the saved context {str(path)!r} was encoded by another tokenizer (sha256 "
      f"{theirs[:12]}, this one's is {mine[:12]}): its questions would be encoded "
      "differently"
    )
  saved = press_from_dict(meta["press"])
  if press is not _SAVED and not _same_press(press, saved):
    raise ContextMismatchError(
      f"the saved context {str(path)!r} was compressed with press {press_label(saved)} "
      f"({_differences(saved, press)}); it cannot be restored with {press_label(press)}: the kept entries "
      "are that press's choice (omit the press to use the saved one, or compress again)"
    )
  tree = restore_tree(path, "entries", meta.get("files"), damaged=_damaged)
  tree = {k: np.asarray(x) for k, x in tree.items()}
  lengths = tree["lengths"]
  cache = cache_from_entries(tree["k"], tree["v"], lengths, tree["pos"], room=0, page_size=meta["page_size"])
  return CompressedContext(
    cache=cache,
    press=saved,
    prompt_lens=list(meta["prompt_lens"]),
    positions=_unpacked_positions(tree["positions"], lengths),
    retained_mass=None
    if meta.get("retained_mass") is None
    else np.asarray(meta["retained_mass"], np.float32),
    prefill_s=float(meta.get("prefill_s", 0.0)),
    meta=dict(meta.get("meta") or {}),
  )


def _same_press(a, b) -> bool:
  if a is None or b is None:
    return a is None and b is None
  return a.replace(backend=b.backend) == b


def _differences(saved, given) -> str:
  if saved is None or given is None:
    return "the full cache" if saved is None else "a compressing press"
  diff = [
    f"{f.name}={getattr(saved, f.name)!r} vs {getattr(given, f.name)!r}"
    for f in dataclasses.fields(saved)
    if f.name != "backend" and getattr(saved, f.name) != getattr(given, f.name)
  ]
  return _some(diff)


def _unpacked_positions(positions_E: np.ndarray, lengths_LBH: np.ndarray) -> np.ndarray:
  width = max(int(lengths_LBH.max()), 1)
  out = np.full(lengths_LBH.shape + (width,), -1, np.int32)
  out[np.arange(width) < lengths_LBH[..., None]] = positions_E
  return out


__all__ = [
  "CONTEXT_MARKER",
  "ContextMismatchError",
  "check_context_target",
  "load_context",
  "model_fingerprint",
  "read_context_marker",
  "save_context",
  "saved_bytes",
  "tokenizer_hash",
]
