"""Decode speed and cache size vs context length: full cache vs Ada-SnapKV (budget 128), on CPU.

For each context length (raw pydoc text, no chat template): compile `model.prefill` ahead of time, time
its run (compile time recorded apart), then time N single-token `decode_step`s after two warm-up steps,
each with block_until_ready; report the median ms/token. These are CPU numbers on a shared 2-core
machine with the XLA backend (the Pallas kernels only run interpreted on CPU): they show the trend, not
what an accelerator does.

    python experiments/bench_efficiency.py                       # 512..8000 tokens, ~7 min on 2 cores
    python experiments/bench_efficiency.py --lengths 512 1024    # a subset
    python experiments/bench_efficiency.py --quick
"""

from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from adakv_jax import model as model_lib
from adakv_jax.generation import Sampling, decode_step
from adakv_jax.press import make_press


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8000],
                 help="context tokens (8000: the model's 8192 context less the decode room)")
  p.add_argument("--budget", type=int, default=128)
  p.add_argument("--steps", type=int, default=16, help="timed decode steps")
  p.add_argument("--warmup", type=int, default=2)
  a = p.parse_args()
  if a.quick:
    a.lengths, a.steps = [256], 4
  return a


def time_prefill(params, cfg, ids, press, capacity):
  """(compile_s, run_s, cache, last logits): AOT-compiled prefill, then one timed run (median of 3 when
  short)."""
  tokens, len_B, chunk = common.pad_batch([ids])
  key = common.prefill_key()
  kw = dict(cfg=cfg, press=press, capacity=capacity, chunk=chunk)
  with common.Timer() as tc:
    exe = model_lib.prefill.lower(params, tokens, len_B, key, **kw).compile()
  runs = []
  for _ in range(3 if len(ids) <= 1024 else 1):
    with common.Timer() as tr:
      logits, cache, _ = jax.block_until_ready(exe(params, tokens, len_B, key))
    runs.append(tr.s)
  return tc.s, float(np.median(runs)), cache, logits


def time_decode(params, cfg, logits, cache, steps, warmup):
  """Median and all per-step ms of single-token greedy decode steps after `warmup` untimed ones."""
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  key = jax.random.PRNGKey(0)
  ms = []
  for i in range(warmup + steps):
    with common.Timer() as t:
      tok, _, cache = decode_step(params, tok, cache, key, cfg=cfg, sampling=Sampling(), backend=common.BACKEND)
      jax.block_until_ready(tok)
    if i >= warmup:
      ms.append(t.s * 1e3)
  return float(np.median(ms)), ms, cache


def bench(params, cfg, ids, pname, budget, steps, warmup):
  press = make_press(pname, budget=budget) if pname != "full" else None
  extra = warmup + steps + 1
  if press is None:  # the full prefill writes the whole padded prompt
    chunk = model_lib.prompt_chunk(len(ids))
    capacity = max(len(ids) + extra, -(-len(ids) // chunk) * chunk)
  else:
    capacity = press.capacity(cfg.num_layers, len(ids), extra)
  compile_s, prefill_s, cache, logits = time_prefill(params, cfg, ids, press, capacity)
  live = cache.live_bytes()
  nbytes = cache.nbytes()
  med, ms, cache = time_decode(params, cfg, logits, cache, steps, warmup)
  return {"press": pname, "budget": budget if press else None, "context": len(ids), "capacity": capacity,
          "prefill_compile_s": round(compile_s, 2), "prefill_s": round(prefill_s, 3),
          "decode_ms_per_token": round(med, 2), "decode_ms_all": [round(x, 2) for x in ms],
          "cache_mib": nbytes / 2**20, "live_mib": live / 2**20}


def plot(rows, name, budget):
  plt = common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for pname, style in (("full", "k--o"), ("ada-snapkv", "C0-o")):
    rs = sorted((r for r in rows if r["press"] == pname), key=lambda r: r["context"])
    label = "full cache" if pname == "full" else f"ada-snapkv, budget {budget}"
    ax1.plot([r["context"] for r in rs], [r["decode_ms_per_token"] for r in rs], style, label=label)
    ax2.plot([r["context"] for r in rs], [r["cache_mib"] for r in rs], style, label=label + " (allocated)")
    if pname != "full":
      ax2.plot([r["context"] for r in rs], [r["live_mib"] for r in rs], "C0:", marker="x",
               label=label + " (live)")
  for ax in (ax1, ax2):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.legend(fontsize=8)
  ax1.set_ylabel("decode ms / token (median)")
  ax1.set_title("steady-state decode step, batch 1", fontsize=10)
  ax2.set_ylabel("KV cache (MiB)")
  ax2.set_yscale("log")
  ax2.set_title("KV cache during decoding", fontsize=10)
  fig.suptitle("SmolLM2-135M-Instruct, float32, XLA backend on a shared 2-core CPU (not accelerator numbers)",
               fontsize=10)
  fig.tight_layout()
  common.save_png(fig, name)


def main():
  a = parse_args()
  name = common.out_name("bench_efficiency", a.quick)
  if a.replot:
    d = common.read_json(name)
    return plot(d["rows"], name, d["meta"]["args"]["budget"])
  with common.Timer() as total:
    cfg, params, tok = common.load()
    corpus = tok.encode("\n\n".join(common.topics()), add_special_tokens=False)
    grid = [(n, p) for n in a.lengths for p in ("full", "ada-snapkv")]
    rows = [bench(params, cfg, corpus[:n], p, a.budget, a.steps, a.warmup) for n, p in tqdm(grid, desc="bench")]
  payload = {"meta": common.run_meta(a, wall_s=round(total.s, 1),
                                     note="CPU (2 shared cores), XLA backend; decode median over timed steps"),
             "rows": rows}
  common.write_json(name, payload)
  plot(rows, name, a.budget)
  common.print_table(rows, ["press", "context", "capacity", "prefill_s", "prefill_compile_s",
                            "decode_ms_per_token", "cache_mib", "live_mib"])
  print(f"total {total.s:.0f}s")


if __name__ == "__main__":
  main()
