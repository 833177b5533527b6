"""The parameter table: one row per tensor, from which init, checkpoint shapes and sharding derive."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from adakv_jax import model as model_lib
from adakv_jax import params as params_lib
from adakv_jax import sharding
from adakv_jax.checkpoints import gguf
from adakv_jax.testing import tiny_config

CONFIGS = {
  "llama_tied": dict(tie_word_embeddings=True),
  "llama_untied": dict(tie_word_embeddings=False),
  "qwen2_bias_tied": dict(architecture="qwen2", attention_bias=True, tie_word_embeddings=True),
  "qwen2_bias_untied": dict(architecture="qwen2", attention_bias=True, tie_word_embeddings=False),
}
LINEAR = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def _leaves(tree) -> dict[str, object]:
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {"/".join(k.key for k in path): x for path, x in flat}


def _cfg(name, **kw):
  return tiny_config(**CONFIGS[name], **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_tensor_of_the_table_is_used_by_the_forward_and_it_needs_no_other(name):
  cfg = _cfg(name, num_layers=2)
  params = params_lib.init_params(cfg, jax.random.PRNGKey(0))
  tokens = jnp.asarray([[3, 14, 15, 92, 65, 35]])

  def loss(p):
    return jnp.sum(jnp.sin(model_lib.forward_full(p, tokens, cfg)))

  # Forward mode (prefill attention's loop over key blocks has data-dependent bounds, which reverse mode
  # cannot differentiate): one JVP per tensor, along that tensor alone. A KeyError while tracing would be
  # a tensor the forward reads that the table lacks.
  zeros = jax.tree.map(jnp.zeros_like, params)
  along = jax.jit(lambda t: jax.jvp(loss, (params,), (t,))[1])
  paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  unused = []
  for path in paths:
    t = jax.tree_util.tree_map_with_path(lambda p, z: jnp.ones_like(z) if p == path else z, zeros)
    if float(along(t)) == 0.0:
      unused.append(jax.tree_util.keystr(path))
  assert unused == []


def test_which_tensors_a_config_has():
  keys = {n: set(_leaves(params_lib.param_specs(_cfg(n)))) for n in CONFIGS}
  base = {"embed", "final_norm", "layers/attn_norm", "layers/mlp_norm", *(f"layers/{w}" for w in LINEAR)}
  bias = {"layers/bq", "layers/bk", "layers/bv"}
  assert keys["llama_tied"] == base
  assert keys["llama_untied"] == base | {"lm_head"}
  assert keys["qwen2_bias_tied"] == base | bias
  assert keys["qwen2_bias_untied"] == base | bias | {"lm_head"}


def test_shapes_stack_layers_first_and_store_linear_weights_in_out():
  cfg = _cfg("qwen2_bias_untied")  # L=3, d=64, f=128, 4 heads, 2 kv heads of 16, vocab 97
  shapes = _leaves(params_lib.param_shapes(cfg))
  assert shapes == {
    "embed": (97, 64),
    "final_norm": (64,),
    "lm_head": (64, 97),
    "layers/attn_norm": (3, 64),
    "layers/mlp_norm": (3, 64),
    "layers/wq": (3, 64, 64),
    "layers/wk": (3, 64, 32),
    "layers/wv": (3, 64, 32),
    "layers/wo": (3, 64, 64),
    "layers/bq": (3, 64),
    "layers/bk": (3, 32),
    "layers/bv": (3, 32),
    "layers/w_gate": (3, 64, 128),
    "layers/w_up": (3, 64, 128),
    "layers/w_down": (3, 128, 64),
  }
  abstract = _leaves(params_lib.abstract_params(cfg.replace(dtype="bfloat16")))
  assert {k: (a.shape, a.dtype) for k, a in abstract.items()} == {
    k: (s, jnp.dtype(jnp.bfloat16)) for k, s in shapes.items()
  }


def test_hf_names_and_shapes_are_transformers_layout():
  cfg = _cfg("qwen2_bias_untied")
  hf = params_lib.hf_shapes(cfg)
  assert len(hf) == 3 + 3 * 12
  assert hf["model.embed_tokens.weight"] == (97, 64)
  assert hf["lm_head.weight"] == (97, 64)
  assert hf["model.norm.weight"] == (64,)
  assert hf["model.layers.2.self_attn.q_proj.weight"] == (64, 64)
  assert hf["model.layers.2.self_attn.k_proj.weight"] == (32, 64)
  assert hf["model.layers.0.self_attn.o_proj.weight"] == (64, 64)
  assert hf["model.layers.1.self_attn.v_proj.bias"] == (32,)
  assert hf["model.layers.1.mlp.down_proj.weight"] == (64, 128)
  assert hf["model.layers.1.post_attention_layernorm.weight"] == (64,)
  assert "lm_head.weight" not in params_lib.hf_shapes(_cfg("llama_tied"))
  assert "model.layers.0.self_attn.q_proj.bias" not in params_lib.hf_shapes(_cfg("llama_untied"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_row_reassembles_from_its_hf_tensors(name):
  cfg = _cfg(name)
  hf = params_lib.hf_shapes(cfg)
  specs = list(_leaves(params_lib.param_specs(cfg)).values())
  assert sorted(n for p in specs for n in p.hf_names(cfg)) == sorted(hf)  # each HF tensor feeds one row
  for p in specs:
    one = p.hf_shape(cfg)[::-1] if p.transposed else p.hf_shape(cfg)
    assert p.shape(cfg) == ((cfg.num_layers, *one) if p.stacked else one)
    assert all(hf[n] == p.hf_shape(cfg) for n in p.hf_names(cfg))


def test_a_tied_checkpoint_may_carry_lm_head_but_nothing_else_extra():
  assert params_lib.tolerated_hf_names(_cfg("llama_tied")) == {"lm_head.weight"}
  assert params_lib.tolerated_hf_names(_cfg("llama_untied")) == set()
  assert params_lib.tolerated_hf_names(_cfg("qwen2_bias_untied")) == set()


def test_gguf_name_map_reaches_every_hf_tensor():
  cfg = _cfg("qwen2_bias_untied")
  blocks = [
    f"blk.{i}.{g}.{kind}"
    for i in range(cfg.num_layers)
    for g in gguf._BLOCK_NAMES
    for kind in ("weight", "bias")
  ]
  translated = {gguf.hf_name(n) for n in [*gguf._GLOBAL_NAMES, *blocks]}
  assert set(params_lib.hf_shapes(cfg)) <= translated


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_init_params_shapes_dtypes_and_distributions(dtype):
  cfg = _cfg("qwen2_bias_untied", dtype=dtype, vocab_size=512, num_layers=2)
  params = params_lib.init_params(cfg, jax.random.PRNGKey(1), scale=0.02)
  leaves = _leaves(params)
  assert {k: x.shape for k, x in leaves.items()} == _leaves(params_lib.param_shapes(cfg))
  assert {x.dtype for x in leaves.values()} == {jnp.dtype(dtype)}
  for k in ("final_norm", "layers/attn_norm", "layers/mlp_norm"):
    assert np.all(np.asarray(leaves[k], np.float32) == 1.0), k
  std = {k: float(np.std(np.asarray(x, np.float32))) for k, x in leaves.items()}
  assert std["embed"] == pytest.approx(1.0, rel=0.05)  # 50 * scale
  for k in ("lm_head", *(f"layers/{w}" for w in LINEAR)):
    assert std[k] == pytest.approx(0.02, rel=0.1), k
  assert std["layers/bq"] == pytest.approx(0.02, rel=0.25)
  assert not np.array_equal(leaves["layers/wk"], leaves["layers/wv"])  # one key per tensor
  again = params_lib.init_params(cfg, jax.random.PRNGKey(1), scale=0.02)
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_logical_axes_are_the_sharding_tables_names():
  cfg = _cfg("qwen2_bias_untied")
  axes = _leaves(params_lib.param_axes(cfg))
  assert axes["layers/wq"] == ("layers", "embed", "heads")
  assert axes["layers/wo"] == ("layers", "heads", "embed")
  assert axes["layers/bk"] == ("layers", "kv_heads")
  assert axes["layers/w_down"] == ("layers", "mlp", "embed")
  assert axes["embed"] == ("vocab", "embed") and axes["lm_head"] == ("embed", "vocab")
  assert {a for ax in axes.values() for a in ax} <= set(sharding.LOGICAL_TO_MESH)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (simulated) devices")
def test_sharding_specs_derive_from_the_table():
  cfg = _cfg("qwen2_bias_untied")
  mesh = sharding.make_mesh(data=2, model=2)
  want = {
    "layers/wq": P(None, None, "model"),
    "layers/wo": P(None, "model", None),
    "layers/bv": P(None, "model"),
    "layers/w_gate": P(None, None, "model"),
    "layers/w_down": P(None, "model", None),
    "layers/attn_norm": P(None, None),
    "embed": P(None, None),
    "lm_head": P(None, None),
    "final_norm": P(None),
  }
  specs = {k: s.spec for k, s in _leaves(sharding.param_shardings(cfg, mesh)).items()}
  assert {k: specs[k] for k in want} == want
  placed = sharding.shard_params(params_lib.init_params(cfg, jax.random.PRNGKey(0)), mesh)
  assert {k: x.sharding.spec for k, x in _leaves(placed).items()} == specs


def test_an_unknown_tensor_is_not_sharded_silently():
  mesh = sharding.make_mesh(data=1, model=1)
  with pytest.raises(KeyError, match=r"params\['layers'\]\['wqkv'\] is not a parameter"):
    sharding.shard_params({"layers": {"wqkv": jnp.zeros((1, 2))}}, mesh)
