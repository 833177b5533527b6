"""Kernel benchmark: ragged decode attention vs the sum of lengths, skewed vs uniform budgets, top-k.

At a fixed cache capacity, times one decode step of `ragged_decode_attention` as every head's length goes
from 12.5% to 100% of the capacity (the kernel should follow the fill: at 25% it should take at most ~35%
of the full-capacity time), and with skewed per-head lengths against uniform ones of the same total (the
two should be within ~10%). Each Pallas timing sits beside the dense XLA reference, whose cost follows the
capacity. Also times `cross_head_topk` against its lax.top_k reference.

On a GPU or TPU the kernels compile natively and the script reports achieved bandwidth (live K/V bytes
read per second) against the device's peak. On CPU the Pallas kernels only run in the interpreter: those
timings are recorded with `meaningful: false` and say nothing about performance. What does carry over
from CPU is `modeled_fetch_fraction`: the share of the capacity's K/V blocks the TPU kernel's clamped
index maps fetch, counted from the same rule the kernel uses (checked by tests/kernels).

    python experiments/bench_kernels.py           # accelerator sizes (bf16, capacity 16384)
    python experiments/bench_kernels.py --quick   # small CPU smoke run, ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pallas_kernels import backend as backend_lib
from pallas_kernels.cross_head_topk import cross_head_topk
from pallas_kernels.ragged_decode_attention import _default_block_size, ragged_decode_attention

# Peak HBM bandwidth (bytes/s) by jax device_kind prefix, from the vendors' datasheets.
PEAK_BW = {
    "NVIDIA H200": 4.8e12, "NVIDIA H100 PCIe": 2.0e12, "NVIDIA H100": 3.35e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12, "NVIDIA A100": 1.555e12, "NVIDIA L4": 0.3e12,
    "TPU v4": 1.2e12, "TPU v5 lite": 0.819e12, "TPU v5e": 0.819e12, "TPU v5": 2.765e12,
    "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12,
}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes that run interpreted on CPU")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--group", type=int, default=4, help="query heads per KV head")
  p.add_argument("--capacity", type=int, default=16384)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--block-size", type=int, default=None, help="default: the kernel's own choice")
  p.add_argument("--fills", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
  p.add_argument("--skew-fills", type=float, nargs="+", default=[0.25, 0.5],
                 help="mean fills at which skewed and uniform lengths are compared")
  p.add_argument("--topk", type=int, nargs=3, default=[4, 32, 4096], metavar=("B", "H", "N"))
  p.add_argument("--reps", type=int, default=20, help="timed runs (at most 3 for interpreted Pallas)")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  if a.quick:
    a.batch, a.kv_heads, a.group, a.capacity, a.head_dim = 2, 4, 4, 512, 64
    a.dtype, a.block_size, a.topk = "float32", 64, [2, 4, 512]
  return a


def skewed_lengths(rng, batch: int, heads: int, cap: int, mean_fill: float) -> np.ndarray:
  """Per-head lengths with the same per-sequence total as uniform `mean_fill * cap`, spread like
  Ada-KV budgets (a Zipf-like share per head, in random order), water-filled under the capacity."""
  total = round(heads * cap * mean_fill)
  out = np.zeros((batch, heads), np.int64)
  for b in range(batch):
    w = rng.permutation(1.0 / np.arange(1, heads + 1) ** 1.5)
    lens = np.zeros(heads, np.int64)
    while (left := total - lens.sum()) > 0:
      free_w = w * (lens < cap)
      share = np.floor(left * free_w / free_w.sum()).astype(np.int64)
      share[np.argmax(free_w)] += left - share.sum()
      lens = np.minimum(lens + share, cap)
    out[b] = lens
  return out


def time_fn(fn, args, reps: int) -> dict:
  """Compile + first run apart, then `reps` timed runs (each block_until_ready): median and min."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  runs = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - t0)
  return {"first_call_s": first, "median_s": float(np.median(runs)), "min_s": float(np.min(runs))}


def live_bytes(lens: np.ndarray, d: int, itemsize: int) -> int:
  """K and V bytes a length-following kernel must read."""
  return int(lens.sum()) * 2 * d * itemsize


def modeled_fetch_fraction(lens: np.ndarray, cap: int, block: int) -> float:
  """Share of the capacity's K/V blocks the TPU kernel fetches: each head fetches its live blocks once
  (an empty head still names block 0); every dead grid step re-names the block already resident."""
  blocks = np.maximum(-(-lens // block), 1)
  return float(blocks.sum() / (lens.size * -(-cap // block)))


def peak_bandwidth(kind: str) -> float | None:
  for prefix in sorted(PEAK_BW, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_BW[prefix]
  return None


def main():
  a = parse_args()
  plat = jax.default_backend()
  meaningful = plat in ("gpu", "tpu")
  dev = jax.devices()[0]
  dtype = jnp.dtype(a.dtype)
  b, k, g, c, d = a.batch, a.kv_heads, a.group, a.capacity, a.head_dim
  lowering = backend_lib.resolve_lowering(None)
  block = a.block_size or _default_block_size(c, lowering)
  rng = np.random.default_rng(a.seed)
  q = jnp.asarray(rng.standard_normal((b, k, g, d)), dtype)
  kc, vc = (jnp.asarray(rng.standard_normal((b, k, c, d)), dtype) for _ in "kv")
  paths = {
      "xla_reference": jax.jit(lambda *x: ragged_decode_attention(*x, backend="xla")),
      "pallas": jax.jit(lambda *x: ragged_decode_attention(*x, block_size=block, backend="pallas")),
  }
  peak = peak_bandwidth(dev.device_kind) if meaningful else None

  cases = [("fill", f, np.full((b, k), round(f * c))) for f in a.fills]
  for f in a.skew_fills:
    cases += [("uniform", f, np.full((b, k), round(f * c))),
              ("skewed", f, skewed_lengths(rng, b, k, c, f))]
  # Interpreted Pallas on CPU is slow and its timing means little: few reps there, more elsewhere.
  reps_for = lambda name: a.reps if meaningful or name != "pallas" else min(a.reps, 3)
  rows = []
  for kind, fill, lens in tqdm(cases, desc="attention cases"):
    lens_BK = jnp.asarray(lens, jnp.int32)
    row = {"case": kind, "fill": fill, "sum_lengths": int(lens.sum()),
           "lengths_min_max": [int(lens.min()), int(lens.max())],
           "modeled_fetch_fraction": modeled_fetch_fraction(lens, c, block)}
    nbytes = live_bytes(lens, d, dtype.itemsize)
    for name, fn in paths.items():
      t = time_fn(fn, (q, kc, vc, lens_BK), reps_for(name))
      row[name] = t
      if meaningful:
        t["achieved_bw_GBps"] = nbytes / t["median_s"] / 1e9
        t["fraction_of_peak"] = None if peak is None else nbytes / t["median_s"] / peak
    rows.append(row)

  # Acceptance ratios (only meaningful where the kernel compiles natively).
  def med(kind, fill, path):
    return next(r[path]["median_s"] for r in rows if r["case"] == kind and r["fill"] == fill)

  checks = {"evaluated_on_accelerator": meaningful}
  if 0.25 in a.fills and 1.0 in a.fills:
    for path in paths:
      checks[f"{path}_fill25_over_full"] = med("fill", 0.25, path) / med("fill", 1.0, path)
    checks["fill25_target_max"] = 0.35
  for f in a.skew_fills:
    for path in paths:
      checks[f"{path}_skewed_over_uniform_at_{f}"] = med("skewed", f, path) / med("uniform", f, path)
  checks["skew_target_max"] = 1.10

  tb, th, tn = a.topk
  scores = jnp.asarray(rng.standard_normal((tb, th, tn)), jnp.float32)
  cap = tn // 2
  total, floor = jnp.full((tb,), th * tn // 8, jnp.int32), jnp.full((tb,), tn // 32, jnp.int32)
  topk = {}
  for name, bk in tqdm([("xla_reference", "xla"), ("pallas", "pallas")], desc="top-k"):
    fn = jax.jit(lambda s, t, f, bk=bk: cross_head_topk(s, t, f, cap, backend=bk))
    topk[name] = time_fn(fn, (scores, total, floor), reps_for(name))

  payload = {
      "script": "bench_kernels.py",
      "args": vars(a),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git_commit": common.git_commit(),
      "jax_version": jax.__version__,
      "device": str(dev),
      "device_kind": dev.device_kind,
      "platform": platform.platform(),
      "backend_platform": plat,
      "pallas_lowering": lowering,
      "pallas_interpret": backend_lib.default_interpret(),
      "meaningful": meaningful,
      "note": ("native kernels" if meaningful else
               "CPU: the Pallas kernels ran in JAX's interpreter (TPU-style kernel under the TPU "
               "interpreter); their timings are not performance numbers. modeled_fetch_fraction is the "
               "exact share of K/V blocks the TPU kernel's index maps fetch."),
      "shape": {"batch": b, "kv_heads": k, "group": g, "capacity": c, "head_dim": d,
                "dtype": a.dtype, "block_size": block},
      "peak_bandwidth_GBps": None if peak is None else peak / 1e9,
      "attention": rows,
      "checks": checks,
      "topk": {"shape": [tb, th, tn], "cap": cap, **topk},
  }
  name = common.out_name("bench_kernels", a.quick)
  common.write_json(name, payload)
  common.print_table(
      [{"case": r["case"], "fill": r["fill"], "fetch_frac": r["modeled_fetch_fraction"],
        **{f"{p}_ms": r[p]["median_s"] * 1e3 for p in paths}} for r in rows],
      ["case", "fill", "fetch_frac", *(f"{p}_ms" for p in paths)])
  plot(rows, paths, payload, name)


def plot(rows, paths, payload, name):
  plt = common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  fill_rows = [r for r in rows if r["case"] == "fill"]
  fills = [r["fill"] for r in fill_rows]
  full = {p: next(r[p]["median_s"] for r in fill_rows if r["fill"] == 1.0) for p in paths}
  for p in paths:
    ax1.plot(fills, [r[p]["median_s"] / full[p] for r in fill_rows], "o-", label=p)
  ax1.plot(fills, [r["modeled_fetch_fraction"] for r in fill_rows], "k--",
           label="K/V blocks fetched (TPU index maps)")
  ax1.axhline(0.35, color="grey", lw=0.8, ls=":")
  ax1.set(xlabel="fill (sum of lengths / (heads x capacity))", ylabel="time / time at full capacity",
          title="decode step vs fill", ylim=(0, 1.3))
  ax1.legend(fontsize=8)
  skew = sorted({r["fill"] for r in rows if r["case"] == "skewed"})
  width = 0.8 / len(paths)
  for i, p in enumerate(paths):
    ratio = [payload["checks"][f"{p}_skewed_over_uniform_at_{f}"] for f in skew]
    ax2.bar(np.arange(len(skew)) + (i - (len(paths) - 1) / 2) * width, ratio, width, label=p)
  ax2.axhline(1.10, color="grey", lw=0.8, ls=":")
  ax2.set_xticks(np.arange(len(skew)), [f"mean fill {f}" for f in skew])
  ax2.set(ylabel="time skewed / time uniform", title="skewed vs uniform lengths, same total")
  ax2.legend(fontsize=8)
  tag = "" if payload["meaningful"] else " (CPU: Pallas interpreted, timings not meaningful)"
  fig.suptitle(f"{payload['device_kind']}{tag}", fontsize=10)
  common.save_png(fig, name)


if __name__ == "__main__":
  main()
