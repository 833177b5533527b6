"""Prefill time against transformers, in one process: adakv-jax's `model.prefill` vs the HF forward.

SmolLM2-135M-Instruct in float32 on both sides, from the same GGUF file (ours: `load_model`; theirs:
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, the same dequantised weights). Each prompt is
the first n tokens of real text (the pydoc topics, no chat template), n = 1024, 4096, 8192: multiples
of the 512-token padding unit, so neither side computes padded positions (at other lengths ours pads
the prompt up to the next multiple of 512). Cells per prompt:
  * ours-full: `model.prefill` without a press (the full cache), AOT-compiled;
  * ours-<press>: `model.prefill` with the press (default ada-snapkv@128), AOT-compiled;
  * transformers: `model(ids, use_cache=True, logits_to_keep=1)` under `torch.inference_mode` with 2 torch
    threads (the last-token logits only, as its generate() asks for in prefill, and as ours returns).
Compilation is timed apart. After one warm-up call per cell the cells run round-robin N times, so load
from other jobs hits them alike; each call records wall time (perf_counter) and the process's CPU time
(process_time: every thread of this process, so XLA's and torch's pools alike). The ratio ours/theirs
is paired by repetition (adjacent calls), with a bootstrap 95% interval of its median.

    python -m experiments.bench_prefill            # 1K, 4K, 8K tokens, N=5: ~30 min on 2 shared cores
    python -m experiments.bench_prefill --quick    # 1K tokens, N=3: ~1-2 min
    python -m experiments.bench_prefill --replot
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads must not spin

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from adakv_jax import model as model_lib
from adakv_jax.cache import plan_cache
from adakv_jax.checkpoints import resolve_model
from adakv_jax.press import make_press, press_label
from experiments import common

TORCH_THREADS = 2


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="one 1K prompt, N=3")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192], help="prompt tokens")
  p.add_argument("--reps", type=int, default=5, help="timed calls per cell, after one warm-up call")
  p.add_argument("--press", default="ada-snapkv")
  p.add_argument("--budget", type=int, default=128)
  p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  a = p.parse_args()
  if a.quick:
    a.lengths, a.reps = [1024], 3
  if a.reps < 1:
    p.error("--reps must be >= 1")
  return a


class Clock:
  """with Clock() as c: ...; c.wall_s, c.cpu_s"""

  def __enter__(self):
    self.w0, self.c0 = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall_s = time.perf_counter() - self.w0
    self.cpu_s = time.process_time() - self.c0


# ---- the two sides -----------------------------------------------------------------------------------


def load_theirs():
  import torch
  import transformers

  torch.set_num_threads(TORCH_THREADS)
  path = resolve_model(common.MODEL)
  with Clock() as c:
    model = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32
    )
  model.eval()
  return model, c.wall_s


def theirs_call(model, ids):
  import torch

  x = torch.tensor([ids], dtype=torch.long)

  def call():
    with torch.inference_mode():
      return model(x, use_cache=True, logits_to_keep=1).logits[0, -1].numpy()

  return call


def ours_call(params, cfg, ids, press):
  """(call, compile Clock, setting): `model.prefill` compiled ahead of time, as generate() sizes it."""
  n = len(ids)
  chunk = model_lib.prompt_chunk(n)
  tokens = jnp.asarray([list(ids) + [0] * (model_lib.padded_length(n) - n)], jnp.int32)
  len_B = jnp.asarray([n], jnp.int32)
  heads = press.cache_heads(cfg.num_heads, cfg.num_kv_heads) if press is not None else cfg.num_kv_heads
  plan = plan_cache(cfg.num_layers, heads, [n], room=1, press=press)
  key = jax.random.PRNGKey(0)
  kw = dict(cfg=cfg, press=press, plan=plan, chunk=chunk)
  with Clock() as c:
    exe = model_lib.prefill.lower(params, tokens, len_B, key, **kw).compile()

  def call():
    logits, cache, _ = jax.block_until_ready(exe(params, tokens, len_B, key))
    return np.asarray(logits[0])

  setting = {"padded_len": int(tokens.shape[1]), "chunk": chunk, "pool_pages": sum(plan.layer_pages)}
  return call, c, setting


# ---- statistics --------------------------------------------------------------------------------------


def summary(xs) -> dict:
  xs = np.asarray(xs, float)
  return {
    "n": int(xs.size),
    "min": float(xs.min()),
    "median": float(np.median(xs)),
    "max": float(xs.max()),
    "all": [round(float(x), 4) for x in xs],
  }


def paired_ratio(ours, theirs, rng) -> dict:
  """Ratios of adjacent calls: median, a bootstrap 95% interval of the median, and the ratio of mins."""
  r = np.asarray(ours, float) / np.asarray(theirs, float)
  boot = np.median(rng.choice(r, size=(2000, r.size), replace=True), axis=1)
  lo, hi = np.percentile(boot, [2.5, 97.5])
  return {
    "median": float(np.median(r)),
    "ci95": [float(lo), float(hi)],
    "min": float(r.min()),
    "max": float(r.max()),
    "ratio_of_mins": float(np.min(ours) / np.min(theirs)),
    "all": [round(float(x), 4) for x in r],
  }


# ---- one prompt --------------------------------------------------------------------------------------


def bench_length(params, cfg, theirs, ids, press, reps, rng) -> dict:
  load_before = os.getloadavg()
  cells, compile_info, settings = {}, {}, {}
  for name, p in (("ours-full", None), (f"ours-{press_label(press)}", press)):
    call, c, settings[name] = ours_call(params, cfg, ids, p)
    cells[name] = call
    compile_info[name] = {"wall_s": round(c.wall_s, 3), "cpu_s": round(c.cpu_s, 3)}
  cells["transformers"] = theirs_call(theirs, ids)
  settings["transformers"] = {
    "padded_len": len(ids),
    "logits_to_keep": 1,
    "use_cache": True,
    "attn_implementation": theirs.config._attn_implementation,
  }
  warm, last = {}, {}
  for name, call in cells.items():
    with Clock() as c:
      last[name] = call()
    warm[name] = {"wall_s": round(c.wall_s, 3), "cpu_s": round(c.cpu_s, 3)}
  times = {name: {"wall_s": [], "cpu_s": []} for name in cells}
  load_during = []
  for _ in range(reps):
    for name, call in cells.items():
      with Clock() as c:
        call()
      times[name]["wall_s"].append(c.wall_s)
      times[name]["cpu_s"].append(c.cpu_s)
    load_during.append(round(os.getloadavg()[0], 2))
  load_after = os.getloadavg()
  row = {
    "prompt_tokens": len(ids),
    "settings": settings,
    "compile": compile_info,
    "warmup_call": warm,
    "cells": {n: {m: summary(v) for m, v in t.items()} for n, t in times.items()},
    "ratio_vs_transformers": {
      n: {m: paired_ratio(times[n][m], times["transformers"][m], rng) for m in ("wall_s", "cpu_s")}
      for n in cells
      if n != "transformers"
    },
    "last_logits_max_abs_diff_vs_transformers": {
      n: float(np.max(np.abs(last[n] - last["transformers"]))) for n in cells if n != "transformers"
    },
    "loadavg_before": [round(x, 2) for x in load_before],
    "loadavg_1min_after_each_round": load_during,
    "loadavg_after": [round(x, 2) for x in load_after],
  }
  return row


# ---- output ------------------------------------------------------------------------------------------


def plot(rows, name):
  plt = common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  names = list(rows[0]["cells"])
  x = np.arange(len(rows))
  width = 0.8 / len(names)
  for i, n in enumerate(names):
    med = [r["cells"][n]["cpu_s"]["median"] for r in rows]
    lo = [r["cells"][n]["cpu_s"]["min"] for r in rows]
    hi = [r["cells"][n]["cpu_s"]["max"] for r in rows]
    err = np.array([np.subtract(med, lo), np.subtract(hi, med)])
    ax1.bar(
      x + (i - (len(names) - 1) / 2) * width,
      med,
      width,
      yerr=err,
      capsize=3,
      label=n,
      color="k" if n == "transformers" else f"C{i}",
    )
  for i, n in enumerate(m for m in names if m != "transformers"):
    rs = [r["ratio_vs_transformers"][n]["cpu_s"] for r in rows]
    med = [q["median"] for q in rs]
    err = np.array([[m - q["ci95"][0] for m, q in zip(med, rs)], [q["ci95"][1] - m for m, q in zip(med, rs)]])
    ax2.errorbar(x + (i - 0.5) * 0.1, med, yerr=err, fmt="o-", capsize=3, color=f"C{i}", label=n)
  ax2.axhline(1.0, color="k", ls="--", lw=1, label="transformers")
  labels = [str(r["prompt_tokens"]) for r in rows]
  for ax in (ax1, ax2):
    ax.set_xticks(x, labels)
    ax.set_xlabel("prompt tokens")
    ax.legend(fontsize=8)
  ax1.set_ylabel("CPU s per prefill (median, min..max)")
  ax1.set_yscale("log")
  ax2.set_ylabel("CPU time ours / transformers\n(paired median, bootstrap 95%)")
  ax2.set_ylim(bottom=0)
  fig.suptitle(
    "Prefill, SmolLM2-135M-Instruct float32, one process on a shared 2-core CPU "
    "(jax XLA vs torch, 2 threads)",
    fontsize=10,
  )
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  common.save_png(fig, name)


def matmul_gflops(reps: int = 5) -> dict:
  """float32 [4096, 576] @ [576, 1536] (SmolLM2's MLP shape at 4K tokens) per side, GFLOP/s of CPU time."""
  import torch

  a, b = np.ones((4096, 576), np.float32), np.ones((576, 1536), np.float32)
  flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
  ja, jb, mm = jnp.asarray(a), jnp.asarray(b), jax.jit(jnp.matmul)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  sides = {"jax": lambda: mm(ja, jb).block_until_ready(), "torch": lambda: torch.matmul(ta, tb)}
  out = {}
  for side, fn in sides.items():
    fn()
    cpu = []
    for _ in range(reps):
      with Clock() as c:
        fn()
      cpu.append(c.cpu_s)
    out[side] = round(flops / np.median(cpu) / 1e9, 1)
  return out


def main():
  a = parse_args()
  name = common.out_name("bench_prefill", a.quick)
  if a.replot:
    return plot(common.read_json(name)["rows"], name)
  import jaxlib
  import torch
  import transformers

  with Clock() as total:
    cfg, params, tok = common.load()
    theirs, theirs_load_s = load_theirs()
    press = make_press(a.press, budget=a.budget)
    rng = np.random.default_rng(a.seed)
    corpus = tok.encode("\n\n".join(common.topics()), add_special_tokens=False)
    if max(a.lengths) > min(len(corpus), cfg.max_position_embeddings):
      raise SystemExit(f"--lengths: at most {min(len(corpus), cfg.max_position_embeddings)} tokens")
    rows = []
    for n in a.lengths:
      rows.append(bench_length(params, cfg, theirs, corpus[:n], press, a.reps, rng))
      print_rows(rows[-1:])
  meta = common.run_meta(
    a,
    wall_s=round(total.wall_s, 1),
    matmul_gflops_per_cpu_s=matmul_gflops(),
    jaxlib_version=jaxlib.__version__,
    torch_version=torch.__version__,
    transformers_version=transformers.__version__,
    torch_threads=torch.get_num_threads(),
    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    transformers_load_s=round(theirs_load_s, 1),
    note="CPU time = time.process_time of this process around each call (all threads); ratios are "
    "paired by repetition; compile excluded from the timed calls and reported under 'compile'",
  )
  common.write_json(name, {"meta": meta, "rows": rows})
  plot(rows, name)


def print_rows(rows):
  table = []
  for r in rows:
    for n, c in r["cells"].items():
      ratio = r["ratio_vs_transformers"].get(n, {}).get("cpu_s", {})
      table.append(
        {
          "tokens": r["prompt_tokens"],
          "cell": n,
          "cpu_med_s": c["cpu_s"]["median"],
          "wall_med_s": c["wall_s"]["median"],
          "cpu_ratio": ratio.get("median", 1.0),
          "ci95": "-".join(f"{x:.3f}" for x in ratio.get("ci95", [])),
          "compile_s": r["compile"].get(n, {}).get("wall_s", ""),
          "load": r["loadavg_after"][0],
        }
      )
  common.print_table(
    table, ["tokens", "cell", "cpu_med_s", "wall_med_s", "cpu_ratio", "ci95", "compile_s", "load"]
  )


if __name__ == "__main__":
  main()
