"""Model configuration for the Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2).

One frozen, hashable dataclass: it is passed to jitted functions as a static argument.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


class ConfigError(ValueError):
  """A checkpoint's configuration is missing a field or names something we do not support."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 style frequency-dependent RoPE scaling ('llama3'), or linear position interpolation."""

  kind: str = "llama3"  # "llama3" | "linear"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  architecture: str  # "llama" | "mistral" | "qwen2"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v projection bias (Qwen2)
  sliding_window: int | None = None  # recorded, not used: we attend over the whole prompt
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  dtype: str = "float32"  # compute/parameter dtype: "float32" | "bfloat16"

  def __post_init__(self):
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise ConfigError(
        f"unknown architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
      )
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

  @property
  def group_size(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf_dict(cls, cfg: Mapping[str, Any], dtype: str = "float32") -> ModelConfig:
    """Reads a transformers config.json, in the 4.x (top-level rope_theta/rope_scaling) or 5.x
    (rope_parameters) layout."""
    model_type = cfg.get("model_type")
    arch = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}.get(model_type)
    if arch is None:
      raise ConfigError(
        f"unknown architecture: model_type={model_type!r} (architectures={cfg.get('architectures')}); "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
      )

    def need(key):
      if key not in cfg:
        raise ConfigError(f"config.json is missing required field {key!r}")
      return cfg[key]

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)

    rope = dict(cfg.get("rope_parameters") or {})  # transformers 5.x
    legacy = cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling_src = rope if rope.get("rope_type", "default") != "default" else legacy
    rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default")) if scaling_src else "default"
    scaling = None
    if rope_type == "llama3":
      scaling = RopeScaling(
        kind="llama3",
        factor=float(scaling_src["factor"]),
        low_freq_factor=float(scaling_src.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling_src.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling_src.get("original_max_position_embeddings", 8192)),
      )
    elif rope_type == "linear":
      scaling = RopeScaling(kind="linear", factor=float(scaling_src["factor"]))
    elif rope_type not in ("default", None):
      raise ConfigError(f"unsupported rope scaling type {rope_type!r} (supported: llama3, linear)")

    eos = cfg.get("eos_token_id")
    eos_ids = (
      tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])) if eos is not None else ()
    )
    return cls(
      architecture=arch,
      vocab_size=int(need("vocab_size")),
      hidden_size=hidden,
      intermediate_size=int(need("intermediate_size")),
      num_layers=int(need("num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      rope_theta=float(theta),
      rope_scaling=scaling,
      max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
      sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "mistral") else None,
      bos_token_id=cfg.get("bos_token_id"),
      eos_token_ids=eos_ids,
      dtype=dtype,
    )


def rope_frequencies(cfg: ModelConfig):
  """Inverse frequencies [head_dim // 2], with Llama 3 / linear scaling applied (numpy, float64)."""
  import numpy as np

  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
  s = cfg.rope_scaling
  if s is None:
    return inv
  if s.kind == "linear":
    return inv / s.factor
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor
  )
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  return np.where(medium, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
