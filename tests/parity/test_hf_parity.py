"""Tiny HF checkpoints (save_pretrained) vs transformers: loaded params, prefill logits, greedy decoding."""

import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import generate  # the package-level API (module: adakv_jax.generation)
from adakv_jax import model as model_lib
from adakv_jax.checkpoints import load_hf_checkpoint
from tests.parity import tiny_hf

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.parity

CASES = [*tiny_hf.VARIANTS, "llama_gqa_tied/sharded", "llama3_scaled/legacy", "qwen2_mha_untied/bf16"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """case -> (checkpoint dir, transformers model in float32)."""
  root = tmp_path_factory.mktemp("hf_parity")
  out = {}
  for case in CASES:
    variant, _, kind = case.partition("/")
    d = tiny_hf.build(
      root / case.replace("/", "_"),
      variant,
      shard=kind == "sharded",
      dtype="bfloat16" if kind == "bf16" else "float32",
    )
    if kind == "legacy":
      tiny_hf.to_legacy_config(d)
    out[case] = (d, tiny_hf.load_reference(d))
  return out


@pytest.mark.parametrize("case", CASES)
def test_params_equal_transformers_state_dict(built, case):
  d, ref = built[case]
  cfg, params = load_hf_checkpoint(d)
  sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
  layer_map = tiny_hf.HF_LAYER_NAMES
  assert set(params["layers"]) == {k for k in layer_map if cfg.attention_bias or not k.startswith("b")}
  for key, leaf in params["layers"].items():
    want = np.stack([sd[f"model.layers.{i}.{layer_map[key]}"] for i in range(cfg.num_layers)])
    np.testing.assert_array_equal(
      np.asarray(leaf), want.swapaxes(1, 2) if want.ndim == 3 else want, err_msg=key
    )
  np.testing.assert_array_equal(np.asarray(params["embed"]), sd["model.embed_tokens.weight"])
  np.testing.assert_array_equal(np.asarray(params["final_norm"]), sd["model.norm.weight"])
  if cfg.tie_word_embeddings:
    assert "lm_head" not in params
  else:
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), sd["lm_head.weight"].T)


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_match_transformers(built, case):
  d, ref = built[case]
  cfg, params = load_hf_checkpoint(d)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 48))  # > llama3_scaled's original ctx (16)
  with torch.no_grad():
    want = ref(torch.from_numpy(tokens)).logits.numpy()
  got = np.asarray(model_lib.forward_full(params, jnp.asarray(tokens), cfg=cfg))
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize(
  "case",
  [
    "llama_mha_untied",
    "llama_gqa_tied",
    "llama3_scaled",
    "mistral_gqa",
    "qwen2_gqa_tied",
    "qwen2_mha_untied",
  ],
)
def test_greedy_decoding_matches_transformers_generate(built, case):
  d, ref = built[case]
  cfg, params = load_hf_checkpoint(d)
  prompts = [np.random.RandomState(s).randint(3, cfg.vocab_size, n).tolist() for s, n in ((1, 11), (2, 20))]
  ours = generate(params, cfg, prompts, max_new_tokens=16, eos_token_ids=[]).token_ids
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
      )
    assert list(got) == out[0, len(prompt) :].tolist()
