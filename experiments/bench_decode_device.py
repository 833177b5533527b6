"""End to end on one device: decode ms/token and cache memory, full cache vs ada-snapkv (token and page
granularity), over contexts and batch sizes; prefill time and the selection's share of it.

Weights are random (`init_params`) with a registered checkpoint's exact shapes (`registered_config`): a
device machine cannot receive the checkpoint, and timing and memory depend on shapes alone (correctness
is the tests' job). Context = prompt + generated tokens, so the longest one fits the model's window.

Each (context, batch, press) cell is one prefill and one decode state. Prefill and the library's
on-device decode loop (`generation.start_decode` + `decode_loop`, on the untrimmed cache, whose layers'
pools share one shape: pool_pages_per_layer in the JSON) are all compiled ahead of time on a thread pool
before anything is timed. Decode: one warm-up loop of --steps tokens, then --reps timed loops of --steps
tokens each; ms/token is the median loop over --steps. Prefill: one run (three if under 2 s, the fastest
of the last two). The selection's share of a press's prefill is (its prefill - the full cache's) / its
prefill. JSON is written after every cell, so a run cut by --deadline-s keeps what it finished.

    python -m experiments.bench_decode_device             # accelerator sizes: 4K..32K, batch 1 and 8
    python -m experiments.bench_decode_device --rehearse  # CPU: 2 layers, tiny contexts, ~4 min
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from adakv_jax import generation
from adakv_jax import model as model_lib
from adakv_jax.cache import plan_cache
from adakv_jax.params import init_params
from adakv_jax.press import make_press, press_label
from adakv_jax.testing import REGISTERED_SHAPES, random_prompts, registered_config

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="qwen2.5-coder-0.5b", choices=REGISTERED_SHAPES)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--layers", type=int, default=None, help="override the model's layer count")
  p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  p.add_argument("--budget", type=int, default=128)
  p.add_argument("--page-size", type=int, default=16)
  p.add_argument("--steps", type=int, default=32, help="decode tokens per loop")
  p.add_argument("--reps", type=int, default=3, help="timed loops after the warm-up loop")
  p.add_argument("--backend", default="auto", choices=["auto", "xla", "pallas"])
  p.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1))
  p.add_argument("--deadline-s", type=float, default=None, help="start no cell after this many seconds")
  p.add_argument("--name", default=None, help="output stem under results/ (default: by device)")
  p.add_argument(
    "--rehearse",
    action="store_true",
    help="CPU sizes: 2 layers, contexts 256/512, batch 1/2, float32 (CPU emulates bf16 matmuls)",
  )
  a = p.parse_args(argv)
  if a.rehearse:
    a.layers, a.contexts, a.batches, a.steps, a.reps, a.dtype = 2, [256, 512], [1, 2], 4, 2, "float32"
    a.compile_workers = min(a.compile_workers, 2)
  return a


def device_slug() -> str:
  return re.sub(r"[^a-z0-9]+", "_", jax.devices()[0].device_kind.lower()).strip("_")


def git_commit() -> str:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent, capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def memory_stats() -> dict:
  """The allocator's counters on the first device (empty where the platform keeps none, e.g. CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


PRESSES = {
  "full": lambda a: None,
  "token": lambda a: make_press("ada-snapkv", budget=a.budget),
  "page": lambda a: make_press("ada-snapkv", budget=a.budget, granularity="page"),
}


def cell_inputs(a, cfg, context: int, batch: int):
  new_tokens = 1 + (a.reps + 1) * a.steps
  prompt_len = context - new_tokens
  if prompt_len <= a.budget:
    raise ValueError(
      f"context {context} leaves a {prompt_len}-token prompt: nothing to compress at "
      f"budget {a.budget} (new tokens {new_tokens})"
    )
  padded = model_lib.padded_length(prompt_len)
  toks = np.zeros((batch, padded), np.int32)
  toks[:, :prompt_len] = random_prompts([prompt_len] * batch, vocab=cfg.vocab_size, seed=context)
  return dict(
    tokens=jnp.asarray(toks),
    len_B=jnp.full((batch,), prompt_len, jnp.int32),
    chunk=model_lib.prompt_chunk(prompt_len),
    prompt_len=prompt_len,
    new_tokens=new_tokens,
  )


def compile_cell(a, cfg, params, inputs, press):
  """Ahead-of-time prefill and decode-loop executables for one cell (runs on a worker thread)."""
  heads = press.cache_heads(cfg.num_heads, cfg.num_kv_heads) if press is not None else cfg.num_kv_heads
  plan = plan_cache(
    cfg.num_layers,
    heads,
    [inputs["prompt_len"]] * inputs["tokens"].shape[0],
    room=inputs["new_tokens"],
    press=press,
    page_size=a.page_size,
  )
  key = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  lowered = model_lib.prefill.lower(
    params, inputs["tokens"], inputs["len_B"], key, cfg=cfg, press=press, plan=plan, chunk=inputs["chunk"]
  )
  prefill = lowered.compile()
  t1 = time.perf_counter()
  _, cache_sds, _ = lowered.out_info
  first = jax.ShapeDtypeStruct(inputs["len_B"].shape, jnp.int32)
  state_sds = jax.eval_shape(
    functools.partial(generation.start_decode, max_new_tokens=inputs["new_tokens"], eos_ids=()),
    first,
    cache_sds,
    key,
  )
  decode = generation.decode_loop.lower(
    params, state_sds, cfg=cfg, sampling=generation.Sampling(), eos_ids=(), steps=a.steps, backend=a.backend
  ).compile()
  return dict(
    plan=plan,
    prefill=prefill,
    decode=decode,
    compile_s={"prefill": t1 - t0, "decode": time.perf_counter() - t1},
  )


def timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def run_cell(a, params, inputs, compiled) -> dict:
  mem0 = memory_stats()
  key = jax.random.PRNGKey(0)
  (logits, cache, info), first_s = timed(compiled["prefill"], params, inputs["tokens"], inputs["len_B"], key)
  runs = [first_s]
  if first_s < 2.0:  # short enough to repeat: the first run of an executable pays one-off costs
    runs += [timed(compiled["prefill"], params, inputs["tokens"], inputs["len_B"], key)[1] for _ in "ab"]
  mem1 = memory_stats()
  kept = int(np.sum(jax.device_get(info["budgets"]))) * cache.entry_bytes
  trimmed = cache.trim()
  memory = dict(
    cache_bytes=trimmed.nbytes(),
    cache_bytes_untrimmed=cache.nbytes(),
    kept_bytes=kept,
    pages_used=cache.pages_used(),
    pages_allocated_untrimmed=cache.pages_allocated(),
    pool_pages_per_layer=sorted({int(k.shape[0]) for k in cache.k_pages}),
  )
  del trimmed
  if "bytes_in_use" in mem0:
    memory["device_bytes_after_prefill_minus_before"] = mem1["bytes_in_use"] - mem0["bytes_in_use"]
  state = generation.start_decode(
    jnp.argmax(logits, axis=-1).astype(jnp.int32), cache, key, inputs["new_tokens"], ()
  )
  del cache, logits, info
  state, warm_s = timed(compiled["decode"], params, state)
  loops = []
  for _ in range(a.reps):
    state, t = timed(compiled["decode"], params, state)
    loops.append(t)
  count = np.asarray(state.count_B)
  if not (count == inputs["new_tokens"]).all():
    raise RuntimeError(f"the decode loops generated {count.tolist()} tokens, expected {inputs['new_tokens']}")
  del state
  memory.update({f"device_{k}_after_cell": v for k, v in memory_stats().items() if k != "bytes_limit"})
  loop_s = float(np.median(loops))
  batch = inputs["tokens"].shape[0]
  return dict(
    prefill=dict(run_s=min(runs[1:]) if len(runs) > 1 else runs[0], runs_s=runs),
    decode=dict(
      warmup_loop_s=warm_s,
      loops_s=loops,
      ms_per_token=1e3 * loop_s / a.steps,
      tokens_per_s=batch * a.steps / loop_s,
    ),
    memory=memory,
  )


def run_press(a, params, inputs, jobs, cell, k, press) -> dict:
  """One row; a failure (out of memory, a compile error) is recorded and the run goes on."""
  row = dict(
    context=cell[0],
    batch=cell[1],
    prompt_len=inputs["prompt_len"],
    new_tokens=inputs["new_tokens"],
    press=k,
    label=press_label(press),
  )
  try:
    compiled = jobs[(cell, k)].result()
    jobs[(cell, k)] = None  # the executables can go once this cell has run
    return dict(row, compile_s=compiled["compile_s"], **run_cell(a, params, inputs, compiled))
  except Exception as e:
    print(f"ctx {cell[0]} batch {cell[1]} {k}: FAILED {type(e).__name__}: {e}", flush=True)
    return dict(row, error=f"{type(e).__name__}: {str(e)[:2000]}")


def main(argv=None):
  a = parse_args(argv)
  t_start = time.monotonic()
  overrides = {} if a.layers is None else {"num_layers": a.layers}
  cfg = registered_config(a.model, a.dtype, **overrides)
  params = jax.block_until_ready(init_params(cfg, jax.random.PRNGKey(0)))
  dev = jax.devices()[0]
  name = a.name or f"{'tmp_rehearse_' if a.rehearse else ''}bench_decode_device_{device_slug()}"
  cells = [(c, b) for b in a.batches for c in a.contexts]
  inputs = {cell: cell_inputs(a, cfg, *cell) for cell in cells}
  presses = {k: f(a) for k, f in PRESSES.items()}
  payload = {
    "script": "bench_decode_device.py",
    "args": vars(a),
    "git_commit": git_commit(),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "device_kind": dev.device_kind,
    "backend_platform": jax.default_backend(),
    "jax_version": jax.__version__,
    "platform": platform.platform(),
    "meaningful": jax.default_backend() in ("gpu", "tpu"),
    "model": a.model,
    "config": dataclasses.asdict(cfg),
    "weights": (
      "random: adakv_jax.params.init_params with the checkpoint's exact shapes "
      "(adakv_jax.testing.registered_config); timing and memory only, correctness is the tests'"
    ),
    "presses": {k: press_label(p) for k, p in presses.items()},
    "decode_note": (
      "ms_per_token: median loop time / steps, i.e. one decode step of the whole batch "
      "(each sequence gets one token); tokens_per_s counts every sequence's tokens"
    ),
    "memory_note": (
      "cache_bytes: K/V bytes the cache allocates after trim() (what generate() keeps); "
      "decoding runs on the untrimmed cache (cache_bytes_untrimmed). device_* are the "
      "allocator's counters; peak_bytes_in_use is the process's peak so far, not per cell."
    ),
    "params_bytes": sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(params)),
    "rows": [],
    "not_run": [],
    "failed": [],
  }
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(a.compile_workers, 1)) as pool:
    jobs = {
      (cell, k): pool.submit(compile_cell, a, cfg, params, inputs[cell], p)
      for cell in cells
      for k, p in presses.items()
    }
    concurrent.futures.wait(jobs.values())  # every compile done before anything is timed
  payload["compile_wall_s"] = time.monotonic() - t_start
  print(f"compiled {len(jobs)} prefill + decode pairs in {payload['compile_wall_s']:.0f} s", flush=True)
  for context, batch in cells:
    if a.deadline_s is not None and time.monotonic() - t_start > a.deadline_s:
      payload["not_run"].append({"context": context, "batch": batch, "reason": "deadline"})
      continue
    rows = [
      run_press(a, params, inputs[(context, batch)], jobs, (context, batch), k, p) for k, p in presses.items()
    ]
    payload["failed"] += [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    full_s = next((r["prefill"]["run_s"] for r in rows if r["press"] == "full"), None)
    for row in rows:
      row["prefill"]["selection_share"] = (
        None if full_s is None else (row["prefill"]["run_s"] - full_s) / row["prefill"]["run_s"]
      )
      share = row["prefill"]["selection_share"]
      print(
        f"ctx {context:6d} batch {batch}  {row['label']:19s} prefill {row['prefill']['run_s']:8.3f} s "
        f"(selection {'-' if share is None else f'{share:+.1%}'})  decode "
        f"{row['decode']['ms_per_token']:8.3f} ms/token  cache "
        f"{row['memory']['cache_bytes'] / 2**20:9.1f} MiB",
        flush=True,
      )
    payload["rows"] += rows
    payload["wall_s"] = time.monotonic() - t_start
    write_json(payload, name)
  payload["wall_s"] = time.monotonic() - t_start
  write_json(payload, name)
  plot(payload, name)


def write_json(payload: dict, name: str) -> None:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}.json"
  path.write_text(json.dumps(payload, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x)))
  print(f"wrote {path}", flush=True)


def plot(payload: dict, name: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  panels = [
    ("decode ms / token", lambda r: r["decode"]["ms_per_token"], "log"),
    ("cache MiB (allocated)", lambda r: r["memory"]["cache_bytes"] / 2**20, "log"),
    ("prefill s", lambda r: r["prefill"]["run_s"], "log"),
    ("selection share of prefill", lambda r: r["prefill"]["selection_share"], "linear"),
  ]
  rows = payload["rows"]
  for ax, (title, value, scale) in zip(axes, panels):
    for batch, line in zip(sorted({r["batch"] for r in rows}), ("-", "--", ":", "-.")):
      for press, (color, marker) in zip(payload["presses"], (("C0", "o"), ("C1", "s"), ("C2", "^"))):
        sel = sorted(
          (r for r in rows if r["batch"] == batch and r["press"] == press), key=lambda r: r["context"]
        )
        pts = [(r["context"], value(r)) for r in sel if value(r) is not None]
        if pts and not (press == "full" and "share" in title):
          ax.plot(
            *zip(*pts), line, color=color, marker=marker, label=f"{payload['presses'][press]}, batch {batch}"
          )
    ax.set(xscale="log", yscale=scale, xlabel="context (prompt + generated tokens)", title=title)
    ax.legend(fontsize=7)
  tag = "" if payload["meaningful"] else " (CPU rehearsal: not performance numbers)"
  cfg = payload["config"]
  fig.suptitle(
    f"{payload['device_kind']}: {payload['model']} shapes, random weights, {cfg['dtype']}, "
    f"{cfg['num_layers']} layers{tag}",
    fontsize=10,
  )
  path = RESULTS / f"{name}.png"
  fig.savefig(path, dpi=110, bbox_inches="tight")
  print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  main()
