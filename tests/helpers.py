"""Small shared fixtures: a tiny random Llama-family model."""

import jax
import numpy as np

from adakv_jax import model as model_lib
from adakv_jax.params import init_params
from adakv_jax.config import ModelConfig


def tiny_config(**kw) -> ModelConfig:
  base = dict(architecture="llama", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=3,
              num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)
  base.update(kw)
  return ModelConfig(**base)


def tiny_model(seed: int = 0, **kw):
  cfg = tiny_config(**kw)
  return cfg, init_params(cfg, jax.random.PRNGKey(seed))


def random_prompts(lengths, vocab=97, seed=0):
  rs = np.random.RandomState(seed)
  return [rs.randint(0, vocab, size=n).tolist() for n in lengths]


def greedy_reference(params, cfg, prompt, steps):
  """Greedy continuation by re-running the uncached forward each step (slow, obviously right)."""
  import jax.numpy as jnp

  seq = list(prompt)
  for _ in range(steps):
    logits = model_lib.forward_full(params, jnp.asarray([seq]), cfg)
    seq.append(int(jnp.argmax(logits[0, -1])))
  return seq[len(prompt):]
