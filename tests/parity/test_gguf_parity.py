"""GGUF files vs transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`): params, logits, greedy
tokens.

The SmolLM2 Q4_1 file is loaded by transformers once per module (~15 s on 2 cores).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import generate  # the package-level API (module: adakv_jax.generation)
from adakv_jax import model as model_lib
from adakv_jax.checkpoints import Tokenizer, load_gguf, resolve_model
from tests.parity import tiny_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tests.parity.hf_gguf import assert_params_equal_state_dict, hf_gguf_model, hf_greedy  # noqa: E402

pytestmark = pytest.mark.parity


# --- SmolLM2-135M Q4_1 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
  path = resolve_model("smollm2-135m")
  cfg, params, meta = load_gguf(path)
  return cfg, params, Tokenizer.from_gguf_metadata(meta), hf_gguf_model(path)


@pytest.fixture(scope="module")
def prompt64(smol):
  """A real chat prompt, cut to exactly 64 tokens."""
  _, _, tok, _ = smol
  text = tok.apply_chat_template(
    [
      {
        "role": "user",
        "content": "Explain in detail why caching keys and values speeds up autoregressive "
        "decoding in transformers, and what limits how much of the cache can be evicted "
        "without hurting quality. Give two concrete examples.",
      }
    ]
  )
  ids = tok.encode(text, add_special_tokens=False)
  assert len(ids) >= 64
  return ids[-64:]


@pytest.mark.slow
def test_smollm2_params_equal_transformers_gguf_loader(smol):
  cfg, params, _, model = smol
  assert model.config.num_key_value_heads == cfg.num_kv_heads == 3
  assert_params_equal_state_dict(cfg, params, model)  # dequantisation and q/k un-permutation are exact


@pytest.mark.slow
def test_smollm2_last_token_logits_match(smol, prompt64):
  cfg, params, _, model = smol
  with torch.no_grad():
    want = model(torch.tensor([prompt64])).logits[0, -1].numpy()
  got = np.asarray(model_lib.forward_full(params, jnp.asarray([prompt64]), cfg=cfg))[0, -1]
  diff = np.abs(got - want).max()
  assert diff <= 1e-3, diff
  assert int(got.argmax()) == int(want.argmax())


@pytest.mark.slow
def test_smollm2_greedy_tokens_match(smol, prompt64):
  cfg, params, tok, model = smol
  got = generate(params, cfg, [prompt64], max_new_tokens=16, eos_token_ids=[]).token_ids[0]
  want = hf_greedy(model, prompt64, 16)
  assert list(got) == want, (tok.decode(got), tok.decode(want))


# --- tiny synthetic GGUFs (Llama permuted, Qwen2 with biases) ------------------------------------


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_mha_untied"])
def test_tiny_q8_gguf_matches_transformers(tmp_path, variant):
  src = tiny_hf.build_numpy(tmp_path / "src", variant, hidden_size=64, intermediate_size=96, head_dim=16)
  path = tiny_hf.build_gguf(tmp_path / "m.gguf", src, qtype="Q8_0")
  cfg, params, _ = load_gguf(path)
  model = hf_gguf_model(path)
  assert_params_equal_state_dict(cfg, params, model)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40))
  with torch.no_grad():
    want = model(torch.from_numpy(tokens)).logits.numpy()
  got = np.asarray(model_lib.forward_full(params, jnp.asarray(tokens), cfg=cfg))
  assert np.abs(got - want).max() <= 1e-4
  prompt = tokens[0, :13].tolist()
  assert list(generate(params, cfg, [prompt], max_new_tokens=16, eos_token_ids=[]).token_ids[0]) == (
    hf_greedy(model, prompt, 16)
  )
