"""Backend switch for the kernels: `auto | xla | pallas`.

`auto` picks the Pallas kernels where they compile to native code (TPU, GPU) and the XLA reference on
CPU, where Pallas only runs in the (slow) interpreter. Every kernel still runs on CPU with
`backend="pallas"`, in interpret mode, which is how the tests check them against the references.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ("auto", "xla", "pallas")
LOWERINGS = ("tpu", "triton")


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


def resolve_interpret(interpret, lowering: str):
  """What to pass as pallas_call(interpret=...): None -> default_interpret(); True -> for the TPU-style
  kernels, JAX's TPU interpreter (pltpu.InterpretParams: simulated DMAs and SMEM/VMEM, NaN-filled
  uninitialised memory, out-of-bounds reads raise; it also runs inside shard_map with check_vma=True,
  where the generic interpreter cannot evaluate an index map that reads a scalar-prefetched array).
  Any other value (False, an InterpretParams object) passes through."""
  interpret = default_interpret() if interpret is None else interpret
  if interpret is True and lowering == "tpu":
    return pltpu.InterpretParams()
  return interpret


def resolve_lowering(lowering: str | None) -> str:
  """Which Pallas lowering to use: None -> 'triton' on GPU, else the TPU-style (Mosaic) kernel.

  On CPU the TPU-style kernel is the one interpreted, since its scalar prefetch and clamped index maps
  are what keep skipped blocks from being fetched on TPU; the Triton variant interprets as well.
  """
  if lowering is None:
    return "triton" if platform() == "gpu" else "tpu"
  if lowering not in LOWERINGS:
    raise ValueError(f"unknown lowering {lowering!r}; expected one of {', '.join(LOWERINGS)}")
  return lowering


def varying_axes(*xs: jax.Array) -> jax.sharding.ManualAxisType:
  """The mesh axes a kernel's outputs vary over: the union of its inputs'.

  Inside `jax.shard_map` (check_vma=True by default) pallas_call needs every out_shape to say this;
  outside shard_map the set is empty and changes nothing.
  """
  varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in xs))
  return jax.sharding.ManualAxisType(varying=varying)
