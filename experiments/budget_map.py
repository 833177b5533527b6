"""Where Ada-SnapKV puts the budget: per-(layer, head) budgets on SmolLM2 for one ~2K-token prompt.

Runs the library's `generate` (question-aware chat prompt, one new token) with ada-snapkv and snapkv at
budget 128, at KV-head granularity (3 heads per layer) and query-head granularity (9 heads per layer), and
records each head's kept entries (window included), the retained attention mass per layer, and the
cache's memory as generate reports it (allocated, kept, decode room, pages).

    python -m experiments.budget_map           # ~1-1.5 min on 2 shared CPU cores
    python -m experiments.budget_map --quick
"""

from __future__ import annotations

import argparse
from fractions import Fraction

import numpy as np
from tqdm import tqdm

from adakv_jax.generation import generate
from experiments import common

QUESTION = "Summarise the text above in one sentence."


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  p.add_argument("--ctx-tokens", type=int, default=1990, help="context tokens (the prompt fits 2048)")
  p.add_argument("--budget", type=int, default=128)
  common.add_press_args(p)
  a = p.parse_args()
  if a.quick:
    a.ctx_tokens, a.budget = 300, 64
  return a


def floors(press, num_layers: int, prompt_len: int, page_size: int) -> np.ndarray | None:
  """Each layer's safeguard floor per head in entries, window included (token-granular Ada only)."""
  if press.allocation != "adaptive" or press.granularity != "token":
    return None
  units = np.asarray(press.layer_units(num_layers, [prompt_len], page_size))[:, 0]
  alpha = Fraction(str(press.floor_alpha))
  return np.asarray([int(u * alpha) for u in units]) + min(prompt_len, press.window)


def run(params, cfg, prompt, pname, gqa, a):
  press = common.build_press(pname, a, budget=a.budget, gqa=gqa)
  res = generate(
    params, cfg, [prompt], max_new_tokens=1, press=press, backend=common.BACKEND, page_size=a.page_size
  )
  b = res.budgets[:, 0, :]  # [layers, heads], window included
  expect = common.expected_layer_totals(press, cfg.num_layers, b.shape[1], len(prompt), a.page_size)
  floor = floors(press, cfg.num_layers, len(prompt), a.page_size)
  return {
    "press": pname,
    "gqa": gqa,
    "budget": a.budget,
    "granularity": press.granularity,
    "budgets": b.tolist(),
    "layer_totals": b.sum(-1).tolist(),
    "expected_layer_totals": expect.tolist(),  # H' x (B' + w) (+ the page tail at page granularity)
    "totals_exact": bool(np.array_equal(b.sum(-1), expect)),
    "min_head_budget": int(b.min()),
    "max_head_budget": int(b.max()),
    "floor": None if floor is None else int(floor.min()),
    "heads_at_floor": None if floor is None else int((b == floor[:, None]).sum()),
    "budget_std_over_heads_mean": float(b.std(axis=1).mean()),
    "retained_mass": res.retained_mass[:, 0].tolist(),
    "retained_mass_mean": float(res.retained_mass.mean()),
    "allocated_bytes": res.cache_bytes,
    **res.memory(),
    "allocated_mib": res.cache_bytes / 2**20,
    "prefill_s": round(res.prefill_s, 2),
    "compile_s": round(res.compile_s, 2),
  }


def plot(runs, name, budget, prompt_len):
  plt = common.pyplot()
  by = {(r["press"], r["gqa"]): r for r in runs}
  fig = plt.figure(figsize=(14, 7))
  gs = fig.add_gridspec(1, 3, width_ratios=[1, 2.2, 3])
  for i, gqa in enumerate(("kv", "query")):
    ax = fig.add_subplot(gs[0, i])
    b = np.asarray(by[("ada-snapkv", gqa)]["budgets"])
    im = ax.imshow(b, cmap="viridis", aspect="auto")
    ax.set_xlabel(f"{'KV' if gqa == 'kv' else 'query'} head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(b.shape[1]))
    ax.set_title(f"ada-snapkv budgets, gqa={gqa}\n(uniform: {budget} each)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.08)
  ax = fig.add_subplot(gs[0, 2])
  for (p, gqa), r in by.items():
    ax.plot(
      r["retained_mass"],
      label=f"{p} (gqa={gqa}), mean {r['retained_mass_mean']:.3f}",
      ls="-" if p.startswith("ada-") else "--",
      color="C0" if gqa == "kv" else "C1",
      marker=".",
    )
  ax.set_xlabel("layer")
  ax.set_ylabel("retained attention mass of the window queries")
  ax.set_title("retained mass per layer", fontsize=10)
  ax.legend(fontsize=8)
  fig.suptitle(
    f"SmolLM2-135M-Instruct, {prompt_len}-token prompt, budget {budget} per head "
    "(w=32, max-pool k=7, alpha=0.2)",
    fontsize=10,
  )
  fig.tight_layout()
  common.save_png(fig, name)


def main():
  a = parse_args()
  name = common.out_name("budget_map", a.quick)
  if a.replot:
    d = common.read_json(name)
    return plot(d["runs"], name, d["meta"]["args"]["budget"], d["meta"]["prompt_tokens"])
  with common.Timer() as total:
    cfg, params, tok = common.load()
    ctx, (q,) = tok.encode_chat(common.context_text(tok, a.ctx_tokens, start=0), [QUESTION])
    prompt = ctx + q
    grid = [(p, g) for p in ("ada-snapkv", "snapkv") for g in ("kv", "query")]
    runs = [run(params, cfg, prompt, p, g, a) for p, g in tqdm(grid, desc="budget_map")]
  payload = {
    "meta": common.run_meta(a, wall_s=round(total.s, 1), prompt_tokens=len(prompt), question=QUESTION),
    "runs": runs,
  }
  common.write_json(name, payload)
  plot(runs, name, a.budget, len(prompt))
  common.print_table(
    runs,
    [
      "press",
      "gqa",
      "budget",
      "totals_exact",
      "min_head_budget",
      "max_head_budget",
      "floor",
      "heads_at_floor",
      "retained_mass_mean",
      "allocated_mib",
      "padding_overhead",
      "prefill_s",
      "compile_s",
    ],
  )
  print(f"total {total.s:.0f}s")


if __name__ == "__main__":
  main()
