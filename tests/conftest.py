"""Shared test setup.

XLA reads XLA_FLAGS once, when its CPU backend starts, so the 8 simulated devices (for the shard_map tests)
must be asked for here, before any test module imports jax. On a CPU-only machine the suite's time is
almost all XLA compilation of tiny programs, so LLVM's optimisation level is lowered there (it changes how
fast the code runs, not what it computes).
"""

import glob
import os

import pytest

_ON_ACCELERATOR = bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*")) or os.environ.get(
  "JAX_PLATFORMS", "cpu"
) not in ("", "cpu")
_FLAGS = ["--xla_force_host_platform_device_count=8"]
if not _ON_ACCELERATOR:
  _FLAGS += ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
os.environ.setdefault("XLA_FLAGS", " ".join(_FLAGS))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops each module's compiled executables after it: one process compiles thousands of them, and each
  holds mapped code pages (a long run otherwise nears the kernel's per-process mapping limit)."""
  yield
  import jax

  jax.clear_caches()
