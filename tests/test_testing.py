"""The shared fixtures and oracles say what they claim: recorded shapes are the checkpoints' own, and the
masked dense reference with nothing evicted is the plain causal forward."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from adakv_jax import model as model_lib
from adakv_jax.checkpoints import CheckpointError, gguf
from adakv_jax.checkpoints.registry import resolve_model
from adakv_jax.testing import (
  REGISTERED_SHAPES,
  keep_mask,
  masked_decode_reference,
  random_prompts,
  registered_config,
  tiny_model,
)


@pytest.mark.parametrize("name", REGISTERED_SHAPES)
def test_registered_shapes_are_the_checkpoints_own(name):
  try:
    path = Path(resolve_model(name))
  except CheckpointError as e:
    pytest.skip(f"{name} is not installed here: {e}")
  reader = gguf.open_reader(path)
  cfg = gguf.config_from_metadata(gguf.read_metadata(reader), {t.name for t in reader.tensors}, "bfloat16")
  assert registered_config(name) == cfg
  assert registered_config(name, "float32", num_layers=2) == cfg.replace(dtype="float32", num_layers=2)


def test_unknown_registered_name_is_a_clear_error():
  with pytest.raises(ValueError, match="no recorded shapes for 'gpt2'.*smollm2-135m"):
    registered_config("gpt2")


def test_keep_mask_marks_exactly_the_kept_positions():
  pos = np.array([[[[3, 0, -1], [-1, -1, -1]]]])  # [L=1, B=1, H=2, C=3]
  keep = keep_mask(pos, 5)
  assert keep.shape == (1, 1, 2, 5)
  assert keep[0, 0, 0].tolist() == [True, False, False, True, False] and not keep[0, 0, 1].any()


def test_masked_reference_keeping_everything_is_the_causal_forward():
  cfg, params = tiny_model(seed=1)
  prompt = random_prompts([13], seed=3)[0]
  token = 11
  tokens = jnp.asarray([prompt])
  _, cap = model_lib.run_prefill(
    params,
    tokens,
    jnp.asarray([13]),
    cfg=cfg,
    chunk=13,
    tap=model_lib.CaptureTap(window=1, with_colsum=False),
  )
  keep = jnp.ones((cfg.num_layers, 1, cfg.num_kv_heads, 13), bool)
  got = masked_decode_reference(
    params, cfg, cap.k_BKLD, cap.v_BKLD, keep, jnp.asarray([13]), jnp.asarray([token])
  )
  want = model_lib.forward_full(params, jnp.asarray([prompt + [token]]), cfg)[:, -1]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  # evicting an entry changes the step: the mask is really applied
  dropped = masked_decode_reference(
    params,
    cfg,
    cap.k_BKLD,
    cap.v_BKLD,
    keep.at[:, :, :, 4].set(False),
    jnp.asarray([13]),
    jnp.asarray([token]),
  )
  assert float(jnp.abs(dropped - want).max()) > 1e-4
