"""HF-named tensors -> our params pytree (Linear weights [in, out], layers stacked for lax.scan).

Both loaders go through here: the safetensors loader reads HF names directly and the GGUF loader renames
llama.cpp's tensors to HF names first, so shape validation and stacking live in one place.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from adakv_jax.checkpoints.errors import CheckpointError
from adakv_jax.config import ModelConfig

# name in params["layers"] -> (HF name under model.layers.{i}., transpose?)
LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
BIAS_KEYS = ("bq", "bk", "bv")
# Tensors some checkpoints carry that the forward recomputes or does not need.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def numpy_dtype(dtype: str):
  """numpy dtype for a config dtype name (bfloat16 is ml_dtypes', which jnp.bfloat16 is)."""
  if dtype == "float32":
    return np.dtype(np.float32)
  if dtype == "bfloat16":
    return np.dtype(jnp.bfloat16)
  raise CheckpointError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor (HF name -> HF shape, i.e. Linear weights [out, in]) the config implies."""
  d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_layer = {
      "input_layernorm.weight": (d,),
      "self_attn.q_proj.weight": (hq, d),
      "self_attn.k_proj.weight": (hk, d),
      "self_attn.v_proj.weight": (hk, d),
      "self_attn.o_proj.weight": (d, hq),
      "post_attention_layernorm.weight": (d,),
      "mlp.gate_proj.weight": (f, d),
      "mlp.up_proj.weight": (f, d),
      "mlp.down_proj.weight": (d, f),
  }
  if cfg.attention_bias:
    per_layer.update({"self_attn.q_proj.bias": (hq,), "self_attn.k_proj.bias": (hk,),
                      "self_attn.v_proj.bias": (hk,)})
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  for i in range(cfg.num_layers):
    shapes.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
  if not cfg.tie_word_embeddings:
    shapes["lm_head.weight"] = (v, d)
  return shapes


def _shape_hint(cfg: ModelConfig) -> str:
  return (f"hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
          f"num_heads={cfg.num_heads}, num_kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, "
          f"vocab_size={cfg.vocab_size}")


def _list(names, limit=8) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_names(cfg: ModelConfig, available: Iterable[str], source: str) -> None:
  """Missing tensors and tensors we would silently drop (e.g. an o_proj bias) are both errors."""
  expected = expected_hf_shapes(cfg)
  available = set(available)
  missing = [n for n in expected if n not in available]
  if missing:
    raise CheckpointError(f"{source}: missing {len(missing)} tensor(s) the config needs: {_list(missing)}")
  ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
  extra = [n for n in available
           if n not in expected and n not in ignorable and not n.endswith(IGNORED_SUFFIXES)]
  if extra:
    raise CheckpointError(
        f"{source}: {len(extra)} tensor(s) this Llama-family forward has no place for (an unsupported "
        f"variant, or a config that disagrees with the weights): {_list(extra)}")


def params_from_hf(cfg: ModelConfig, fetch: Callable[[str], np.ndarray], available: Iterable[str],
                   source: str) -> dict:
  """Builds the params pytree from a tensor getter keyed by HF names, validating every shape.

  Per-layer tensors are written straight into one preallocated [L, ...] host array each, so peak host
  memory is about one copy of the model, then moved to the device.
  """
  check_names(cfg, available, source)
  expected = expected_hf_shapes(cfg)
  np_dt = numpy_dtype(cfg.dtype)

  def get(name: str, transpose: bool) -> np.ndarray:
    x = fetch(name)
    if tuple(x.shape) != expected[name]:
      raise CheckpointError(
          f"{source}: tensor {name!r} has shape {tuple(x.shape)}, expected {expected[name]} "
          f"from the config ({_shape_hint(cfg)})")
    if not np.issubdtype(x.dtype, np.floating) and x.dtype != np.dtype(jnp.bfloat16):
      raise CheckpointError(f"{source}: tensor {name!r} has non-float dtype {x.dtype}")
    return x.T if transpose else x

  layers = {}
  for key, (suffix, transpose) in LAYER_TENSORS.items():
    if key in BIAS_KEYS and not cfg.attention_bias:
      continue
    first = get(f"model.layers.0.{suffix}", transpose)
    out = np.empty((cfg.num_layers, *first.shape), np_dt)
    out[0] = first
    for i in range(1, cfg.num_layers):
      out[i] = get(f"model.layers.{i}.{suffix}", transpose)
    layers[key] = jnp.asarray(out)
  params = {
      "embed": jnp.asarray(get("model.embed_tokens.weight", False).astype(np_dt)),
      "layers": layers,
      "final_norm": jnp.asarray(get("model.norm.weight", False).astype(np_dt)),
  }
  if not cfg.tie_word_embeddings:
    params["lm_head"] = jnp.asarray(np.ascontiguousarray(get("lm_head.weight", True), dtype=np_dt))
  return params


def expected_param_shapes(cfg: ModelConfig) -> dict:
  """The params pytree's shapes (our layout) for `cfg`; the contract between loaders and the model."""
  d, f, v, l = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
  hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  layers = {"attn_norm": (l, d), "wq": (l, d, hq), "wk": (l, d, hk), "wv": (l, d, hk), "wo": (l, hq, d),
            "mlp_norm": (l, d), "w_gate": (l, d, f), "w_up": (l, d, f), "w_down": (l, f, d)}
  if cfg.attention_bias:
    layers.update(bq=(l, hq), bk=(l, hk), bv=(l, hk))
  shapes = {"embed": (v, d), "layers": layers, "final_norm": (d,)}
  if not cfg.tie_word_embeddings:
    shapes["lm_head"] = (d, v)
  return shapes


def check_params(cfg: ModelConfig, params, source: str) -> None:
  """Raises CheckpointError unless `params` has exactly the keys and shapes `cfg` implies."""
  import jax

  want = expected_param_shapes(cfg)
  flat_want = {jax.tree_util.keystr(k): s for k, s in
               jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0]}
  flat_have = {jax.tree_util.keystr(k): tuple(x.shape) for k, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing, extra = sorted(set(flat_want) - set(flat_have)), sorted(set(flat_have) - set(flat_want))
  if missing or extra:
    raise CheckpointError(f"{source}: params do not match the config: missing {missing or 'none'}, "
                          f"unexpected {extra or 'none'}")
  for k, s in flat_want.items():
    if flat_have[k] != s:
      raise CheckpointError(f"{source}: params{k} has shape {flat_have[k]}, expected {s}")
