"""GGUF files vs transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`): params, logits, greedy tokens.

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
pytestmark = pytest.mark.parity

_LAYER_MAP = {"wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
              "wo": "self_attn.o_proj.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
              "w_down": "mlp.down_proj.weight", "attn_norm": "input_layernorm.weight",
              "mlp_norm": "post_attention_layernorm.weight", "bq": "self_attn.q_proj.bias",
              "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias"}


def _hf_gguf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()


def _assert_params_equal_state_dict(cfg, params, model):
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  for key, leaf in params["layers"].items():
    for i in range(cfg.num_layers):
      want = sd[f"model.layers.{i}.{_LAYER_MAP[key]}"]
      np.testing.assert_array_equal(np.asarray(leaf[i]), want.T if want.ndim == 2 else want, err_msg=f"{key}[{i}]")
  np.testing.assert_array_equal(np.asarray(params["embed"]), sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(np.asarray(params["final_norm"]), sd["model.norm.weight"])
  if not cfg.tie_word_embeddings:
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), sd["lm_head.weight"].T)


def _hf_greedy(model, prompt, steps):
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
  return out[0, len(prompt):].tolist()


# --- SmolLM2-135M Q4_1 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol():
  path = resolve_model("smollm2-135m")
  cfg, params, meta = load_gguf(path)
  return cfg, params, Tokenizer.from_gguf_metadata(meta), _hf_gguf_model(path)


@pytest.fixture(scope="module")
def prompt64(smol):
  """A real chat prompt, cut to exactly 64 tokens."""
  _, _, tok, _ = smol
  text = tok.apply_chat_template([
      {"role": "user", "content": "Explain in detail why caching keys and values speeds up autoregressive "
                                  "decoding in transformers, and what limits how much of the cache can be evicted "
                                  "without hurting quality. Give two concrete examples."}])
  ids = tok.encode(text, add_special_tokens=False)
  assert len(ids) >= 64
  return ids[-64:]


@pytest.mark.slow
def test_smollm2_params_equal_transformers_gguf_loader(smol):
  cfg, params, _, model = smol
  assert model.config.num_key_value_heads == cfg.num_kv_heads == 3
  _assert_params_equal_state_dict(cfg, params, model)  # dequantisation and q/k un-permutation are exact


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
  want = _hf_greedy(model, prompt64, 16)
  assert list(got) == want, (tok.decode(got), tok.decode(want))


# --- tiny synthetic GGUFs (Llama permuted, Qwen2 with biases) ------------------------------------


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_mha_untied"])
def test_tiny_q8_gguf_matches_transformers(tmp_path, variant):
  src = tiny_hf.build_numpy(tmp_path / "src", variant, hidden_size=64, intermediate_size=96, head_dim=16)
  path = tiny_hf.build_gguf(tmp_path / "m.gguf", src, qtype="Q8_0")
  cfg, params, _ = load_gguf(path)
  model = _hf_gguf_model(path)
  _assert_params_equal_state_dict(cfg, params, model)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40))
  with torch.no_grad():
    want = model(torch.from_numpy(tokens)).logits.numpy()
  got = np.asarray(model_lib.forward_full(params, jnp.asarray(tokens), cfg=cfg))
  assert np.abs(got - want).max() <= 1e-4
  prompt = tokens[0, :13].tolist()
  assert list(generate(params, cfg, [prompt], max_new_tokens=16, eos_token_ids=[]).token_ids[0]) == (
      _hf_greedy(model, prompt, 16))
