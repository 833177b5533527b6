"""Backend switch for the kernels: `auto | xla | pallas`.

`auto` picks the Pallas kernels where they compile to native code (TPU, GPU) and the XLA reference on
CPU, where Pallas only runs in the (slow) interpreter. Every kernel still runs on CPU with
`backend="pallas"`, in interpret mode, which is how the tests check them against the references.
"""

from __future__ import annotations

import jax

BACKENDS = ("auto", "xla", "pallas")


def platform() -> str:
  """The default device's platform: 'cpu', 'gpu' or 'tpu' (ROCm and CUDA both report 'gpu')."""
  return jax.default_backend()


def resolve_backend(backend: str) -> str:
  """Maps `auto | xla | pallas` to the concrete 'xla' or 'pallas'."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of {', '.join(BACKENDS)}")
  if backend == "auto":
    return "pallas" if platform() in ("tpu", "gpu") else "xla"
  return backend


def default_interpret() -> bool:
  """Pallas must be interpreted where there is no Mosaic/Triton compiler: on CPU."""
  return platform() not in ("tpu", "gpu")


def resolve_interpret(interpret: bool | None) -> bool:
  return default_interpret() if interpret is None else bool(interpret)


def default_lowering() -> str:
  """Which Pallas lowering to use: 'triton' on GPU, else the TPU-style (Mosaic) kernel.

  On CPU the TPU-style kernel is the one interpreted, since its scalar prefetch and clamped index maps
  are what keep skipped blocks from being fetched on TPU; the Triton variant interprets as well.
  """
  return "triton" if platform() == "gpu" else "tpu"
