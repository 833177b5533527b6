"""Decode speed and allocated cache memory vs context length, against the byte bound, on CPU.

For each context length (raw pydoc text, no chat template) one prefill captures every layer
(`model.run_prefill` + `CaptureTap`); each press's paged cache is then built from that capture
(`model.cache_from_capture`, what `prefill` would return) and trimmed as `generate` trims it. Decoding runs
the library's on-device loop (`generation.decode_loop`), `--steps` tokens per call, compile excluded; the
presses' calls are interleaved round by round so that load from other jobs hits every press alike.

The byte bound of a decode step is the time to stream the weights and the live cache once, at the rate
this same process streams the weights alone: that rate is measured by a decode loop over a 16-token full
cache (weights + a negligible cache), interleaved with the others. `bound_ratio` = measured / bound.

    python -m experiments.bench_efficiency                  # 1024..8000 tokens, ~10 min on 2 cores
    python -m experiments.bench_efficiency --quick          # a tiny smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from adakv_jax import generation
from adakv_jax import model as model_lib
from adakv_jax.cache import plan_cache
from adakv_jax.checkpoints import load_model
from adakv_jax.press import make_press, press_label
from experiments import common

RESULTS = Path(__file__).resolve().parent / "results"
PRESSES = {  # name -> (preset, overrides); None = the full cache
  "full": None,
  "snapkv": ("snapkv", {}),
  "ada-snapkv": ("ada-snapkv", {}),
  "ada-snapkv/page": ("ada-snapkv", dict(granularity="page")),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument(
    "--lengths",
    type=int,
    nargs="+",
    default=[1024, 2048, 4096, 8000],
    help="context tokens (8000: the 8192 context less the decode room)",
  )
  p.add_argument("--budget", type=int, default=128)
  p.add_argument("--steps", type=int, default=32, help="decode steps per timed loop call")
  p.add_argument("--rounds", type=int, default=7, help="timed calls per press (after one warm-up call)")
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  a = p.parse_args(argv)
  if a.quick:
    a.lengths, a.steps, a.rounds = [256, 512], 4, 2
  return a


def context_ids(tok, n: int) -> list[int]:
  from pydoc_data.topics import topics

  ids = tok.encode("\n\n".join(topics[k].strip() for k in sorted(topics)), add_special_tokens=False)
  if len(ids) < n:
    raise ValueError(f"the pydoc text has {len(ids)} tokens, fewer than {n}")
  return ids[:n]


def build_caches(params, cfg, ids, presses, a):
  """One capture prefill, then each press's cache from it. Returns ({name: cache}, prefill seconds)."""
  n = len(ids)
  tokens = jnp.asarray([ids + [0] * (model_lib.padded_length(n) - n)], jnp.int32)
  len_B = jnp.asarray([n], jnp.int32)
  window = max((p.window for p in presses.values() if p is not None), default=1)
  run = jax.jit(model_lib.run_prefill, static_argnames=("cfg", "chunk", "tap"))
  kw = dict(
    cfg=cfg, chunk=model_lib.prompt_chunk(n), tap=model_lib.CaptureTap(window=window, with_colsum=False)
  )
  jax.block_until_ready(run(params, tokens, len_B, **kw))  # compile
  t0 = time.perf_counter()
  _, captured = jax.block_until_ready(run(params, tokens, len_B, **kw))
  prefill_s = time.perf_counter() - t0
  caches = {}
  room = a.steps * (a.rounds + 1) + 1
  for name, press in presses.items():
    heads = press.cache_heads(cfg.num_heads, cfg.num_kv_heads) if press else cfg.num_kv_heads
    plan = plan_cache(cfg.num_layers, heads, [n], room=room, press=press, page_size=a.page_size)
    cache, _ = model_lib.cache_from_capture(
      captured, len_B, jax.random.PRNGKey(0), cfg=cfg, press=press, plan=plan
    )
    caches[name] = cache.trim()
  return caches, prefill_s


def time_decode(params, cfg, states, a):
  """Interleaved rounds of one decode_loop call per cache; ms/token per round for each."""
  loop = lambda st: generation.decode_loop(
    params, st, cfg=cfg, sampling=generation.Sampling(), eos_ids=(), steps=a.steps, backend="xla"
  )
  for name in states:  # warm-up (compiles)
    states[name] = jax.block_until_ready(loop(states[name]))
  ms = {name: [] for name in states}
  for _ in range(a.rounds):
    for name in states:
      t0 = time.perf_counter()
      states[name] = jax.block_until_ready(loop(states[name]))
      ms[name].append((time.perf_counter() - t0) * 1e3 / a.steps)
  return ms


def start(cache, a):
  first = jnp.zeros((1,), jnp.int32) + 13
  return generation.start_decode(first, cache, jax.random.PRNGKey(0), a.steps * (a.rounds + 1) + 1, ())


def summary(xs) -> dict:
  xs = np.asarray(xs, float)
  return {"n": len(xs), "median": float(np.median(xs)), "min": float(xs.min()), "max": float(xs.max())}


def paired_ratio(num, den) -> dict:
  """Median of per-round ratios with the range over rounds (pairs share the round's load)."""
  r = np.asarray(num, float) / np.asarray(den, float)
  return {"n": len(r), "median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}


def main(argv=None):
  a = parse_args(argv)
  name = "bench_efficiency_quick" if a.quick else "bench_efficiency"
  if a.replot:
    plot(json.loads((RESULTS / f"{name}.json").read_text()), name)
    return
  cfg, params, tok = load_model(a.model)
  params = jax.device_put(params)
  weight_bytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params))
  presses = {k: (make_press(v[0], budget=a.budget, **v[1]) if v else None) for k, v in PRESSES.items()}
  base_ids = context_ids(tok, 16)
  rows = []
  for n in tqdm(a.lengths, desc="context"):
    ids = context_ids(tok, n)
    caches, prefill_s = build_caches(params, cfg, ids, presses, a)
    ref_caches, _ = build_caches(params, cfg, base_ids, {"weights-only": None}, a)
    states = {k: start(c, a) for k, c in {**ref_caches, **caches}.items()}
    live = {k: int(c.kept_bytes()) for k, c in {**ref_caches, **caches}.items()}
    alloc = {k: int(c.nbytes()) for k, c in {**ref_caches, **caches}.items()}
    ms = time_decode(params, cfg, states, a)
    t_w = np.asarray(ms["weights-only"]) / 1e3
    rate_per_round = (weight_bytes + live["weights-only"]) / t_w  # bytes/s streamed, per round
    for k in caches:
      bound_ms = (weight_bytes + live[k]) / rate_per_round * 1e3
      rows.append(
        {
          "context": n,
          "press": k,
          "press_label": press_label(presses[k]),
          "ms_per_token": summary(ms[k]),
          "bound_ms": summary(bound_ms),
          "bound_ratio": paired_ratio(ms[k], bound_ms),
          "vs_full": paired_ratio(ms[k], ms["full"]),
          "allocated_mib": alloc[k] / 2**20,
          "kept_mib": live[k] / 2**20,
          "capture_prefill_s": prefill_s,
        }
      )
    rows.append(
      {
        "context": n,
        "press": "weights-only",
        "ms_per_token": summary(ms["weights-only"]),
        "weights_gb_per_s": summary(rate_per_round / 1e9),
      }
    )
  payload = {
    "script": "experiments/bench_efficiency.py",
    "args": vars(a),
    "model": a.model,
    "dtype": cfg.dtype,
    "backend": "xla",
    "weight_bytes": weight_bytes,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "jax_version": jax.__version__,
    "device": str(jax.devices()[0]),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "machine": common.machine(),
    "load_average": os.getloadavg(),
    "method": "per context: one capture prefill; each press's paged cache from it (cache_from_capture, "
    "trimmed); ms/token = one decode_loop call of `steps` tokens / steps, compile excluded, "
    "presses interleaved per round; bound = (weights + kept cache bytes) / the rate a 16-token "
    "full-cache loop streams the weights in the same round",
    "rows": rows,
  }
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
  print(f"wrote experiments/results/{name}.json")
  for r in rows:
    if r["press"] != "weights-only":
      print(
        f"{r['context']:>6} {r['press']:<16} {r['ms_per_token']['median']:7.1f} ms/token  "
        f"bound x{r['bound_ratio']['median']:.2f}  {r['allocated_mib']:8.2f} MiB allocated  "
        f"({r['kept_mib']:.2f} kept)"
      )
  plot(payload, name)


def plot(payload, name):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [r for r in payload["rows"] if r["press"] != "weights-only"]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for press in dict.fromkeys(r["press"] for r in rows):
    rs = [r for r in rows if r["press"] == press]
    x = [r["context"] for r in rs]
    axes[0].plot(x, [r["ms_per_token"]["median"] for r in rs], "o-", label=press)
    axes[1].plot(x, [r["allocated_mib"] for r in rs], "o-", label=press)
    axes[2].plot(x, [r["bound_ratio"]["median"] for r in rs], "o-", label=press)
  axes[0].set_ylabel("decode ms / token (median)")
  axes[1].set_ylabel("allocated cache MiB")
  axes[1].set_yscale("log")
  axes[2].set_ylabel("measured / byte bound")
  axes[2].axhline(1.3, color="grey", ls="--", lw=1)
  for ax in axes:
    ax.set_xlabel("context tokens")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(
    f"{payload['model']} {payload['dtype']}, XLA on {payload['cpu_count']} CPU cores "
    f"(budget {payload['args']['budget']}, page {payload['args']['page_size']})"
  )
  fig.tight_layout()
  fig.savefig(RESULTS / f"{name}.png", dpi=110)
  print(f"wrote experiments/results/{name}.png")


if __name__ == "__main__":
  main()
