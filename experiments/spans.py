"""Span preservation: does a kept number stay whole? A wider pooling kernel against page granularity.

Token-granular eviction scores each entry alone, so the digits of a 7-digit number (one token each)
survive or die separately and the answer loses its tail (ADAKV_SPEC 9). Two mechanisms keep spans whole:
a wider max-pool kernel over the scores (neighbours share a peak), and page-granular selection (a page
is kept or dropped as a unit). This script compares them on RULER's niah_multikey_1 (4 word -> number
needles in an essay, one asked), question-aware, at equal budgets, for SnapKV and Ada-SnapKV (the full
cache is the ceiling): kernel 7 (the paper's), 15 and 31 at token granularity, and kernel 7 at page
granularity. Beside accuracy, each configuration records the fraction of (layer, KV-head) pairs whose
kept set holds every digit of the asked number, and the bytes the cache allocates; every variant is
paired with kernel 7 on the same samples (McNemar's exact test).

    python -m experiments.spans                                   # SmolLM2, 2K tokens, ~10 min
    python -m experiments.spans --model qwen2.5-coder-0.5b
    python -m experiments.spans --quick
"""

from __future__ import annotations

import argparse

import numpy as np
from tqdm import tqdm

from adakv_jax.cache import DEFAULT_PAGE_SIZE
from adakv_jax.press import make_press
from experiments import common, metrics, ruler

TASK = "niah_multikey_1"
VARIANTS = {  # name: (granularity, kernel)
  "k7": ("token", 7),
  "k15": ("token", 15),
  "k31": ("token", 31),
  "page": ("page", 7),
}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  p.add_argument("--model", default=common.MODEL)
  p.add_argument("--length", type=int, default=2048, help="max sequence length, RULER's convention")
  p.add_argument("--samples", type=int, default=20)
  p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
  p.add_argument("--presses", nargs="+", default=["snapkv", "ada-snapkv"])
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="entries per cache page")
  p.add_argument("--new-tokens", type=int, default=ruler.SHORT_GEN[TASK])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="results/<out>.json / .png; default spans[_<model>]")
  a = p.parse_args()
  if a.quick:
    a.length, a.samples, a.budgets, a.presses = 512, 2, [64], ["snapkv"]
  if a.out is None:
    a.out = "spans" if a.model == common.MODEL else f"spans_{a.model}"
  return a


def value_positions(tok, ids: list[int], value: str) -> list[int]:
  """Indices of the tokens that spell `value` (its one occurrence in the prompt), from each token's
  decoded text; refuses a prompt where the value is not found exactly once."""
  pieces = [tok.decode([t]) for t in ids]
  text = "".join(pieces)
  start = text.find(value)
  if start < 0 or text.find(value, start + 1) >= 0:
    raise ValueError(f"the value {value!r} is not in the prompt exactly once")
  sizes = np.asarray([len(p) for p in pieces])
  ends = np.cumsum(sizes)
  begins = ends - sizes
  return [i for i in range(len(ids)) if begins[i] < start + len(value) and ends[i] > start]


def whole_fraction(positions_NBHC: np.ndarray, spans: list[list[int]]) -> np.ndarray:
  """Per sample, the fraction of (layer, head) pairs that keep every token of its span."""
  return np.asarray([common.span_kept_LH(positions_NBHC[:, b], s).mean() for b, s in enumerate(spans)])


def label(press: str, variant: str | None, budget: int | None) -> str:
  return press if press == "full" else f"{press}/{variant}@{budget}"


def comparisons(details: list[dict]) -> list[dict]:
  """Each variant against kernel 7 (same press and budget), and Ada-SnapKV against SnapKV (same variant
  and budget), on the same samples."""
  by = {(d["press"], d["variant"], d["budget"]): d for d in details}
  pairs = [(d, by.get((p, "k7", b))) for (p, v, b), d in by.items() if p != "full" and v != "k7"]
  pairs += [(d, by.get(("snapkv", v, b))) for (p, v, b), d in by.items() if p == "ada-snapkv"]
  rows = []
  for x, y in pairs:
    if y is None:
      continue
    a, b = [[s["score"] == 1.0 for s in d["samples"]] for d in (x, y)]
    rows.append(
      {
        "a": label(x["press"], x["variant"], x["budget"]),
        "b": label(y["press"], y["variant"], y["budget"]),
        **metrics.mcnemar(a, b),
        "allocated_ratio_a_over_b": round(x["memory"]["allocated_bytes"] / y["memory"]["allocated_bytes"], 4),
      }
    )
  return rows


def plot(rows, name, model, n):
  plt = common.pyplot()
  full = [r for r in rows if r["press"] == "full"]
  rows = [r for r in rows if r["press"] != "full"]
  presses = list(dict.fromkeys(r["press"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for r in full:
    axes[0].axhline(
      r["accuracy"], color="k", lw=0.8, ls=":", label=f"full cache ({r['allocated_mib']:.0f} MiB)"
    )
  for ax, key, title in (
    (axes[0], "accuracy", "answer exact (all 7 digits)"),
    (axes[1], "whole_fraction", "(layer, head) pairs keeping the number whole"),
  ):
    for press, ls in zip(presses, ("-", "--")):
      for variant in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted(
          (r["allocated_mib"], r[key]) for r in rows if r["press"] == press and r["variant"] == variant
        )
        ax.plot(*zip(*pts), ls, marker="o", label=f"{press}/{variant}")
    ax.set_xlabel("allocated MiB (K/V)")
    ax.set_title(title, fontsize=9)
  axes[0].set_ylim(-0.05, 1.05)
  axes[0].legend(fontsize=7, loc="upper left")
  axes[1].legend(fontsize=7, ncol=2)
  fig.suptitle(f"{model}: {TASK}, question-aware, {n} samples per point", fontsize=9)
  fig.tight_layout()
  common.save_png(fig, name)


def main():
  a = parse_args()
  name = common.out_name(a.out, a.quick)
  if a.replot:
    d = common.read_json(name)
    return plot(d["rows"], name, d["meta"]["model"], d["meta"]["args"]["samples"])
  grid = [("full", None, None)] + [(p, v, b) for p in a.presses for v in a.variants for b in a.budgets]
  with common.Timer() as total:
    runner = ruler.Runner(a.model, a)
    cfg, params, tok = runner.cfg, runner.params, runner.tok
    samples = [
      ruler.make_sample(TASK, i, a.seed, a.length, runner.count)
      for i in tqdm(range(a.samples), desc="samples")
    ]
    prompts = [sum(runner.encode(s), []) for s in samples]
    spans = [value_positions(tok, ids, s["outputs"][0]) for ids, s in zip(prompts, samples)]
    presses = {
      c: None
      if c[0] == "full"
      else make_press(c[0], granularity=VARIANTS[c[1]][0], kernel=VARIANTS[c[1]][1], budget=c[2])
      for c in grid
    }
    cap = common.capture(params, cfg, prompts, window=32, with_colsum=False)
    plan = common.fitting_plan(
      cfg, [cap.lens], list(presses.values()), room=a.new_tokens, page_size=a.page_size
    )
    rows, details = [], []
    for press_name, variant, budget in tqdm(grid, desc="spans"):
      press = presses[(press_name, variant, budget)]
      cache, info, mem = common.compress(cfg, cap, press, plan)
      whole = np.ones(len(spans)) if press is None else whole_fraction(np.asarray(info["positions"]), spans)
      ids = common.decode(
        params,
        cfg,
        common.greedy_first(cap.logits_BV),
        cache,
        max_new_tokens=a.new_tokens,
        eos_ids=runner.eos,
      )
      per = []
      for s, out, w in zip(samples, ids, whole):
        answer = metrics.ruler_postprocess(tok.decode(out))
        per.append(
          {
            "value": s["outputs"][0],
            "answer": answer,
            "score": metrics.string_match_all(answer, s["outputs"]),
            "whole_fraction": float(w),
          }
        )
      config = {"press": press_name, "variant": variant, "budget": budget}
      rows.append(
        {
          **config,
          "label": label(press_name, variant, budget),
          "granularity": VARIANTS[variant][0] if variant else None,
          "kernel": VARIANTS[variant][1] if variant else None,
          "n": len(per),
          "accuracy": float(np.mean([p["score"] == 1.0 for p in per])),
          "whole_fraction": float(np.mean(whole)),
          **mem,
          "allocated_mib": mem["allocated_bytes"] / 2**20,
        }
      )
      details.append({**config, "memory": mem, "samples": per})
  tests = comparisons(details)
  payload = {
    "meta": common.run_meta(
      a,
      model=a.model,
      wall_s=round(total.s, 1),
      task=TASK,
      variants={k: {"granularity": g, "kernel": k_} for k, (g, k_) in VARIANTS.items()},
      prompt_tokens=cap.lens,
      success="RULER's string_match_all: the asked 7-digit number appears in the greedy answer",
      comparisons="McNemar's exact two-sided test on the samples where exactly one of the pair succeeds",
    ),
    "rows": rows,
    "comparisons": tests,
    "details": details,
  }
  common.write_json(name, payload)
  plot(rows, name, a.model, a.samples)
  common.print_table(rows, ["label", "accuracy", "whole_fraction", "allocated_mib", "padding_overhead"])
  common.print_table(tests, ["a", "b", "n", "a_correct", "b_correct", "a_only", "b_only", "p_value"])
  print(f"total {total.s:.0f}s")


if __name__ == "__main__":
  main()
