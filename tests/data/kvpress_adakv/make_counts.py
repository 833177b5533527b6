"""Per-head AdaKV kept counts from kvpress 0.5.5, the reference tests/test_kvpress_parity.py compares against.

Run once, offline, in a venv of its own OUTSIDE the repository (kvpress 0.5.5 needs transformers < 5.3):

  python3 -m venv /work/wt/kvpress-venv && . /work/wt/kvpress-venv/bin/activate
  pip install torch==2.13.0                         # the CPU wheel first, so kvpress does not pull a CUDA one
  pip install kvpress==0.5.5 transformers==5.2.0    # check with `pip list` that torch stayed 2.13.0+cpu
  cd <repo> && python tests/data/kvpress_adakv/make_counts.py

It writes, next to itself, model/ (a tiny random MHA Llama, save_pretrained: config.json +
model.safetensors) and counts.json: versions, settings, prompt ids, and per ratio the per-layer per-head
kept counts INCLUDING the window (read from the keys kvpress masks: prompt length minus masked keys per
head), with the margins below. Everything is deterministic from SEED and PROMPT_SEED.

The heads differ in attention sharpness (each head's q_proj rows are scaled by its own factor), so the
cross-head top-k moves budget between heads.

Safeguards. kvpress reserves each head's top n_safe = max(1, int(alpha * n_kept)) entries of a score row in
which the window is scored above every prefix entry, so the reserve covers the window first and protects
only max(n_safe - window, 0) prefix entries; the project reserves floor(alpha * (n_kept - window)) prefix
entries. The settings here keep every head above both (asserted below), so the counts are the floor-free
cross-head top-k for both rules and do not depend on that difference.

Near-ties. For each layer and ratio counts.json records the score gap at the global cut (smallest kept
minus largest evicted prefix score). The relative gap alone does not say whether float differences between
torch and JAX could swap two entries: with the same model, several prompt seeds in 1..24 had a cut whose
gap was smaller than the largest difference between kvpress's and the project's scores near it (measured
offline). PROMPT_SEED = 20 has gaps 18x or more that difference at every cut.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from importlib.metadata import version
from pathlib import Path

import torch
import transformers
from kvpress import AdaKVPress, SnapKVPress
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
SEED = 0  # weights
PROMPT_SEED = 20  # prompt ids: see "Near-ties" above
PROMPT_LEN = 384
WINDOW = 32
KERNEL = 7
ALPHA = 0.2
RATIOS = (0.5, 0.75)  # exact in binary: int(len * (1 - r)) has no float truncation to disagree on
# Per-layer, per-head factors on q_proj rows. A factor of 24 makes each window query attend to about one
# key, and the pooled peaks of 32 such queries outscore the softer heads' tails: at r = 0.75 that head
# takes about twice the mean selectable budget (more than twice in layer 1), while the soft heads stay
# above both floors.
Q_SCALES = ((24.0, 1.0, 1.0, 1.0), (1.0, 24.0, 1.0, 1.0), (1.0, 1.5, 0.75, 24.0))
WEIGHT_STD = 0.15


def build_model() -> LlamaForCausalLM:
  heads = len(Q_SCALES[0])
  cfg = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=len(Q_SCALES),
    num_attention_heads=heads,
    num_key_value_heads=heads,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="sdpa",
  )
  torch.manual_seed(SEED)
  model = LlamaForCausalLM(cfg).eval()
  gen = torch.Generator().manual_seed(SEED)
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() == 2:
        p.copy_(torch.randn(p.shape, generator=gen) * WEIGHT_STD)
    model.model.embed_tokens.weight.mul_(1.0 / WEIGHT_STD)  # unit-scale embeddings
    for layer, scales in zip(model.model.layers, Q_SCALES):
      w = layer.self_attn.q_proj.weight  # [heads * head_dim, hidden]
      for h, s in enumerate(scales):
        w[h * cfg.head_dim : (h + 1) * cfg.head_dim] *= s
  return model


class RecordingSnapKV(SnapKVPress):
  """kvpress's SnapKVPress, unchanged, that also keeps a copy of each layer's scores (before AdaKV's
  safeguard writes into them)."""

  def score(self, module, hidden_states, keys, values, attentions, kwargs):
    s = super().score(module, hidden_states, keys, values, attentions, kwargs)
    self.recorded.append(s.detach().clone())
    return s


def kvpress_counts(model, ids: torch.Tensor, ratio: float):
  inner = RecordingSnapKV(compression_ratio=ratio, window_size=WINDOW, kernel_size=KERNEL)
  inner.recorded = []
  press = AdaKVPress(inner, alpha_safeguard=ALPHA)
  with torch.no_grad(), press(model):
    model(ids, use_cache=True)
  counts = []
  for layer in model.model.layers:
    _, heads, _ = layer.self_attn.masked_key_indices
    kept = torch.full((model.config.num_key_value_heads,), ids.shape[1])
    kept -= torch.bincount(heads, minlength=kept.numel())
    counts.append(kept.tolist())
    layer.self_attn.masked_key_indices = None
  return counts, inner.recorded


def margins(scores_HL: torch.Tensor, n_kept: int) -> dict:
  """The floor-free global cut over the prefix: its score gap and the per-head counts (window incl.)."""
  h, n = scores_HL.shape
  prefix = scores_HL[:, : n - WINDOW].double()
  total = h * (n_kept - WINDOW)
  order = torch.sort(prefix.reshape(-1), descending=True).values
  kept_min, evicted_max = order[total - 1].item(), order[total].item()
  free = (prefix >= kept_min).sum(-1) + WINDOW
  return {
    "kept_min_score": kept_min,
    "evicted_max_score": evicted_max,
    "relative_gap_at_cut": (kept_min - evicted_max) / kept_min,
    "floor_free_counts": free.tolist(),
  }


def main():
  model = build_model()
  model.save_pretrained(HERE / "model", safe_serialization=True)
  gen = torch.Generator().manual_seed(PROMPT_SEED)
  ids = torch.randint(3, model.config.vocab_size, (1, PROMPT_LEN), generator=gen)

  runs = []
  for ratio in RATIOS:
    counts, recorded = kvpress_counts(model, ids, ratio)
    n_kept = int(PROMPT_LEN * (1 - ratio))
    layers = [margins(s[0], n_kept) for s in recorded]
    kvpress_floor = max(max(1, int(n_kept * ALPHA)) - WINDOW, 0)
    project_floor = math.floor(Fraction(str(ALPHA)) * (n_kept - WINDOW))
    for li, (c, m) in enumerate(zip(counts, layers)):
      # The comparison is about the allocation, not the floors, which differ (see the docstring).
      assert c == m["floor_free_counts"], f"ratio {ratio} layer {li}: kvpress's safeguard binds"
      assert min(c) - WINDOW >= project_floor, f"ratio {ratio} layer {li}: the project's floor would bind"
      print(
        f"ratio {ratio} layer {li}: counts {c} (mean {n_kept}), relative gap at the cut "
        f"{m['relative_gap_at_cut']:.3g}"
      )
    runs.append(
      {
        "compression_ratio": ratio,
        "n_kept_per_head": n_kept,
        "kvpress_prefix_floor": kvpress_floor,
        "project_prefix_floor": project_floor,
        "counts": counts,
        "layers": layers,
      }
    )

  out = {
    "versions": {
      "kvpress": version("kvpress"),
      "transformers": transformers.__version__,
      "torch": torch.__version__,
    },
    "press": f"AdaKVPress(SnapKVPress(window_size={WINDOW}, kernel_size={KERNEL}), alpha_safeguard={ALPHA})",
    "settings": {
      "window": WINDOW,
      "kernel": KERNEL,
      "pooling": "avg (zero padding counted)",
      "alpha_safeguard": ALPHA,
      "q_scales": Q_SCALES,
      "seed": SEED,
      "prompt_seed": PROMPT_SEED,
    },
    "prompt_ids": ids[0].tolist(),
    "runs": runs,
  }
  (HERE / "counts.json").write_text(_dumps(out) + "\n")


def _dumps(x, indent: str = "") -> str:
  """JSON with dicts spread over lines and lists of numbers kept on one line (a diff reads per layer)."""
  if isinstance(x, dict):
    inner = indent + " "
    items = [f"{inner}{json.dumps(k)}: {_dumps(v, inner)}" for k, v in x.items()]
    return "{\n" + ",\n".join(items) + "\n" + indent + "}"
  if isinstance(x, (list, tuple)) and any(isinstance(v, dict) for v in x):
    inner = indent + " "
    return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in x) + "\n" + indent + "]"
  return json.dumps(x)


if __name__ == "__main__":
  main()
