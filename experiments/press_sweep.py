"""Every press through the command line: budgets per layer, exact totals, cache bytes, speed, text.

Runs `python -m adakv_jax generate --json` as a subprocess for each press and budget on one ~1K-token
prompt file (chat template, question at the end) and checks the kept entries against the budget rule
(ADAKV_SPEC 3.4-3.6, 8): B counts the window, so a flat press keeps exactly H_kv x B entries in every layer
(uniform presses: exactly B in every head); a pyramid press keeps H_kv x (B'_l + w) in layer l, with B'_l
from the library's schedule, B'_0 <= 2B' - B'//20, B'_last >= B'//20, and the sum over layers exactly
num_layers x H_kv x B. At page granularity budgets count whole pages and each head also keeps the prefix
tokens past its last whole page-sized chunk. Memory is the CLI's: allocated, kept and decode-room bytes.

    python -m experiments.press_sweep           # ~6.5-8 min on 2 shared CPU cores (one model load per run)
    python -m experiments.press_sweep --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from tqdm import tqdm

from adakv_jax.press import PRESETS
from experiments import common

PRESSES = tuple(name for name in PRESETS if name != "full")
QUESTION = "Summarise the text above in one sentence."


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  p.add_argument("--ctx-tokens", type=int, default=960)
  p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
  p.add_argument("--presses", nargs="+", default=list(PRESSES))
  p.add_argument("--max-new-tokens", type=int, default=16)
  common.add_press_args(p)
  a = p.parse_args()
  if a.quick:
    a.ctx_tokens, a.budgets, a.presses, a.max_new_tokens = 200, [64], ["ada-snapkv", "pyramidkv"], 4
  return a


def cli(prompt_file: str, press: str, budget: int | None, a) -> tuple[dict, float]:
  """One CLI run: (its JSON, wall seconds incl. interpreter start and model load)."""
  cmd = [
    sys.executable,
    "-m",
    "adakv_jax",
    "generate",
    "--model",
    common.MODEL,
    "--prompt-file",
    prompt_file,
    "--press",
    press,
    "--json",
    "--max-new-tokens",
    str(a.max_new_tokens),
    "--backend",
    common.BACKEND,
    "--dtype",
    common.DTYPE,
    "--page-size",
    str(a.page_size),
  ]
  if budget is not None:
    cmd += ["--budget", str(budget), "--granularity", a.granularity]
  with common.Timer() as t:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.REPO, timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1]), t.s


def check(out: dict, press_name: str, budget: int, a) -> dict:
  """The budget rule on the CLI's per-(layer, head) counts."""
  press = common.build_press(press_name, a, budget=budget)
  b = np.asarray(out["budgets"])  # [layers, kv heads], window included
  layers, heads = b.shape
  n = out["prompt_tokens"]
  expect = common.expected_layer_totals(press, layers, heads, n, a.page_size)
  totals = b.sum(-1)
  tail = max(n - press.window, 0) % a.page_size if press.granularity == "page" else 0
  res = {
    "layer_totals_equal_expected": bool(np.array_equal(totals, expect)),
    "sum_over_layers": int(totals.sum()),
    "expected_sum_over_layers": layers * heads * (budget + tail),
  }
  res["sum_exact"] = res["sum_over_layers"] == res["expected_sum_over_layers"]
  if "pyramid" in press_name:
    units = np.asarray(press.layer_units(layers, [n], a.page_size))[:, 0]
    bp = (budget - press.window) // (a.page_size if press.granularity == "page" else 1)
    lo, hi = bp // press.pyramid_beta, 2 * bp - bp // press.pyramid_beta
    res["pyramid_first_last"] = [int(expect[0] // heads), int(expect[-1] // heads)]
    res["pyramid_in_range"] = bool(units[0] <= hi and units[-1] >= lo and np.all(np.diff(units) <= 0))
  if not press_name.startswith("ada-"):
    res["every_head_equal_layer_budget"] = bool(np.all(b * heads == expect[:, None]))
  return res


def row_of(out: dict, press: str, budget, wall: float) -> dict:
  mib = lambda x: x / 2**20
  return {
    "press": press,
    "budget": budget,
    "prompt_tokens": out["prompt_tokens"],
    "cache_mib": mib(out["cache_bytes"]),
    "kept_mib": mib(out["kept_bytes"]),
    "decode_room_mib": mib(out["decode_room_bytes"]),
    "full_cache_mib": mib(out["full_cache_bytes"]),
    "cache_ratio": out["cache_bytes"] / out["full_cache_bytes"],
    "padding_overhead": out["padding_overhead"],
    "page_size": out["page_size"],
    "pages_used": out["pages_used"],
    "pages_allocated": out["pages_allocated"],
    "prefill_s": out["prefill_s"],
    "compile_s": out["compile_s"],
    "decode_tokens_per_s": out["decode_tokens_per_s"],
    "cli_wall_s": round(wall, 1),
    "retained_mass_mean": float(np.mean(out["retained_mass"])) if "retained_mass" in out else None,
    "text": out["text"],
    "notes": out["notes"],
  }


def plot(rows, budgets, presses, name):
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(12, 5))
  width = 0.8 / len(budgets)
  full = next(r for r in rows if r["press"] == "full")
  for j, bud in enumerate(budgets):
    rs = [next(r for r in rows if r["press"] == p and r["budget"] == bud) for p in presses]
    x = np.arange(len(presses)) + (j - (len(budgets) - 1) / 2) * width
    ax.bar(
      x, [r["cache_mib"] for r in rs], width, color=f"C{j}", alpha=0.45, label=f"budget {bud}: allocated"
    )
    ax.bar(
      x,
      [r["kept_mib"] + r["decode_room_mib"] for r in rs],
      width * 0.5,
      color=f"C{j}",
      label=f"budget {bud}: kept + decode room",
    )
  ax.axhline(full["cache_mib"], color="k", ls="--", label=f"full cache {full['cache_mib']:.1f} MiB")
  ax.set_xticks(range(len(presses)), presses, rotation=20)
  ax.set_ylabel("KV cache during decoding (MiB)")
  ax.set_title(
    f"SmolLM2-135M-Instruct, {full['prompt_tokens']}-token prompt via the CLI: allocated vs "
    f"kept + decode room per press and budget (pages of {full['page_size']})",
    fontsize=10,
  )
  ax.legend(fontsize=8, ncol=2)
  fig.tight_layout()
  common.save_png(fig, name)


def main():
  a = parse_args()
  name = common.out_name("press_sweep", a.quick)
  if a.replot:
    d = common.read_json(name)
    return plot(d["rows"], d["meta"]["args"]["budgets"], d["meta"]["args"]["presses"], name)
  with common.Timer() as total:
    tok = common.load()[2]
    text = common.context_text(tok, a.ctx_tokens, start=len(common.topics()) // 3) + "\n\n" + QUESTION
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
      fh.write(text)
    rows, checks = [], []
    grid = [("full", None)] + [(p, b) for p in a.presses for b in a.budgets]
    for press, budget in tqdm(grid, desc="press_sweep"):
      out, wall = cli(fh.name, press, budget, a)
      rows.append(row_of(out, press, budget, wall))
      if budget is not None:
        c = check(out, press, budget, a)
        checks.append(
          {
            "press": press,
            "budget": budget,
            **c,
            "budgets": out["budgets"],
            "layer_totals": out["layer_totals"],
          }
        )
        rows[-1]["totals_ok"] = c["layer_totals_equal_expected"] and c["sum_exact"]
    os.unlink(fh.name)
  payload = {
    "meta": common.run_meta(
      a,
      wall_s=round(total.s, 1),
      question=QUESTION,
      prompt_text_chars=len(text),
      command="python -m adakv_jax generate --model smollm2-135m --prompt-file F "
      "--press P --budget B --granularity G --page-size S --json "
      "--max-new-tokens N --backend xla",
    ),
    "rows": rows,
    "checks": checks,
  }
  common.write_json(name, payload)
  plot(rows, a.budgets, a.presses, name)
  common.print_table(
    rows,
    [
      "press",
      "budget",
      "cache_mib",
      "cache_ratio",
      "kept_mib",
      "decode_room_mib",
      "padding_overhead",
      "pages_used",
      "prefill_s",
      "decode_tokens_per_s",
      "totals_ok",
      "cli_wall_s",
    ],
  )
  print(f"total {total.s:.0f}s")


if __name__ == "__main__":
  main()
