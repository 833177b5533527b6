"""Ada-SnapKV keeps, per head, exactly the entries kvpress 0.5.5's AdaKVPress(SnapKVPress) keeps.

The reference counts were computed once, offline, by tests/data/kvpress_adakv/make_counts.py in kvpress's own
venv, on the tiny random MHA Llama saved next to them; this test needs neither torch nor kvpress. Our press
takes its defaults for everything kvpress does not fix: in particular no per-head cap, so a head may take
any share of its layer's budget, as in kvpress.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from adakv_jax import generate
from adakv_jax.checkpoints import load_hf_checkpoint
from adakv_jax.press import make_press

DATA = Path(__file__).resolve().parent / "data" / "kvpress_adakv"
REFERENCE = json.loads((DATA / "counts.json").read_text())
SETTINGS = REFERENCE["settings"]


@pytest.fixture(scope="module")
def model():
  return load_hf_checkpoint(DATA / "model", "float32")


def matched_press(ratio: float):
  """kvpress's AdaKVPress(SnapKVPress(window_size, kernel_size), alpha_safeguard) in our terms."""
  return make_press(
    "ada-snapkv",
    compression_ratio=ratio,
    window=SETTINGS["window"],
    kernel=SETTINGS["kernel"],
    pool="avg",
    floor_alpha=SETTINGS["alpha_safeguard"],
  )


@pytest.mark.parametrize("run", REFERENCE["runs"], ids=lambda r: f"ratio{r['compression_ratio']}")
def test_per_head_kept_counts_equal_kvpress(model, run):
  cfg, params = model
  res = generate(
    params, cfg, [REFERENCE["prompt_ids"]], max_new_tokens=1, press=matched_press(run["compression_ratio"])
  )
  ours_LH = res.budgets[:, 0, :]
  np.testing.assert_array_equal(ours_LH, np.asarray(run["counts"]))


def test_reference_is_adaptive_beyond_twice_the_mean_selectable_budget():
  """Guards the data: the layers' totals hold, and at least one head takes more than twice its layer's
  mean selectable budget (B - w), so a per-head cap of 2 x (B - w) or a uniform split would fail above."""
  w = SETTINGS["window"]
  for run in REFERENCE["runs"]:
    counts_LH = np.asarray(run["counts"])
    assert (counts_LH.sum(-1) == counts_LH.shape[1] * run["n_kept_per_head"]).all()
  widest = max(REFERENCE["runs"], key=lambda r: np.max(r["counts"]) / r["n_kept_per_head"])
  mean_selectable = widest["n_kept_per_head"] - w
  assert np.max(widest["counts"]) - w > 2 * mean_selectable
  assert np.max(widest["counts"]) > 1.5 * widest["n_kept_per_head"]
