"""Decode speed and cache size vs context length: full cache vs Ada-SnapKV (budget 128), on CPU.

For each context length (raw pydoc text, no chat template): compile `model.prefill` ahead of time, time
its run (compile time recorded apart), then time N single-token `decode_step`s after two warm-up steps,
each with block_until_ready, the full cache's and Ada-SnapKV's steps alternating; report the median (and
min) ms/token. These are CPU numbers on a shared 2-core
machine with the XLA backend (the Pallas kernels only run interpreted on CPU): they show the trend, not
what an accelerator does.

    python experiments/bench_efficiency.py                       # 512..8000 tokens, ~5-8 min on 2 cores
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
  p.add_argument("--steps", type=int, default=32, help="timed decode steps per press")
  p.add_argument("--warmup", type=int, default=2)
  a = p.parse_args()
  if a.quick:
    a.lengths, a.steps = [256], 4
  return a


def time_prefill(params, cfg, ids, press, capacity):
  """(compile_s, run_s, cache, last logits): AOT-compiled prefill, then the fastest of `repeats` runs."""
  tokens, len_B, chunk = common.pad_batch([ids])
  key = common.prefill_key()
  kw = dict(cfg=cfg, press=press, capacity=capacity, chunk=chunk)
  with common.Timer() as tc:
    exe = model_lib.prefill.lower(params, tokens, len_B, key, **kw).compile()
  runs = []
  for _ in range(3 if len(ids) <= 2048 else 1):
    with common.Timer() as tr:
      logits, cache, _ = jax.block_until_ready(exe(params, tokens, len_B, key))
    runs.append(tr.s)
  return tc.s, min(runs), cache, logits


class Decoder:
  """Greedy single-token decode steps on one cache, each timed with block_until_ready."""

  def __init__(self, params, cfg, logits, cache):
    self.params, self.cfg, self.cache = params, cfg, cache
    self.tok = jnp.argmax(logits, -1).astype(jnp.int32)
    self.ms = []

  def step(self, record: bool = True):
    with common.Timer() as t:
      self.tok, _, self.cache = decode_step(self.params, self.tok, self.cache, jax.random.PRNGKey(0),
                                            cfg=self.cfg, sampling=Sampling(), backend=common.BACKEND)
      jax.block_until_ready(self.tok)
    if record:
      self.ms.append(t.s * 1e3)


def prepare(params, cfg, ids, pname, budget, extra):
  """Prefill one press on ids: (row with prefill timings and cache size, Decoder)."""
  press = make_press(pname, budget=budget) if pname != "full" else None
  if press is None:  # the full prefill writes the whole padded prompt
    chunk = model_lib.prompt_chunk(len(ids))
    capacity = max(len(ids) + extra, -(-len(ids) // chunk) * chunk)
  else:
    capacity = press.capacity(cfg.num_layers, len(ids), extra)
  compile_s, prefill_s, cache, logits = time_prefill(params, cfg, ids, press, capacity)
  row = {"press": pname, "budget": budget if press else None, "context": len(ids), "capacity": capacity,
         "prefill_compile_s": round(compile_s, 2), "prefill_s": round(prefill_s, 3),
         "cache_mib": cache.nbytes() / 2**20, "live_mib": cache.live_bytes() / 2**20}
  return row, Decoder(params, cfg, logits, cache)


def bench_length(params, cfg, ids, budget, steps, warmup):
  """Both presses on one context; their decode steps alternate so that load from other processes hits
  both alike."""
  pairs = [prepare(params, cfg, ids, p, budget, warmup + steps + 1) for p in ("full", "ada-snapkv")]
  for _ in range(warmup):
    for _, dec in pairs:
      dec.step(record=False)
  for _ in range(steps):
    for _, dec in pairs:
      dec.step()
  rows = []
  for row, dec in pairs:
    row.update(decode_ms_per_token=round(float(np.median(dec.ms)), 2),
               decode_ms_min=round(float(np.min(dec.ms)), 2), decode_ms_all=[round(x, 2) for x in dec.ms])
    rows.append(row)
  return rows


def plot(rows, name, budget):
  plt = common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for pname, style in (("full", "k--o"), ("ada-snapkv", "C0-o")):
    rs = sorted((r for r in rows if r["press"] == pname), key=lambda r: r["context"])
    label = "full cache" if pname == "full" else f"ada-snapkv, budget {budget}"
    ax1.plot([r["context"] for r in rs], [r["decode_ms_per_token"] for r in rs], style, label=label + " (median)")
    if "decode_ms_min" in rs[0]:
      ax1.plot([r["context"] for r in rs], [r["decode_ms_min"] for r in rs], ls=":", marker="x",
               color="k" if pname == "full" else "C0", alpha=0.6, label=label + " (min)")
    ax2.plot([r["context"] for r in rs], [r["cache_mib"] for r in rs], style, label=label + " (allocated)")
    if pname != "full":
      ax2.plot([r["context"] for r in rs], [r["live_mib"] for r in rs], "C0:", marker="x",
               label=label + " (live)")
  contexts = sorted({r["context"] for r in rows})
  for ax in (ax1, ax2):
    ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.legend(fontsize=8)
  ax1.set_ylabel("decode ms / token")
  ax1.set_ylim(bottom=0)
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
    rows = [r for n in tqdm(a.lengths, desc="bench")
            for r in bench_length(params, cfg, corpus[:n], a.budget, a.steps, a.warmup)]
  payload = {"meta": common.run_meta(a, wall_s=round(total.s, 1),
                                     note="CPU (2 cores shared with other jobs), XLA backend; decode: median and min over "
                                          "timed steps, full and ada-snapkv steps interleaved; prefill: "
                                          "fastest of 3 runs up to 2048 tokens, one run above"),
             "rows": rows}
  common.write_json(name, payload)
  plot(rows, name, a.budget)
  common.print_table(rows, ["press", "context", "capacity", "prefill_s", "prefill_compile_s",
                            "decode_ms_per_token", "decode_ms_min", "cache_mib", "live_mib"])
  print(f"total {total.s:.0f}s")


if __name__ == "__main__":
  main()
