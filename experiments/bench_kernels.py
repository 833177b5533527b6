"""Kernel benchmark: paged decode attention bandwidth vs fill and skew, the XLA path's formulations, top-k.

Paged decode (`paged_attention`, T = 1) over a pool sized for every head at full capacity, the page
table a random permutation of the pool: one decode step is timed as every head's length goes through
--fills of the capacity, and with skewed per-head lengths (Ada-KV-like budgets) against uniform ones of
the same total. Achieved bandwidth counts the K/V bytes of the live pages (what a length-following
kernel must read) per second, against --peak-gbps (default: the H200's 4800 GB/s).

The XLA path (`paged_attention_xla`, what CPU users run) has two formulations, all pool rows in one
GEMM or a per-head gather of pages; the crossover section times both as the number of query rows
B * K * G * T grows, which is how XLA_ALL_ROWS_MAX_QUERY_ROWS was chosen. Also times `cross_head_topk`
against its lax.top_k reference.

On a GPU or TPU the kernels compile natively. On CPU the Pallas kernels run in the interpreter: those
timings are recorded with `meaningful: false` and say nothing about performance (--quick is a
rehearsal of the script). The XLA crossover is meaningful on CPU, where that path runs in production.

    python -m experiments.bench_kernels           # accelerator sizes: bf16, 8 x 8 heads x 16K entries
    python -m experiments.bench_kernels --quick   # CPU rehearsal, under a minute on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments import common
from pallas_kernels import backend as backend_lib
from pallas_kernels import paged_attention as pa
from pallas_kernels.cross_head_topk import cross_head_topk


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes that run interpreted on CPU")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--kv-heads", type=int, default=8)
  p.add_argument("--group", type=int, default=4, help="query heads per KV head")
  p.add_argument("--capacity", type=int, default=16384, help="entries per head at 100%% fill")
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--pages-per-block", type=int, default=None, help="default: the kernel's own choice")
  p.add_argument("--num-splits", type=int, default=None, help="default: the kernel's own choice")
  p.add_argument("--fills", type=float, nargs="+", default=[0.25, 0.5, 1.0])
  p.add_argument(
    "--skew-fills",
    type=float,
    nargs="+",
    default=[0.25, 0.5],
    help="mean fills at which skewed and uniform lengths are compared",
  )
  p.add_argument("--peak-gbps", type=float, default=4800.0, help="the device's peak HBM bandwidth")
  p.add_argument(
    "--xla-shape",
    type=int,
    nargs=5,
    default=[1, 3, 3, 64, 4096],
    metavar=("B", "K", "G", "D", "CAP"),
    help="XLA crossover shape (default SmolLM2-like)",
  )
  p.add_argument(
    "--xla-chunks",
    type=int,
    nargs="+",
    default=[1, 2, 3, 4, 8, 16, 32],
    help="chunk lengths T of the XLA crossover (query rows B * K * G * T)",
  )
  p.add_argument("--xla-dtype", default="float32", choices=["bfloat16", "float32"])
  p.add_argument("--topk", type=int, nargs=3, default=[4, 32, 4096], metavar=("B", "H", "N"))
  p.add_argument("--reps", type=int, default=20, help="timed runs (at most 3 for interpreted Pallas)")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  if a.quick:
    a.batch, a.kv_heads, a.group, a.capacity, a.head_dim = 2, 2, 2, 256, 64
    a.dtype, a.topk, a.reps = "float32", [2, 4, 512], 5
    a.xla_shape, a.xla_chunks = [1, 3, 3, 64, 1024], [1, 4, 16]
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


def paged_pool(rng, batch, heads, cap, page, d, dtype):
  """K/V pools sized for every head at full capacity, and a page table that permutes the pool."""
  m = -(-cap // page)
  n = batch * heads * m
  table = rng.permutation(n).astype(np.int32).reshape(batch, heads, m)
  kp, vp = (jnp.asarray(rng.standard_normal((n, page, d), np.float32), dtype) for _ in "kv")
  return kp, vp, jnp.asarray(table)


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


def live_page_bytes(lens: np.ndarray, page: int, d: int, itemsize: int) -> int:
  """K and V bytes of the live pages: what a length-following paged kernel reads."""
  return int((-(-lens // page)).sum()) * page * 2 * d * itemsize


def attention_section(a, rng, meaningful, reps_for):
  dtype = jnp.dtype(a.dtype)
  b, k, g, c, d, page = a.batch, a.kv_heads, a.group, a.capacity, a.head_dim, a.page_size
  kp, vp, table = paged_pool(rng, b, k, c, page, d, dtype)
  q = jnp.asarray(rng.standard_normal((b, k, g, d)), dtype)
  paths = {
    "pallas": jax.jit(
      functools.partial(
        pa.paged_decode_attention,
        backend="pallas",
        pages_per_block=a.pages_per_block,
        num_splits=a.num_splits,
      )
    ),
    "xla": jax.jit(lambda *x: pa.paged_attention_xla(x[0][:, :, :, None], *x[1:])[:, :, :, 0]),
  }
  cases = [("fill", f, np.full((b, k), round(f * c))) for f in a.fills]
  for f in a.skew_fills:
    cases += [("uniform", f, np.full((b, k), round(f * c))), ("skewed", f, skewed_lengths(rng, b, k, c, f))]
  rows = []
  for kind, fill, lens in tqdm(cases, desc="paged decode"):
    row = {
      "case": kind,
      "fill": fill,
      "sum_lengths": int(lens.sum()),
      "lengths_min_max": [int(lens.min()), int(lens.max())],
      "live_page_bytes": live_page_bytes(lens, page, d, dtype.itemsize),
    }
    for name, fn in paths.items():
      t = time_fn(fn, (q, kp, vp, table, jnp.asarray(lens, jnp.int32)), reps_for(name))
      t["achieved_GBps"] = row["live_page_bytes"] / t["median_s"] / 1e9
      t["fraction_of_peak"] = t["achieved_GBps"] / a.peak_gbps
      t["meaningful"] = meaningful or name == "xla"
      row[name] = t
    rows.append(row)

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
  shape = {
    "batch": b,
    "kv_heads": k,
    "group": g,
    "capacity": c,
    "head_dim": d,
    "page_size": page,
    "pool_pages": int(kp.shape[0]),
    "dtype": a.dtype,
    "pages_per_block": a.pages_per_block
    or pa.default_pages_per_block(page, table.shape[2], backend_lib.resolve_lowering(None), dtype.itemsize),
  }
  return {"shape": shape, "rows": rows, "checks": checks}


def xla_crossover_section(a, rng):
  """Both XLA formulations at 50% fill as the query rows grow (the chunk length T)."""
  b, k, g, d, c = a.xla_shape
  page, dtype = a.page_size, jnp.dtype(a.xla_dtype)
  kp, vp, table = paged_pool(rng, b, k, c, page, d, dtype)
  lens = jnp.asarray(rng.integers(c // 4, 3 * c // 4 + 1, size=(b, k)), jnp.int32)
  scale = 1.0 / np.sqrt(d)
  prec = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  forms = {
    "all_rows": jax.jit(functools.partial(pa._all_rows_attention, sm_scale=scale, finite_dead=True)),
    "gathered": jax.jit(
      functools.partial(pa._gathered_attention, sm_scale=scale, compute_dtype=dtype, precision=prec)
    ),
  }
  rows = []
  for t in tqdm(a.xla_chunks, desc="XLA formulations"):
    q = jnp.asarray(rng.standard_normal((b, k, g, t, d)), dtype)
    row = {
      "chunk": t,
      "query_rows": b * k * g * t,
      "chosen": "all_rows" if b * k * g * t <= pa.XLA_ALL_ROWS_MAX_QUERY_ROWS else "gathered",
    }
    for name, fn in forms.items():
      row[name] = time_fn(fn, (q, kp, vp, table, lens), a.reps)
    rows.append(row)
  return {
    "shape": {
      "batch": b,
      "kv_heads": k,
      "group": g,
      "head_dim": d,
      "capacity": c,
      "page_size": page,
      "pool_pages": int(kp.shape[0]),
      "dtype": a.xla_dtype,
    },
    "threshold_query_rows": pa.XLA_ALL_ROWS_MAX_QUERY_ROWS,
    "rows": rows,
  }


def topk_section(a, rng, reps_for):
  tb, th, tn = a.topk
  scores = jnp.asarray(rng.standard_normal((tb, th, tn)), jnp.float32)
  cap = tn // 2
  total, floor = jnp.full((tb,), th * tn // 8, jnp.int32), jnp.full((tb,), tn // 32, jnp.int32)
  out = {"shape": [tb, th, tn], "cap": cap}
  for name, bk in tqdm([("xla_reference", "xla"), ("pallas", "pallas")], desc="top-k"):
    fn = jax.jit(lambda s, t, f, bk=bk: cross_head_topk(s, t, f, cap, backend=bk))
    out[name] = time_fn(fn, (scores, total, floor), reps_for(name))
  return out


def main():
  a = parse_args()
  plat = jax.default_backend()
  meaningful = plat in ("gpu", "tpu")
  dev = jax.devices()[0]
  rng = np.random.default_rng(a.seed)
  # Interpreted Pallas on CPU is slow and its timing means little: few reps there, more elsewhere.
  reps_for = lambda name: a.reps if meaningful or name != "pallas" else min(a.reps, 3)
  attention = attention_section(a, rng, meaningful, reps_for)
  crossover = xla_crossover_section(a, rng)
  topk = topk_section(a, rng, reps_for)
  payload = {
    "script": "bench_kernels.py",
    "args": vars(a),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "git_commit": common.git_commit(),
    "jax_version": jax.__version__,
    "device": str(dev),
    "device_kind": dev.device_kind,
    "platform": platform.platform(),
    "backend_platform": plat,
    "pallas_lowering": backend_lib.resolve_lowering(None),
    "pallas_interpret": backend_lib.default_interpret(),
    "meaningful": meaningful,
    "note": (
      "native kernels"
      if meaningful
      else "CPU: the Pallas kernels ran in JAX's interpreter (the TPU-style kernel under the TPU "
      "interpreter); their timings and bandwidths are not performance numbers. The XLA path's "
      "timings are CPU numbers (on a shared machine: noisy)."
    ),
    "peak_bandwidth_GBps": a.peak_gbps,
    "attention": attention,
    "xla_crossover": crossover,
    "topk": topk,
  }
  name = common.out_name("bench_kernels", a.quick)
  common.write_json(name, payload)
  common.print_table(
    [
      {
        "case": r["case"],
        "fill": r["fill"],
        **{f"{p}_ms": r[p]["median_s"] * 1e3 for p in ("pallas", "xla")},
        **{f"{p}_GBps": r[p]["achieved_GBps"] for p in ("pallas", "xla")},
      }
      for r in attention["rows"]
    ],
    ["case", "fill", "pallas_ms", "xla_ms", "pallas_GBps", "xla_GBps"],
  )
  common.print_table(
    [
      {
        "query_rows": r["query_rows"],
        "chosen": r["chosen"],
        **{f"{f}_ms": r[f]["median_s"] * 1e3 for f in ("all_rows", "gathered")},
      }
      for r in crossover["rows"]
    ],
    ["query_rows", "chosen", "all_rows_ms", "gathered_ms"],
  )
  plot(payload, name)


def plot(payload, name):
  plt = common.pyplot()
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
  rows = payload["attention"]["rows"]
  paths = ("pallas", "xla")
  fill_rows = [r for r in rows if r["case"] == "fill"]
  for p in paths:
    ax1.plot([r["fill"] for r in fill_rows], [r[p]["fraction_of_peak"] for r in fill_rows], "o-", label=p)
  ax1.set(
    xlabel="fill (each head's length / capacity)",
    ylabel=f"live K/V bytes / time / peak ({payload['peak_bandwidth_GBps']:.0f} GB/s)",
    title="paged decode: achieved bandwidth",
    ylim=(0, None),
  )
  ax1.legend(fontsize=8)
  skew = sorted({r["fill"] for r in rows if r["case"] == "skewed"})
  width = 0.8 / len(paths)
  for i, p in enumerate(paths):
    ratio = [payload["attention"]["checks"][f"{p}_skewed_over_uniform_at_{f}"] for f in skew]
    ax2.bar(np.arange(len(skew)) + (i - (len(paths) - 1) / 2) * width, ratio, width, label=p)
  ax2.axhline(1.10, color="grey", lw=0.8, ls=":")
  ax2.set_xticks(np.arange(len(skew)), [f"mean fill {f}" for f in skew])
  ax2.set(ylabel="time skewed / time uniform", title="skewed vs uniform lengths, same total")
  ax2.legend(fontsize=8)
  cross = payload["xla_crossover"]
  qr = [r["query_rows"] for r in cross["rows"]]
  for f in ("all_rows", "gathered"):
    ax3.plot(qr, [r[f]["median_s"] * 1e3 for r in cross["rows"]], "o-", label=f)
  ax3.axvline(
    cross["threshold_query_rows"] + 0.5, color="grey", lw=0.8, ls=":", label="XLA_ALL_ROWS_MAX_QUERY_ROWS"
  )
  ax3.set(
    xscale="log",
    yscale="log",
    xlabel="query rows B*K*G*T",
    ylabel="ms",
    title=f"XLA path formulations ({cross['shape']['dtype']}, {payload['backend_platform']})",
  )
  ax3.legend(fontsize=8)
  tag = "" if payload["meaningful"] else " (CPU: Pallas interpreted, its timings not meaningful)"
  fig.suptitle(f"{payload['device_kind']}{tag}", fontsize=10)
  common.save_png(fig, name)


if __name__ == "__main__":
  main()
