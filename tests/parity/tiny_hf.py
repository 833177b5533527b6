"""Builds tiny random transformers checkpoints offline (no hub): configs, weights and a tokenizer.

Every builder returns the checkpoint directory; `load_reference` gives back the torch model. Sizes are
chosen so a whole checkpoint is a few hundred KB and a forward takes milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ada-KV allocates the cache budget across heads adaptively.",
    "def forward(params, tokens):\n    return logits  # 1234567\n",
    "Llamas, Mistrals and Qwens share one decoder layout.",
    "Tabs\tand  spaces   and\nnewlines\n\nshould survive.",
]

# name -> (config class, kwargs). Small but with distinct H, Hkv, hd, F so a transposed or swapped
# tensor cannot pass a shape check by accident.
VARIANTS = {
    "llama_mha_untied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4,
                                             tie_word_embeddings=False)),
    "llama_gqa_tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2,
                                           tie_word_embeddings=True)),
    "llama3_scaled": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral_gqa": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1,
                                          tie_word_embeddings=False, sliding_window=None)),
    "qwen2_gqa_tied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2,
                                           tie_word_embeddings=True)),
    "qwen2_mha_untied": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=4,
                                             tie_word_embeddings=False)),
}


def build_tokenizer(vocab_size: int = 320):
  """A byte-level BPE tokenizer trained in-process on a few sentences (deterministic)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 4, trainer=trainer)
  return tok


def write_tokenizer(path: Path, tok) -> None:
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": "<|im_start|>",
      "eos_token": {"content": "<|im_end|>", "special": True},
      "unk_token": "<|endoftext|>",
      "chat_template": CHATML,
      "model_max_length": 512,
  }))


def build(path, variant: str = "llama_gqa_tied", *, shard: bool = False, dtype: str = "float32",
          seed: int = 0, hidden_size: int = 48, intermediate_size: int = 80, head_dim: int = 12) -> Path:
  """Writes a tiny random checkpoint of `variant` to `path` (save_pretrained, safetensors).

  GGUF quantisation works on 32-wide blocks: use hidden_size/intermediate_size/head_dim multiples of 32/16
  for a checkpoint that `build_gguf` converts.
  """
  import torch
  import transformers

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tok = build_tokenizer()
  cls_name, kw = VARIANTS[variant]
  config = getattr(transformers, cls_name)(
      vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=intermediate_size,
      num_hidden_layers=3, head_dim=head_dim, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
      **kw)
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(config)
  with torch.no_grad():  # default init leaves norms at 1 and biases at 0, which hides swaps
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(0.08 * torch.randn_like(p))
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
  rope = cfg.pop("rope_parameters", None) or {}
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

  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return model.eval()


# --- GGUF ------------------------------------------------------------------------------------------

_GGUF_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf LlamaModel.permute: HF rotate_half rows -> interleaved pairs."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_gguf(path, hf_dir, *, qtype: str = "Q8_0", pre: str = "llama-bpe", add_bos: bool = True,
               user_defined: tuple[str, ...] = ("<think>",), name: str = "tiny") -> Path:
  """Converts a tiny HF checkpoint (from `build`, Llama or Qwen2) to GGUF like llama.cpp's converter would.

  The tokenizer gets llama.cpp's metadata: tokens/merges/token types, `pre`, BOS/EOS ids and the chat template;
  `user_defined` tokens are appended to the vocabulary as USER_DEFINED (the model's vocab grows with them).
  """
  import gguf
  import numpy as np
  import torch
  import transformers

  hf_dir = Path(hf_dir)
  cfg = json.loads((hf_dir / "config.json").read_text())
  arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  tok = json.loads((hf_dir / "tokenizer.json").read_text())
  vocab = tok["model"]["vocab"]
  tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
  types = [3 if t in SPECIALS else 1 for t in tokens]
  tokens += list(user_defined)
  types += [4] * len(user_defined)
  merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
  if user_defined:  # the new tokens need embedding rows
    extra = np.random.RandomState(1).normal(0, 0.08, (len(user_defined), cfg["hidden_size"])).astype(np.float32)
    sd["model.embed_tokens.weight"] = np.concatenate([sd["model.embed_tokens.weight"], extra])
    if "lm_head.weight" in sd and not cfg.get("tie_word_embeddings"):
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
  w.add_bos_token_id(tokens.index("<|im_start|>"))
  w.add_eos_token_id(tokens.index("<|im_end|>"))
  w.add_unk_token_id(tokens.index("<|endoftext|>"))
  w.add_add_bos_token(add_bos)
  w.add_chat_template(CHATML)
  q = getattr(gguf.GGMLQuantizationType, qtype)
  for hf, x in sd.items():
    parts = hf.split(".")
    if hf == "model.embed_tokens.weight":
      name_ = "token_embd.weight"
    elif hf == "model.norm.weight":
      name_ = "output_norm.weight"
    elif hf == "lm_head.weight":
      name_ = "output.weight"
    else:
      layer, leaf = parts[2], ".".join(parts[3:-1])
      name_ = f"blk.{layer}.{_GGUF_BLOCK[leaf]}.{parts[-1]}"
      if arch == "llama" and leaf == "self_attn.q_proj":
        x = _llama_cpp_permute(x, cfg["num_attention_heads"])
      elif arch == "llama" and leaf == "self_attn.k_proj":
        x = _llama_cpp_permute(x, cfg["num_key_value_heads"])
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 2 and q not in (gguf.GGMLQuantizationType.F32,):
      w.add_tensor(name_, gguf.quants.quantize(x, q), raw_dtype=q)
    else:
      w.add_tensor(name_, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path
