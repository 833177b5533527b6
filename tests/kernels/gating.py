"""Where each Pallas lowering executes: natively on its own accelerator, in the interpreter on CPU.

Kernel tests pass interpret=None (the backend default), so on a GPU they run the Triton kernels
natively and on a TPU the Mosaic ones; the other lowering cannot execute there and is skipped.
"""

import jax
import pytest

_NATIVE = {"tpu": "tpu", "triton": "gpu"}


def skip_reason(lowering: str) -> str | None:
  """Why this lowering cannot execute on the default device, or None if it can."""
  platform = jax.default_backend()
  if platform == "cpu" or _NATIVE[lowering] == platform:
    return None
  return (
    f"the {lowering} lowering executes only on {_NATIVE[lowering].upper()} or in the CPU "
    f"interpreter, not on {platform.upper()}"
  )


def lowering_param(lowering: str, *values):
  """A pytest.param whose first value is the lowering, skipped where that lowering cannot execute."""
  reason = skip_reason(lowering)
  return pytest.param(lowering, *values, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


def default_lowering() -> str:
  """The lowering the kernels pick by default on this platform (always executable here)."""
  return "triton" if jax.default_backend() == "gpu" else "tpu"
