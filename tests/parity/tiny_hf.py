"""Builds tiny random checkpoints offline (no hub): transformers dirs, GGUF files, and a tokenizer.

Two HF builders share one config per variant:
  * `build` uses transformers' `save_pretrained` (the real thing; parity tests, needs torch);
  * `build_numpy` writes the same layout with numpy + safetensors only (loader tests run without torch).
`build_gguf` converts either to a GGUF the way llama.cpp's converter does (q/k row permutation included).
Sizes keep a checkpoint to a few hundred KB and a forward to milliseconds, with distinct H, Hkv, hd and F so a
transposed or swapped tensor cannot pass a shape check by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = (
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
  "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS = [
  "The quick brown fox jumps over the lazy dog.",
  "Ada-KV allocates the cache budget across heads adaptively.",
  "def forward(params, tokens):\n    return logits  # 1234567\n",
  "Llamas, Mistrals and Qwens share one decoder layout.",
  "Tabs\tand  spaces   and\nnewlines\n\nshould survive.",
]
_LLAMA3_ROPE = {
  "rope_type": "llama3",
  "rope_theta": 500000.0,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}
# Our per-layer parameter names -> transformers' (written out here, apart from the library's own table).
HF_LAYER_NAMES = {
  "wq": "self_attn.q_proj.weight",
  "wk": "self_attn.k_proj.weight",
  "wv": "self_attn.v_proj.weight",
  "wo": "self_attn.o_proj.weight",
  "w_gate": "mlp.gate_proj.weight",
  "w_up": "mlp.up_proj.weight",
  "w_down": "mlp.down_proj.weight",
  "attn_norm": "input_layernorm.weight",
  "mlp_norm": "post_attention_layernorm.weight",
  "bq": "self_attn.q_proj.bias",
  "bk": "self_attn.k_proj.bias",
  "bv": "self_attn.v_proj.bias",
}

VARIANTS = {
  "llama_mha_untied": dict(
    model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False
  ),
  "llama_gqa_tied": dict(
    model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
  ),
  "llama3_scaled": dict(
    model_type="llama",
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
    rope_parameters=_LLAMA3_ROPE,
  ),
  "mistral_gqa": dict(
    model_type="mistral",
    num_attention_heads=4,
    num_key_value_heads=1,
    tie_word_embeddings=False,
    sliding_window=None,
  ),
  "qwen2_gqa_tied": dict(
    model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
  ),
  "qwen2_mha_untied": dict(
    model_type="qwen2", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False
  ),
}
ARCH_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def build_tokenizer(vocab_size: int = 320):
  """A byte-level BPE tokenizer trained in-process on a few sentences (deterministic)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIALS),
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(CORPUS * 4, trainer=trainer)
  return tok


def write_tokenizer(path: Path, tok) -> None:
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>", "special": True},
        "unk_token": "<|endoftext|>",
        "chat_template": CHATML,
        "model_max_length": 512,
      }
    )
  )


def config_dict(
  variant: str,
  vocab_size: int,
  *,
  hidden_size: int = 48,
  intermediate_size: int = 80,
  head_dim: int = 12,
  num_layers: int = 3,
) -> dict:
  """A transformers 5.x-layout config.json for `variant`."""
  kw = dict(VARIANTS[variant])
  cfg = dict(
    architectures=[ARCH_CLASS[kw["model_type"]]],
    vocab_size=vocab_size,
    hidden_size=hidden_size,
    intermediate_size=intermediate_size,
    num_hidden_layers=num_layers,
    head_dim=head_dim,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
  )
  cfg.update(kw)
  return cfg


def random_state_dict(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """HF-named float32 tensors for `cfg`. Norms != 1 and biases != 0 so any swap changes the output."""
  rs = np.random.RandomState(seed)
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  hq = cfg["num_attention_heads"] * cfg["head_dim"]
  hk = cfg["num_key_value_heads"] * cfg["head_dim"]
  w = lambda *s: (0.08 * rs.standard_normal(s)).astype(np.float32)
  norm = lambda n: (1.0 + 0.1 * rs.standard_normal(n)).astype(np.float32)
  sd = {"model.embed_tokens.weight": w(v, d)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    sd.update(
      {
        p + "input_layernorm.weight": norm(d),
        p + "self_attn.q_proj.weight": w(hq, d),
        p + "self_attn.k_proj.weight": w(hk, d),
        p + "self_attn.v_proj.weight": w(hk, d),
        p + "self_attn.o_proj.weight": w(d, hq),
        p + "post_attention_layernorm.weight": norm(d),
        p + "mlp.gate_proj.weight": w(f, d),
        p + "mlp.up_proj.weight": w(f, d),
        p + "mlp.down_proj.weight": w(d, f),
      }
    )
    if cfg["model_type"] == "qwen2":
      sd.update(
        {
          p + "self_attn.q_proj.bias": w(hq) + 0.1,
          p + "self_attn.k_proj.bias": w(hk) + 0.1,
          p + "self_attn.v_proj.bias": w(hk) + 0.1,
        }
      )
  sd["model.norm.weight"] = norm(d)
  if not cfg["tie_word_embeddings"]:
    sd["lm_head.weight"] = w(v, d)
  return sd


def write_safetensors(path: Path, sd: dict[str, np.ndarray], shard_bytes: int | None = None) -> None:
  """save_pretrained's file layout: model.safetensors, or model-0000i-of-0000n + index.json."""
  from safetensors.numpy import save_file

  if shard_bytes is None:
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return
  shards, cur, size = [], {}, 0
  for name, x in sd.items():
    if cur and size + x.nbytes > shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[name], size = x, size + x.nbytes
  shards.append(cur)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, str(path / fname), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, fname))
  index = {"metadata": {"total_size": sum(x.nbytes for x in sd.values())}, "weight_map": weight_map}
  (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_numpy(
  path, variant: str = "llama_gqa_tied", *, shard: bool = False, seed: int = 0, **sizes
) -> Path:
  """A tiny checkpoint dir written without torch/transformers (config.json, safetensors, tokenizer)."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tok = build_tokenizer()
  cfg = config_dict(variant, tok.get_vocab_size(), **sizes)
  (path / "config.json").write_text(json.dumps(cfg, indent=2))
  write_safetensors(path, random_state_dict(cfg, seed), shard_bytes=40_000 if shard else None)
  write_tokenizer(path, tok)
  return path


def build(
  path,
  variant: str = "llama_gqa_tied",
  *,
  shard: bool = False,
  dtype: str = "float32",
  seed: int = 0,
  **sizes,
) -> Path:
  """A tiny checkpoint dir written by transformers' save_pretrained (safetensors; sharded if `shard`)."""
  import torch
  import transformers

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tok = build_tokenizer()
  cfg = config_dict(variant, tok.get_vocab_size(), **sizes)
  model_type = cfg.pop("model_type")
  cfg.pop("architectures")
  config = transformers.AutoConfig.for_model(model_type, **cfg)
  model = getattr(transformers, ARCH_CLASS[model_type])(config)
  sd = random_state_dict({**cfg, "model_type": model_type}, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  model.generation_config.eos_token_id = None  # parity runs a fixed number of steps
  model.generation_config.pad_token_id = 0
  if dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB" if shard else "1GB")
  write_tokenizer(path, tok)
  return path


def to_legacy_config(path) -> dict:
  """Rewrites config.json in the transformers 4.x layout (top-level rope_theta / rope_scaling)."""
  file = Path(path) / "config.json"
  cfg = json.loads(file.read_text())
  rope = dict(cfg.pop("rope_parameters", None) or {})
  cfg["rope_theta"] = rope.pop("rope_theta", 10000.0)
  if rope.get("rope_type", "default") != "default":
    rope["type"] = rope.pop("rope_type")  # the oldest spelling
    cfg["rope_scaling"] = rope
  file.write_text(json.dumps(cfg, indent=2))
  return cfg


def load_reference(path):
  """The transformers model for a checkpoint dir, float32, eval mode."""
  import torch
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def read_state_dict(path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint dir (single or sharded) as float32 numpy."""
  from safetensors.numpy import load_file

  out = {}
  for f in sorted(Path(path).glob("*.safetensors")):
    out.update({k: np.asarray(v, np.float32) for k, v in load_file(str(f)).items()})
  return out


# --- GGUF ------------------------------------------------------------------------------------------

_GGUF_BLOCK = {
  "input_layernorm": "attn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "post_attention_layernorm": "ffn_norm",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf LlamaModel.permute: HF rotate_half rows -> interleaved pairs."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
  if hf == "model.embed_tokens.weight":
    return "token_embd.weight"
  if hf == "model.norm.weight":
    return "output_norm.weight"
  if hf == "lm_head.weight":
    return "output.weight"
  parts = hf.split(".")
  return f"blk.{parts[2]}.{_GGUF_BLOCK['.'.join(parts[3:-1])]}.{parts[-1]}"


def build_gguf(
  path,
  hf_dir,
  *,
  qtype: str = "Q8_0",
  pre: str = "llama-bpe",
  add_bos: bool = True,
  user_defined: tuple[str, ...] = ("<think>",),
  name: str = "tiny",
) -> Path:
  """Converts a tiny HF checkpoint dir (Llama/Mistral/Qwen2) to GGUF as llama.cpp's converter would.

  `qtype` applies to 2-D weights (norms stay F32). Tokenizer metadata: tokens/merges/token types, `pre`,
  BOS/EOS/UNK ids, add_bos and the chat template; `user_defined` tokens are appended as USER_DEFINED and
  get embedding rows of their own. Quantised types need hidden/intermediate sizes that are multiples of 32.
  """
  import gguf

  hf_dir = Path(hf_dir)
  cfg = json.loads((hf_dir / "config.json").read_text())
  arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
  sd = read_state_dict(hf_dir)
  tok = json.loads((hf_dir / "tokenizer.json").read_text())
  tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
  types = [3 if t in SPECIALS else 1 for t in tokens] + [4] * len(user_defined)
  tokens += list(user_defined)
  merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
  if user_defined:
    extra = (
      np.random.RandomState(1).normal(0, 0.08, (len(user_defined), cfg["hidden_size"])).astype(np.float32)
    )
    sd["model.embed_tokens.weight"] = np.concatenate([sd["model.embed_tokens.weight"], extra])
    if "lm_head.weight" in sd:
      sd["lm_head.weight"] = np.concatenate([sd["lm_head.weight"], extra[::-1]])
  if cfg.get("tie_word_embeddings"):
    sd.pop("lm_head.weight", None)

  path = Path(path)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name(name)
  w.add_context_length(cfg["max_position_embeddings"])
  w.add_embedding_length(cfg["hidden_size"])
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_dimension_count(cfg["head_dim"])
  w.add_key_length(cfg["head_dim"])
  w.add_value_length(cfg["head_dim"])
  w.add_rope_freq_base((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  w.add_vocab_size(len(tokens))
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(merges)
  w.add_bos_token_id(tokens.index(SPECIALS[1]))
  w.add_eos_token_id(tokens.index(SPECIALS[2]))
  w.add_unk_token_id(tokens.index(SPECIALS[0]))
  w.add_add_bos_token(add_bos)
  w.add_chat_template(CHATML)
  q = getattr(gguf.GGMLQuantizationType, qtype)
  for hf, x in sd.items():
    if arch == "llama" and ".self_attn.q_proj." in hf:
      x = llama_cpp_permute(x, cfg["num_attention_heads"])
    elif arch == "llama" and ".self_attn.k_proj." in hf:
      x = llama_cpp_permute(x, cfg["num_key_value_heads"])
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 2 and q != gguf.GGMLQuantizationType.F32:
      w.add_tensor(gguf_name(hf), gguf.quants.quantize(x, q), raw_dtype=q)
    else:
      w.add_tensor(gguf_name(hf), x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path
