"""adakv-jax: Ada-KV head-wise adaptive KV-cache eviction in JAX/Pallas.

cfg, params, tok = adakv_jax.load_model("smollm2-135m")
press = adakv_jax.make_press("ada-snapkv", budget=128)
res = adakv_jax.generate(params, cfg, [tok.encode(text)], press=press, max_new_tokens=64)
"""

__version__ = "0.1.0"

from adakv_jax.cache import CacheCapacityError, CachePlan, PagedKVCache, plan_cache
from adakv_jax.checkpoints import (
  CheckpointError,
  ContextMismatchError,
  Tokenizer,
  load_context,
  load_model,
  save_context,
  save_converted,
)
from adakv_jax.config import ConfigError, ModelConfig, RopeScaling
from adakv_jax.generation import (
  CompressedContext,
  GenerationResult,
  PromptError,
  Sampling,
  answer_questions,
  compress_context,
  decode_step,
  generate,
)
from adakv_jax.layer_cache import (
  LayerCache,
  append_kv,
  attend,
  compress_prompt,
  layer_of,
  plan_layers,
  stack_layers,
  window_queries,
)
from adakv_jax.model import append, forward_full, init_params, prefill
from adakv_jax.nnx_model import LlamaNNX
from adakv_jax.press import PRESETS, Press, make_press

__all__ = [
  "PRESETS",
  "CacheCapacityError",
  "CachePlan",
  "CheckpointError",
  "CompressedContext",
  "ConfigError",
  "ContextMismatchError",
  "GenerationResult",
  "LayerCache",
  "LlamaNNX",
  "ModelConfig",
  "PagedKVCache",
  "PromptError",
  "Press",
  "RopeScaling",
  "Sampling",
  "Tokenizer",
  "answer_questions",
  "append",
  "append_kv",
  "attend",
  "compress_context",
  "compress_prompt",
  "decode_step",
  "forward_full",
  "generate",
  "init_params",
  "layer_of",
  "load_context",
  "load_model",
  "make_press",
  "plan_cache",
  "plan_layers",
  "prefill",
  "save_context",
  "save_converted",
  "stack_layers",
  "window_queries",
]
