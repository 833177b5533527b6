"""Tiny random models, prompts and slow-but-obviously-right oracles, shared by the tests, the examples and
the device check.

The oracles trade speed for plainness: `greedy_reference` re-runs the uncached forward for every token and
`masked_decode_reference` attends densely over the whole prompt with evicted entries masked out, so the
cached, paged and compressed paths can be held against them on small sizes. `registered_config` gives the
exact shapes of the registered checkpoints, for timing and memory runs on random weights where a
checkpoint cannot be loaded (e.g. a device machine the file cannot travel to).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adakv_jax import model as model_lib
from adakv_jax.config import ModelConfig
from adakv_jax.params import init_params

TINY_VOCAB = 97

# The configurations the registered GGUF files describe (tests/test_testing.py reads them back from the
# files where those are installed); dtype is set per call.
_REGISTERED = {
  "smollm2-135m": dict(
    architecture="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rms_norm_eps=9.999999747378752e-06,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_ids=(2,),
  ),
  "qwen2.5-coder-0.5b": dict(
    architecture="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    head_dim=64,
    rms_norm_eps=9.999999974752427e-07,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    attention_bias=True,
    bos_token_id=151643,
    eos_token_ids=(151645,),
  ),
}
REGISTERED_SHAPES = tuple(_REGISTERED)


def tiny_config(**overrides) -> ModelConfig:
  """A 3-layer Llama with 4 query / 2 KV heads of width 16 over a 97-token vocabulary."""
  base = dict(
    architecture="llama",
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=512,
  )
  return ModelConfig(**{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> tuple[ModelConfig, dict]:
  cfg = tiny_config(**overrides)
  return cfg, init_params(cfg, jax.random.PRNGKey(seed))


def registered_config(name: str, dtype: str = "bfloat16", **overrides) -> ModelConfig:
  """The ModelConfig of a registered checkpoint (`init_params` on it gives random weights of its shapes)."""
  if name not in _REGISTERED:
    raise ValueError(f"no recorded shapes for {name!r}; known: {', '.join(REGISTERED_SHAPES)}")
  return ModelConfig(**{**_REGISTERED[name], "dtype": dtype, **overrides})


def random_prompts(lengths: Sequence[int], vocab: int = TINY_VOCAB, seed: int = 0) -> list[list[int]]:
  rs = np.random.RandomState(seed)
  return [rs.randint(0, vocab, size=n).tolist() for n in lengths]


def greedy_reference(params, cfg: ModelConfig, prompt: Sequence[int], steps: int) -> list[int]:
  """Greedy continuation by re-running the uncached forward over the whole sequence for every token.

  The sequence is right-padded to its final width, so every step runs one compiled forward: causal
  attention keeps the padding out of every logit the loop reads."""
  seq = list(prompt)
  width = len(seq) + steps
  for _ in range(steps):
    logits = model_lib.forward_full(params, jnp.asarray([seq + [0] * (width - len(seq))]), cfg)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt) :]


def keep_mask(positions_LBHC, width: int) -> np.ndarray:
  """Prefill's kept positions (info["positions"], -1 = none) as a [L, B, H, width] boolean mask."""
  pos = np.asarray(positions_LBHC)
  keep = np.zeros((*pos.shape[:3], width), bool)
  l, b, h, c = np.nonzero(pos >= 0)
  keep[l, b, h, pos[l, b, h, c]] = True
  return keep


def masked_decode_reference(params, cfg: ModelConfig, k_LBKC, v_LBKC, keep_LBKC, pos_B, token_B):
  """Last-token logits [B, V] of one decode step over the FULL prompt K/V with the evicted entries masked
  out: plain jnp, layer by layer, dense softmax. keep_LBKC marks what a compressed cache kept per KV head
  (KV-head granularity); the new token always attends to itself."""
  b = token_B.shape[0]
  g = cfg.num_heads // cfg.num_kv_heads
  x = params["embed"][token_B[:, None]].astype(jnp.float32)
  pos = pos_B[:, None]
  for i in range(cfg.num_layers):
    lp = jax.tree.map(lambda a: a[i], params["layers"])
    q, k, v = model_lib.attention_inputs(lp, x, pos, cfg)
    ck = jnp.concatenate([k_LBKC[i], k], axis=2)
    cv = jnp.concatenate([v_LBKC[i], v], axis=2)
    keep = jnp.concatenate([keep_LBKC[i], jnp.ones((b, cfg.num_kv_heads, 1), bool)], axis=2)
    qg = q.reshape(b, cfg.num_kv_heads, g, cfg.head_dim)
    s = jnp.einsum("bkgd,bkcd->bkgc", qg, ck) / np.sqrt(cfg.head_dim)
    p = jax.nn.softmax(jnp.where(keep[:, :, None, :], s, -jnp.inf), axis=-1)
    o = jnp.einsum("bkgc,bkcd->bkgd", p, cv).reshape(b, cfg.num_heads, 1, cfg.head_dim)
    x = model_lib.attention_output_and_mlp(lp, x, o, cfg)
  return model_lib.logits_of(params, x[:, 0], cfg)
