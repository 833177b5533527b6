"""Every press through the command line: budgets per layer, exact totals, cache bytes, speed, text.

Runs `python -m adakv_jax generate --json` as a subprocess for each press and budget on one ~1K-token
prompt file (chat template, question at the end) and checks the kept entries against the budget rule
(ADAKV_SPEC 3.4-3.6): B counts the window, so a flat press keeps exactly H_kv x B entries in every layer
(uniform presses: exactly B in every head); a pyramid press keeps H_kv x (B'_l + w) in layer l, with B'_l
from the library's schedule, B'_0 <= 2B' - B'//20, B'_last >= B'//20, and the sum over layers exactly
num_layers x H_kv x B.

    python experiments/press_sweep.py           # ~6.5-8 min on 2 shared CPU cores (one model load per run)
    python experiments/press_sweep.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import common
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from adakv_jax.press import make_press

PRESSES = ("snapkv", "ada-snapkv", "pyramidkv", "ada-pyramidkv", "h2o", "ada-h2o", "streamingllm", "knorm",
           "random")
QUESTION = "Summarise the text above in one sentence."
NUM_LAYERS, KV_HEADS = 30, 3  # SmolLM2-135M; checked against the CLI's output


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  p.add_argument("--ctx-tokens", type=int, default=960)
  p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
  p.add_argument("--presses", nargs="+", default=list(PRESSES))
  p.add_argument("--max-new-tokens", type=int, default=16)
  a = p.parse_args()
  if a.quick:
    a.ctx_tokens, a.budgets, a.presses, a.max_new_tokens = 200, [64], ["ada-snapkv", "pyramidkv"], 4
  return a


def cli(prompt_file: str, press: str, budget: int | None, max_new: int) -> tuple[dict, float]:
  """One CLI run: (its JSON, wall seconds incl. interpreter start and model load)."""
  cmd = [sys.executable, "-m", "adakv_jax", "generate", "--model", common.MODEL, "--prompt-file", prompt_file,
         "--press", press, "--json", "--max-new-tokens", str(max_new), "--backend", common.BACKEND,
         "--dtype", common.DTYPE]
  if budget is not None:
    cmd += ["--budget", str(budget)]
  env = {**os.environ, "PYTHONPATH": str(common.REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
  with common.Timer() as t:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.REPO, timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1]), t.s


def expected_layer_budgets(press_name: str, budget: int, prompt_len: int) -> np.ndarray:
  """Per-head average budget of each layer incl. the window, from the library's schedule."""
  press = make_press(press_name, budget=budget)
  return np.asarray(press.layer_budgets(NUM_LAYERS, jnp.asarray([prompt_len])))[:, 0]


def check(out: dict, press_name: str, budget: int) -> dict:
  """The budget rule on the CLI's per-(layer, head) counts."""
  b = np.asarray(out["budgets"])  # [layers, kv heads], window included
  expect = expected_layer_budgets(press_name, budget, out["prompt_tokens"]) * b.shape[1]
  totals = b.sum(-1)
  w, bp = 32, budget - 32
  res = {
      "layer_totals_equal_expected": bool(np.array_equal(totals, expect)),
      "sum_over_layers": int(totals.sum()),
      "expected_sum_over_layers": NUM_LAYERS * KV_HEADS * budget,
      "shape_ok": list(b.shape) == [NUM_LAYERS, KV_HEADS],
  }
  res["sum_exact"] = res["sum_over_layers"] == res["expected_sum_over_layers"]
  if "pyramid" in press_name:
    lo, hi = bp // 20, 2 * bp - bp // 20
    res["pyramid_first_last"] = [int(expect[0] // KV_HEADS), int(expect[-1] // KV_HEADS)]
    res["pyramid_in_range"] = bool(expect[0] // KV_HEADS <= hi + w and expect[-1] // KV_HEADS >= lo + w
                                   and np.all(np.diff(expect) <= 0))
  if not press_name.startswith("ada-"):
    res["every_head_equal_layer_budget"] = bool(np.all(b * b.shape[1] == expect[:, None]))
  return res


def row_of(out: dict, press: str, budget, wall: float) -> dict:
  return {
      "press": press, "budget": budget, "prompt_tokens": out["prompt_tokens"],
      "cache_mib": out["cache_bytes"] / 2**20, "full_cache_mib": out["full_cache_bytes"] / 2**20,
      "cache_ratio": out["cache_bytes"] / out["full_cache_bytes"],
      "live_mib": out["live_cache_bytes"] / 2**20, "padding_overhead": out["padding_overhead"],
      "prefill_s": out["prefill_s"], "decode_tokens_per_s": out["decode_tokens_per_s"], "cli_wall_s": round(wall, 1),
      "retained_mass_mean": float(np.mean(out["retained_mass"])) if "retained_mass" in out else None,
      "text": out["text"], "notes": out["notes"],
  }


def plot(rows, budgets, presses, name):
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(12, 5))
  width = 0.8 / len(budgets)
  full = next(r for r in rows if r["press"] == "full")
  for j, bud in enumerate(budgets):
    rs = [next(r for r in rows if r["press"] == p and r["budget"] == bud) for p in presses]
    x = np.arange(len(presses)) + (j - (len(budgets) - 1) / 2) * width
    ax.bar(x, [r["cache_mib"] for r in rs], width, color=f"C{j}", alpha=0.45,
           label=f"budget {bud}: allocated")
    ax.bar(x, [r["live_mib"] for r in rs], width * 0.5, color=f"C{j}", label=f"budget {bud}: live entries")
  ax.axhline(full["cache_mib"], color="k", ls="--", label=f"full cache {full['cache_mib']:.1f} MiB")
  ax.set_xticks(range(len(presses)), presses, rotation=20)
  ax.set_ylabel("KV cache during decoding (MiB)")
  ax.set_title(f"SmolLM2-135M-Instruct, {full['prompt_tokens']}-token prompt via the CLI: allocated (padded) "
               "vs live cache per press and budget", fontsize=10)
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
      out, wall = cli(fh.name, press, budget, a.max_new_tokens)
      rows.append(row_of(out, press, budget, wall))
      if budget is not None:
        c = check(out, press, budget)
        checks.append({"press": press, "budget": budget, **c, "budgets": out["budgets"],
                       "layer_totals": out["layer_totals"]})
        rows[-1]["totals_ok"] = c["layer_totals_equal_expected"] and c["sum_exact"]
    os.unlink(fh.name)
  payload = {"meta": common.run_meta(a, wall_s=round(total.s, 1), question=QUESTION, prompt_text_chars=len(text),
                                     command="python -m adakv_jax generate --model smollm2-135m --prompt-file F "
                                             "--press P --budget B --json --max-new-tokens N --backend xla"),
             "rows": rows, "checks": checks}
  common.write_json(name, payload)
  plot(rows, a.budgets, a.presses, name)
  common.print_table(rows, ["press", "budget", "cache_mib", "cache_ratio", "live_mib", "padding_overhead",
                            "prefill_s", "decode_tokens_per_s", "totals_ok", "cli_wall_s"])
  print(f"total {total.s:.0f}s")


if __name__ == "__main__":
  main()
