"""Loads a llama.cpp GGUF file (any quantisation gguf-py can dequantise) into our params layout.

Tensors are renamed to transformers' names and llama.cpp's q/k row permutation is undone exactly as
transformers' GGUF loader does (modeling_gguf_pytorch_utils.LlamaTensorProcessor), so the result equals
what `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` holds, and the HF-layout assembly in
layout.py (shape checks, stacking) is shared with the safetensors loader.

`_GLOBAL_NAMES`/`_BLOCK_NAMES` below only translate llama.cpp names to transformers' names; shapes, and
which tensors a config needs, come from the parameter table (adakv_jax/params.py).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from adakv_jax.checkpoints.errors import CheckpointError, ConfigError
from adakv_jax.checkpoints.layout import params_from_hf
from adakv_jax.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from adakv_jax.params import hf_shapes

GGUF_MAGIC = b"GGUF"
# GGUF general.architecture -> ours. Mistral files say "llama" (same tensors, same permutation).
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
# Architectures whose converter (llama.cpp LlamaModel) permutes q/k rows for interleaved RoPE.
PERMUTED_QK = ("llama", "mistral")

_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
  "attn_norm": "input_layernorm",
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_norm": "post_attention_layernorm",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str:
  """transformers' name for a GGUF tensor; unknown tensors keep their name (and fail validation later)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _BLOCK_RE.match(gguf_name)
  if m and m.group(2) in _BLOCK_NAMES:
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
  return gguf_name


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's `permute` of q/k rows (interleaved RoPE pairs -> HF rotate_half halves)."""
  dim = w.shape[0] // n_head // 2
  return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _reader_class():
  import gguf

  class PlainArrayReader(gguf.GGUFReader):
    """GGUFReader over a plain-ndarray view of its memmap: numpy.memmap's per-slice hooks make parsing the
    ~100k metadata strings of a real vocabulary ~3x slower. Same bytes, same zero-copy mapping."""

    @property
    def data(self):
      return self._plain

    @data.setter
    def data(self, value):
      self._plain = value.view(np.ndarray)

  return PlainArrayReader


def open_reader(path: Path):
  """A GGUF reader for PATH, after checks that name what is wrong with a file that is not one."""
  if not path.exists():
    raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
  if not path.is_file():
    raise CheckpointError(f"{str(path)!r} is not a file (expected a .gguf file)")
  size = path.stat().st_size
  with open(path, "rb") as fh:
    magic = fh.read(4)
  if magic != GGUF_MAGIC:
    what = "is empty" if size == 0 else f"starts with {magic!r}, not {GGUF_MAGIC!r}"
    raise CheckpointError(f"{str(path)!r} is not a GGUF file: it {what}")
  try:
    reader = _reader_class()(path)
  except Exception as e:  # gguf-py fails with reshape/index errors deep inside on a cut-short file
    raise CheckpointError(
      f"GGUF file {str(path)!r} ({size} bytes) is truncated or corrupted: {type(e).__name__}: {e}"
    ) from None
  for t in reader.tensors:
    end = int(t.data_offset) + int(t.n_bytes)
    if end > size:
      raise CheckpointError(
        f"GGUF file {str(path)!r} is truncated: tensor {t.name!r} ends at byte {end}, file has {size}"
      )
  return reader


def read_metadata(reader) -> dict[str, Any]:
  """All key/value fields as plain Python values (strings, numbers, lists)."""
  out = {}
  for key, field in reader.fields.items():
    try:
      out[key] = field.contents()
    except (UnicodeDecodeError, ValueError, IndexError) as e:
      raise CheckpointError(f"GGUF metadata field {key!r} is unreadable (corrupted file?): {e}") from None
  return out


def config_from_metadata(meta: dict[str, Any], tensor_names, dtype: str = "float32") -> ModelConfig:
  """ModelConfig from `{arch}.*` keys; tied embeddings when there is no `output.weight`."""
  arch = meta.get("general.architecture")
  ours = ARCHITECTURES.get(arch)
  if ours is None:
    raise ConfigError(
      f"unknown architecture: GGUF general.architecture={arch!r}; "
      f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )

  def need(key):
    if f"{arch}.{key}" not in meta:
      raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
    return meta[f"{arch}.{key}"]

  hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
  kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
  head_dim = (
    meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or hidden // heads
  )
  vocab = meta.get(f"{arch}.vocab_size")
  if vocab is None:
    if "tokenizer.ggml.tokens" not in meta:
      raise CheckpointError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    vocab = len(meta["tokenizer.ggml.tokens"])
  scaling = None
  kind = meta.get(f"{arch}.rope.scaling.type", "none")
  if kind == "linear":
    scaling = RopeScaling(kind="linear", factor=float(meta[f"{arch}.rope.scaling.factor"]))
  elif kind not in ("none", None):
    raise ConfigError(f"unsupported GGUF rope scaling type {kind!r} (supported: linear)")
  if "rope_freqs.weight" in tensor_names:
    warnings.warn(
      "GGUF file has rope_freqs.weight (Llama 3.1-style RoPE scaling factors); like transformers' "
      "GGUF loader we ignore it, so positions beyond the original context may degrade",
      stacklevel=2,
    )
  eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
  return ModelConfig(
    architecture=ours,
    vocab_size=int(vocab),
    hidden_size=hidden,
    intermediate_size=int(need("feed_forward_length")),
    num_layers=int(need("block_count")),
    num_heads=heads,
    num_kv_heads=kv_heads,
    head_dim=int(head_dim),
    rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
    rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
    rope_scaling=scaling,
    max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
    tie_word_embeddings="output.weight" not in tensor_names,
    attention_bias="blk.0.attn_q.bias" in tensor_names,
    bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
    eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
    dtype=dtype,
  )


def load_gguf(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, dict, dict[str, Any]]:
  """(ModelConfig, params, metadata) from a GGUF file; metadata feeds Tokenizer.from_gguf_metadata."""
  import gguf

  path = Path(path)
  reader = open_reader(path)
  meta = read_metadata(reader)
  tensors = {t.name: t for t in reader.tensors}
  cfg = config_from_metadata(meta, tensors, dtype)
  by_hf = {hf_name(n): n for n in tensors if n != "rope_freqs.weight"}
  expected = hf_shapes(cfg)
  permuted = meta["general.architecture"] in PERMUTED_QK

  def fetch(name: str) -> np.ndarray:
    t = tensors[by_hf[name]]
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise CheckpointError(f"{path}: cannot dequantise {t.name!r} ({t.tensor_type.name}): {e}") from None
    if permuted and tuple(w.shape) == expected.get(name):  # mismatches are reported by the shape check
      if ".q_proj." in name:
        w = unpermute_rows(w, cfg.num_heads)
      elif ".k_proj." in name:
        w = unpermute_rows(w, cfg.num_kv_heads)
    return w

  params = params_from_hf(cfg, fetch, by_hf.keys(), source=str(path))
  return cfg, params, meta
