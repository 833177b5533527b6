"""transformers' side of the GGUF parity tests: its own GGUF loader, its params, its greedy decoding."""

import contextlib

import gguf
import numpy as np
import pytest
import torch
import transformers

from adakv_jax.checkpoints.gguf import _reader_class
from tests.parity import tiny_hf


def hf_gguf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
    path.parent, gguf_file=path.name, dtype=torch.float32
  ).eval()


def assert_params_equal_state_dict(cfg, params, model):
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  for key, leaf in params["layers"].items():
    stacked = np.asarray(leaf)
    for i in range(cfg.num_layers):
      want = sd[f"model.layers.{i}.{tiny_hf.HF_LAYER_NAMES[key]}"]
      _assert_equal(stacked[i], want.T if want.ndim == 2 else want, f"{key}[{i}]")
  _assert_equal(np.asarray(params["embed"]), sd["model.embed_tokens.weight"], "embed")
  _assert_equal(np.asarray(params["final_norm"]), sd["model.norm.weight"], "final_norm")
  if not cfg.tie_word_embeddings:
    _assert_equal(np.asarray(params["lm_head"]), sd["lm_head.weight"].T, "lm_head")


def _assert_equal(got, want, what):
  """np.testing's report on a mismatch; np.array_equal first: ~30x faster on a real model's equal arrays."""
  if not np.array_equal(got, want):
    np.testing.assert_array_equal(got, want, err_msg=what)


def hf_greedy(model, prompt, steps):
  with torch.no_grad():
    out = model.generate(
      torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0
    )
  return out[0, len(prompt) :].tolist()


@contextlib.contextmanager
def plain_array_reader():
  """transformers' GGUF loading with gguf-py's reader over a plain-ndarray view of its memmap: the same bytes
  and parsing code, ~5x faster on a 151k-token vocabulary, where numpy.memmap's per-slice hooks dominate
  (three full parses per model: config, tensors, tokenizer). The SmolLM2 tests keep the stock reader."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gguf, "GGUFReader", _reader_class())
    yield
