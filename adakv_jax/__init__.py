"""adakv-jax: Ada-KV head-wise adaptive KV-cache eviction in JAX/Pallas.

    cfg, params, tok = adakv_jax.load_model("smollm2-135m")
    press = adakv_jax.make_press("ada-snapkv", budget=128)
    res = adakv_jax.generation(params, cfg, [tok.encode(text)], press=press, max_new_tokens=64)
"""

__version__ = "0.1.0"

from adakv_jax.cache import CacheCapacityError, KVCache
from adakv_jax.config import ConfigError, ModelConfig, RopeScaling
from adakv_jax.generation import GenerationResult, PromptError, Sampling, decode_step, generate
from adakv_jax.model import append, forward_full, init_params, prefill


def __getattr__(name):  # the press and checkpoint packages load on first use
  if name in ("Press", "make_press", "compress_layer", "PRESETS"):
    from adakv_jax import press

    return getattr(press, name)
  if name in ("load_model", "CheckpointError"):
    from adakv_jax import checkpoints

    return getattr(checkpoints, name)
  raise AttributeError(name)
