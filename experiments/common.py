"""Shared pieces of the experiment scripts: model, text, capture-once grids, decoding, output.

Capture once, compress for every press. Prefill attention never depends on the press (a press rewrites a
layer's cache only after that layer's attention), so one `model.run_prefill` with a `CaptureTap` keeps every
layer's window queries, K, V and column sums, and `model.cache_from_capture` turns that capture into the
cache `model.prefill` returns for any press and plan (tests/test_model.py checks that they are equal). A grid
of P presses costs one prefill instead of P. Decoding goes through the library's one loop
(`generation.start_decode` / `decode_loop`), questions through `model.append`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import glob
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from adakv_jax import model as model_lib
from adakv_jax.cache import DEFAULT_PAGE_SIZE, CachePlan, plan_cache
from adakv_jax.generation import Sampling, decode_loop, full_cache_bytes, pad_rows, sample, start_decode
from adakv_jax.press import make_press

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
DTYPE = "float32"
BACKEND = "xla"
GREEDY = Sampling()
# Press defaults of the authors' evaluation (ADAKV_SPEC 3): reported with every result.
PRESS_DEFAULTS = dict(
  window=32,
  kernel=7,
  pool="max",
  floor_alpha=0.2,
  floor_mode="reserve",
  gqa="kv",
  gqa_reduce="mean",
  pyramid_beta=20,
)


# ---- model -------------------------------------------------------------------------------------------


def load(model: str = MODEL, dtype: str = DTYPE):
  """(cfg, params on device, tokenizer)."""
  from adakv_jax.checkpoints import load_model

  cfg, params, tok = load_model(model, dtype=dtype)
  return cfg, jax.device_put(params), tok


# ---- text --------------------------------------------------------------------------------------------


def topics() -> list[str]:
  """The stdlib's documentation topics (pydoc_data), in sorted-key order: deterministic English text."""
  from pydoc_data.topics import topics as t

  return [t[k].strip() for k in sorted(t)]


def context_text(tok, n_tokens: int, start: int = 0) -> str:
  """About n_tokens of natural text: topics from index `start` on, cut at a token boundary."""
  parts, ids = [], []
  for text in topics()[start:] + topics()[:start]:
    parts.append(text)
    ids = tok.encode("\n\n".join(parts), add_special_tokens=False)
    if len(ids) >= n_tokens:
      break
  return tok.decode(ids[:n_tokens]).strip()


# ---- presses -----------------------------------------------------------------------------------------


def add_press_args(parser, *, gqa: bool = False, kernel: bool = False) -> None:
  """--granularity and --page-size: how presses select (entries or whole pages) and the cache's page;
  with gqa, --gqa too, for scripts that run one grouping (score and budget per KV or per query head); with
  kernel, --kernel, the max-pool width over the scores (a wider one keeps the neighbours of a peak)."""
  parser.add_argument(
    "--granularity",
    choices=("token", "page"),
    default="token",
    help="select single entries (the paper's method) or whole page-sized chunks",
  )
  parser.add_argument(
    "--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="entries per cache page (a power of two)"
  )
  if gqa:
    parser.add_argument(
      "--gqa",
      choices=("kv", "query"),
      default="kv",
      help="kv: one budget per KV head (scores averaged over its group); query: one per query head",
    )
  if kernel:
    parser.add_argument(
      "--kernel",
      type=int,
      default=None,
      help="max-pool kernel over every press's scores (odd; default: each preset's own, 7 for SnapKV)",
    )


def build_press(name: str, args, **overrides):
  """make_press(name) with the script's --granularity (and --gqa and --kernel where it has them); "full" is
  None (the uncompressed cache)."""
  if name == "full":
    return None
  settings = dict(granularity=args.granularity)
  if hasattr(args, "gqa"):
    settings["gqa"] = args.gqa
  if getattr(args, "kernel", None) is not None:
    settings["kernel"] = args.kernel
  return make_press(name, **{**settings, **overrides})


def cache_heads(cfg, press) -> int:
  return press.cache_heads(cfg.num_heads, cfg.num_kv_heads) if press is not None else cfg.num_kv_heads


def expected_layer_totals(press, num_layers: int, heads: int, prompt_len: int, page_size: int) -> np.ndarray:
  """Kept entries per layer that the budget rule prescribes (ADAKV_SPEC 3.4, 8): heads x (selected units +
  window), where page granularity also keeps the prefix tokens past its last whole chunk."""
  units = np.asarray(press.layer_units(num_layers, [prompt_len], page_size))[:, 0]
  window = min(prompt_len, press.window)
  if press.granularity == "page":
    tail = max(prompt_len - press.window, 0) % page_size
    return heads * (units * page_size + window + tail)
  return heads * (units + window)


# ---- capture and compress ----------------------------------------------------------------------------


def pad_batch(prompts: list[list[int]]) -> tuple[jax.Array, jax.Array, int]:
  """Prompts as prefill takes them: tokens [B, L'] (L' a multiple of the chunk), lengths [B], chunk."""
  lens = [len(p) for p in prompts]
  tokens = pad_rows(prompts, model_lib.padded_length(max(lens)))
  return jnp.asarray(tokens), jnp.asarray(lens, jnp.int32), model_lib.prompt_chunk(max(lens))


def prefill_key(seed: int = 0) -> jax.Array:
  """The key generate(seed=seed) hands prefill (the random press draws from it)."""
  return jax.random.split(jax.random.PRNGKey(seed))[1]


@dataclasses.dataclass
class Capture:
  """One prefill of a prompt batch: last-token logits and every layer's tensors (model.LayerOutputs)."""

  lens: list[int]
  len_B: jax.Array
  logits_BV: jax.Array
  layers: model_lib.LayerOutputs


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "tap"))
def _run_capture(params, tokens_BL, len_B, *, cfg, chunk: int, tap):
  last_BE, layers = model_lib.run_prefill(params, tokens_BL, len_B, cfg=cfg, chunk=chunk, tap=tap)
  return model_lib.logits_of(params, last_BE, cfg), layers


def capture(params, cfg, prompts: list[list[int]], *, window: int = 32, with_colsum: bool = True) -> Capture:
  """One prefill of `prompts` that serves every press (column sums only matter to H2O)."""
  tokens, len_B, chunk = pad_batch(prompts)
  logits, layers = _run_capture(
    params,
    tokens,
    len_B,
    cfg=cfg,
    chunk=chunk,
    tap=model_lib.CaptureTap(window=window, with_colsum=with_colsum),
  )
  return Capture(lens=[len(p) for p in prompts], len_B=len_B, logits_BV=logits, layers=layers)


def fitting_plan(cfg, batches: list[list[int]], presses, *, room: int, page_size: int) -> CachePlan:
  """One cache plan that holds the cache of every press (None: the full cache) for every batch of prompt
  lengths: each layer's pool and the page-table width are the largest any of them needs.

  Caches made with it share one shape per number of cache heads (KV heads, or query heads for
  gqa="query"), so the jitted append and decode loop compile once for a whole grid instead of once per
  press (about half a minute each on CPU). A head reads only the pages it owns, so the spare pool pages
  change no result, and `memory` reports the cache trimmed to the pages in use, which is what generate()
  allocates for the same run.
  """
  plans = [
    plan_cache(cfg.num_layers, cache_heads(cfg, press), lens, room=room, press=press, page_size=page_size)
    for lens in batches
    for press in presses
  ]
  return CachePlan(
    page_size=page_size,
    layer_pages=tuple(map(max, zip(*(p.layer_pages for p in plans)))),
    max_pages=max(p.max_pages for p in plans),
    room=room,
  )


def compress(cfg, cap: Capture, press, plan: CachePlan, *, seed: int = 0):
  """(cache, info on the host, memory) of one press on a capture: the cache and info prefill(press, plan)
  returns, and the memory generate() reports for that run (`memory` of the trimmed cache)."""
  cache, info = model_lib.cache_from_capture(
    cap.layers, cap.len_B, prefill_key(seed), cfg=cfg, press=press, plan=plan
  )
  return cache, jax.device_get(info), memory(cfg, cache.trim(), cap.lens, plan.room)


def span_kept_LH(kept_LHC: np.ndarray, positions) -> np.ndarray:
  """[layers, heads] bool: which (layer, head) pairs kept every one of `positions` (one sequence's
  `info["positions"]`, [layers, heads, capacity])."""
  return np.all([(kept_LHC == p).any(axis=-1) for p in positions], axis=0)


def memory(cfg, cache, lens: list[int], room: int) -> dict:
  """The memory of a freshly made cache, in GenerationResult's terms: K/V bytes allocated (every pool
  page), kept by prefill, reserved for the `room` tokens to come, and the full cache's."""
  allocated, kept = cache.nbytes(), cache.kept_bytes()
  decode_room = cfg.num_layers * len(lens) * cache.num_heads * room * cache.entry_bytes
  return {
    "allocated_bytes": allocated,
    "kept_bytes": kept,
    "decode_room_bytes": decode_room,
    "full_cache_bytes": full_cache_bytes(cfg, lens, room, cache.page_size),
    "padding_overhead": round(allocated / max(kept + decode_room, 1), 4),
    "page_size": cache.page_size,
    "pages_used": cache.pages_used(),
    "pages_allocated": cache.pages_allocated(),
  }


# ---- decoding ----------------------------------------------------------------------------------------


def greedy_first(logits_BV) -> jax.Array:
  return sample(logits_BV, jax.random.PRNGKey(0), GREEDY)


def ask(params, cfg, cache, questions: list[list[int]], width: int | None = None):
  """Appends one question per sequence, right-padded to `width` (one width: one compiled append), to the
  cache: (logits after each question [B, V], cache)."""
  q_BT = pad_rows(questions, width)
  return model_lib.append(
    params, q_BT, np.asarray([len(q) for q in questions], np.int32), cache, cfg=cfg, backend=BACKEND
  )


def decode(params, cfg, first_B, cache, *, max_new_tokens: int, eos_ids=()) -> list[list[int]]:
  """Greedy ids per sequence, `first_B` included, up to max_new_tokens or an EOS (kept, as generate()
  returns it); no eos_ids: fixed length. The cache is donated to the loop."""
  eos = tuple(int(e) for e in eos_ids)
  state = start_decode(first_B, cache, jax.random.PRNGKey(0), max_new_tokens, eos)
  state = decode_loop(
    params, state, cfg=cfg, sampling=GREEDY, eos_ids=eos, steps=max_new_tokens, backend=BACKEND
  )
  tokens, count = jax.device_get((state.tokens_BS, state.count_B))
  return [tokens[i, : count[i]].tolist() for i in range(len(count))]


# ---- output ------------------------------------------------------------------------------------------


def git_commit() -> str:
  try:
    rev = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
    return rev + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


START_COMMIT = git_commit()  # the code a run imported, before anything changes the tree under it


def machine() -> dict:
  """The host, in enough detail to tell two runs' machines apart: two hosts with the same 2-core "AMD EPYC"
  label ran bench_prefill 3x apart, so the ISA flags, clock and cache sizes go into every result's meta."""
  info = {"cpu": platform.processor(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
  try:
    with open("/proc/cpuinfo") as f:
      fields = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["cpu"] = fields.get("model name", info["cpu"])
    info["cpu_mhz"] = fields.get("cpu MHz")
    info["isa"] = sorted(
      set(fields.get("flags", "").split()) & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}
    )
  except OSError:
    pass
  caches = {}
  for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
    try:
      level, kind, size = (Path(d, x).read_text().strip() for x in ("level", "type", "size"))
      caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = size
    except OSError:
      pass
  return dict(info, caches=caches)


def run_meta(args, **extra) -> dict:
  """Everything needed to read a result: model, dtype, backend, press defaults, machine, date."""
  return {
    "script": Path(sys.argv[0]).name,
    "args": vars(args),
    "model": MODEL,
    "dtype": DTYPE,
    "backend": BACKEND,
    "press_defaults": PRESS_DEFAULTS,
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "git_commit": START_COMMIT,
    "jax_version": jax.__version__,
    "device": str(jax.devices()[0]),
    "platform": platform.platform(),
    "cpu_count": os.cpu_count(),
    "machine": machine(),
    **extra,
  }


def out_name(name: str, quick: bool) -> str:
  return f"{name}_quick" if quick else name


def write_json(name: str, payload: dict) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}.json"
  path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
  print(f"wrote {path.relative_to(REPO)}")
  return path


def read_json(name: str) -> dict:
  return json.loads((RESULTS / f"{name}.json").read_text())


def require_same_trials(ours: list, theirs: list, what: str, other_name: str, causes: str) -> None:
  """Two runs compared trial by trial (`--against`) must hold the same trials in the same order: names the
  first that differs, and the settings that would make them differ."""
  if ours != theirs:
    bad = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
    raise ValueError(
      f"--against {other_name}: not the same {what}s (first difference at {what} {bad}; "
      f"{len(ours)} against {len(theirs)} {what}s): {causes} differ"
    )


def settings_that_differ(args_a: dict, args_b: dict, settings, defaults: dict | None = None) -> dict:
  """{setting: [a, b]} for the recorded run settings that differ; a setting missing or None in a run's
  record counts as its default there (runs recorded before the setting existed)."""
  defaults = defaults or {}

  def value(args, k):
    v = args.get(k)
    return defaults.get(k) if v is None else v

  return {k: [value(args_a, k), value(args_b, k)] for k in settings if value(args_a, k) != value(args_b, k)}


def _jsonable(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def save_png(fig, name: str) -> Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}.png"
  fig.savefig(path, dpi=110, bbox_inches="tight")
  print(f"wrote {path.relative_to(REPO)}")
  return path


def pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def print_table(rows: list[dict], cols: list[str]) -> None:
  """A plain fixed-width table of the given columns."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


class Timer:
  """with Timer() as t: ...; t.s"""

  def __enter__(self):
    self.t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.s = time.perf_counter() - self.t0
