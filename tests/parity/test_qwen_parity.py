"""Qwen2.5-Coder-0.5B-Instruct, assembled from six PyPI parts, vs transformers' GGUF loader of the same file.

Loads the model once through the registry (`load_model("qwen2.5-coder-0.5b")`, which assembles the file into
the user cache on first use) and once through transformers; both dequantise 291 tensors of a 491 MB GGUF.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import adakv_jax.checkpoints
from adakv_jax import generate
from adakv_jax import model as model_lib
from adakv_jax.checkpoints import CheckpointError, load_model, resolve_model
from adakv_jax.checkpoints.registry import REGISTRY
from adakv_jax.cli import main
from tests.test_tokenizer import CONVERSATION, TEXTS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from tests.parity.hf_gguf import (  # noqa: E402 -- needs torch, checked above
  assert_params_equal_state_dict,
  hf_gguf_model,
  hf_greedy,
  plain_array_reader,
)

pytestmark = [pytest.mark.parity, pytest.mark.slow]
NAME = "qwen2.5-coder-0.5b"
LOGITS_ATOL = 1e-3  # observed 1.3e-5 (float32 on CPU)
PROMPT = [{"role": "user", "content": "Write a Python function that tells whether a number is prime."}]
QUESTION = "What is the capital of France?"  # greedy parity and the CLI share it: one compiled decode step


@pytest.fixture(scope="module")
def path():
  try:
    return resolve_model(NAME)
  except CheckpointError as e:
    if "missing:" not in str(e):
      raise
    pytest.skip(f"Qwen2.5-Coder parts not installed: {REGISTRY[NAME].install}")


@pytest.fixture(scope="module")
def ours(path):
  """(cfg, params, tok) via the registry; the CLI test below gets this same load (see cli_loads)."""
  return load_model(NAME)


@pytest.fixture(scope="module")
def hf_model(path):
  with plain_array_reader():
    return hf_gguf_model(path)


@pytest.fixture(scope="module")
def hf_tok(path):
  with plain_array_reader():
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def prompt(ours):
  _, _, tok = ours
  return tok.encode(tok.apply_chat_template(PROMPT), add_special_tokens=False)


def test_config_matches_transformers(ours, hf_model):
  cfg, _, _ = ours
  hf = hf_model.config
  assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
    "qwen2",
    24,
    14,
    2,
    64,
  )
  assert cfg.attention_bias and cfg.max_position_embeddings == 32768 == hf.max_position_embeddings
  assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
    hf.vocab_size,
    hf.hidden_size,
    hf.intermediate_size,
  )
  assert cfg.tie_word_embeddings == hf.tie_word_embeddings
  assert cfg.rope_theta == hf.rope_parameters["rope_theta"] and cfg.rms_norm_eps == hf.rms_norm_eps


def test_params_equal_transformers_gguf_loader(ours, hf_model):
  cfg, params, _ = ours
  assert_params_equal_state_dict(cfg, params, hf_model)  # Q5_0/Q8_0/Q6_K/Q4_K dequantised identically


def test_last_token_logits_match(ours, hf_model, prompt):
  cfg, params, _ = ours
  with torch.no_grad():
    want = hf_model(torch.tensor([prompt])).logits[0, -1].numpy()
  got = np.asarray(model_lib.forward_full(params, jnp.asarray([prompt]), cfg=cfg))[0, -1]
  diff = float(np.abs(got - want).max())
  print(f"{NAME} last-token logits: max |ours - transformers| = {diff:.3g} over {len(prompt)} tokens")
  assert diff <= LOGITS_ATOL, diff
  assert int(got.argmax()) == int(want.argmax())


def test_greedy_tokens_match(ours, hf_model):
  cfg, params, tok = ours
  chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}])
  prompt = tok.encode(chat, add_special_tokens=False)
  got = generate(params, cfg, [prompt], max_new_tokens=8, eos_token_ids=[]).token_ids[0]
  want = hf_greedy(hf_model, prompt, 8)
  assert list(got) == want, (tok.decode(got), tok.decode(want))


def test_tokenizer_backend_and_ids_match_transformers(ours, hf_tok):
  _, _, tok = ours
  assert json.loads(tok.backend.to_str()) == json.loads(hf_tok.backend_tokenizer.to_str())
  for text in TEXTS:
    assert tok.encode(text) == hf_tok(text)["input_ids"], text
    ids = hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
  assert tok.bos_token_id == hf_tok.bos_token_id and tok.eos_token_ids[0] == hf_tok.eos_token_id


@pytest.mark.parametrize(
  "messages", [PROMPT, CONVERSATION, [{"role": "system", "content": "Be terse."}, *CONVERSATION[:2]]]
)
def test_chat_template_matches_transformers(ours, hf_tok, messages):
  _, _, tok = ours
  for gen in (True, False):
    text = tok.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
  ref = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
  ref = ref["input_ids"] if hasattr(ref, "keys") else ref
  assert tok.encode(tok.apply_chat_template(messages), add_special_tokens=False) == list(ref)


@pytest.fixture
def cli_loads(ours, monkeypatch):
  """The CLI's load_model, answered from the module's load (the name still has to reach the registry)."""

  def load(name, dtype="float32"):
    assert adakv_jax.checkpoints.is_registered(name) and dtype == "float32"
    assert resolve_model(name) == resolve_model(NAME)
    return ours

  monkeypatch.setattr(adakv_jax.checkpoints, "load_model", load)


def test_cli_answers_a_simple_question(cli_loads, capsys):
  assert main(["generate", "--model", NAME, "--json", "--prompt", QUESTION, "--max-new-tokens", "8"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert "Paris" in out["text"], out["text"]
  assert out["token_ids"][-1] == 151645  # <|im_end|>: the answer ends its turn within the 8 tokens
