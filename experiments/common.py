"""Shared helpers for the experiment scripts: model, text, prompts, capture-and-compress, output.

Capture-and-compress. Prefill attention always sees the whole prompt (a press only rewrites each layer's
cache after that layer's attention), so the hidden states, window queries and full K/V of every layer do
not depend on the press. `capture` runs the prefill layer loop once and keeps those per-layer tensors;
`compress` then applies the library's own `compress_layer` to them for any number of presses, exactly as
`model.prefill` does inside its scan. This turns a grid of P presses from P prefills into one, and
`verify_against_prefill` checks the equivalence against `model.prefill` on the real model.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the scripts run from a checkout, installed or not
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from adakv_jax import model as model_lib  # noqa: E402
from adakv_jax.cache import KVCache  # noqa: E402
from adakv_jax.generation import Sampling, decode_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m"
DTYPE = "float32"
BACKEND = "xla"
# Press defaults of the authors' evaluation (ADAKV_SPEC 3): reported with every result.
PRESS_DEFAULTS = dict(window=32, kernel=7, pool="max", floor_alpha=0.2, floor_mode="reserve", gqa="kv",
                      gqa_reduce="mean", head_cap_factor=2.0, pyramid_beta=20)


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


def chat_parts(tok, context: str, question: str) -> tuple[list[int], list[int]]:
  """(context ids, question ids) with the chat template: the context ids open the user turn and the
  question ids close it, so context + question is the question-aware prompt and the question can also be
  appended to a compressed context (question-agnostic), as the CLI does."""
  marker = "\u0000CTX\u0000"
  head, tail = tok.apply_chat_template([{"role": "user", "content": marker}]).split(marker)
  ctx = tok.encode(head + context, add_special_tokens=False)
  q = tok.encode("\n\n" + question + tail, add_special_tokens=False)
  return ctx, q


# ---- capture and compress ----------------------------------------------------------------------------

def pad_batch(prompts: list[list[int]]) -> tuple[jax.Array, jax.Array, int]:
  """Right-padded tokens [B, L'] (L' a multiple of the prefill chunk), lengths [B], chunk."""
  lens = [len(p) for p in prompts]
  chunk = model_lib.prompt_chunk(max(lens))
  padded = -(-max(lens) // chunk) * chunk
  out = np.zeros((len(prompts), padded), np.int32)
  for i, p in enumerate(prompts):
    out[i, :len(p)] = p
  return jnp.asarray(out), jnp.asarray(lens, jnp.int32), chunk


@functools.partial(jax.jit, static_argnames=("cfg", "chunk", "window"))
def capture(params, tokens_BL, len_B, *, cfg, chunk: int, window: int):
  """model.prefill's layer loop without a press: (last-token logits [B, V], per-layer tensors).

  Returns dict(q_win [N, B, H, W, D], k/v [N, B, K, L, D], colsum [N, B, H, L]) with N layers.
  """
  b, l = tokens_BL.shape
  pos_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  x = params["embed"][tokens_BL].astype(model_lib.dtype_of(cfg))

  def layer(x, lp):
    q, k, v = model_lib._qkv(lp, x, pos_BL, cfg)
    o, colsum = model_lib.chunked_causal_attention(q, k, v, len_B, chunk=chunk, with_colsum=True)
    x = model_lib._out_and_mlp(lp, x, o, cfg)
    return x, dict(q_win=model_lib._window_queries(q, len_B, window), k=k, v=v, colsum=colsum)

  x, per_layer = lax.scan(layer, x, params["layers"])
  last_BE = jnp.take_along_axis(x, (len_B - 1)[:, None, None], axis=1)[:, 0]
  return model_lib._logits(params, last_BE, cfg), per_layer


@functools.partial(jax.jit, static_argnames=("cfg", "press", "capacity", "return_positions"))
def compress(cap, len_B, rng, *, cfg, press, capacity: int, return_positions: bool = False):
  """The compressed KVCache and info that model.prefill(press=press, capacity=capacity) would return."""
  from adakv_jax.press import compress_layer

  budgets_NB = press.layer_budgets(cfg.num_layers, len_B)

  def layer(_, xs):
    c, budget_B, i = xs
    k_c, v_c, lengths, info = compress_layer(
        press, cfg, q_win_BHWD=c["q_win"], k_BKLD=c["k"], v_BKLD=c["v"], prompt_len_B=len_B,
        budget_B=budget_B, colsum_BHL=c["colsum"] if press.needs_colsum else None,
        rng=jax.random.fold_in(rng, i), capacity=capacity, return_positions=return_positions)
    return None, (k_c, v_c, lengths, info)

  _, (k, v, lengths, info) = lax.scan(layer, None, (cap, budgets_NB, jnp.arange(cfg.num_layers)))
  # a fresh pos buffer: append donates the cache and len_B must survive it (jit may forward an output
  # that is an unchanged input)
  return KVCache(k=k, v=v, lengths=lengths.astype(jnp.int32), pos=jnp.copy(len_B) + 0), info


def full_cache(cap, len_B, capacity: int) -> KVCache:
  """The uncompressed cache (what model.prefill(press=None) returns), padded to `capacity`."""
  k, v = cap["k"], cap["v"]
  n, b, kh, l, _ = k.shape
  if capacity >= l:
    pad = ((0, 0), (0, 0), (0, 0), (0, capacity - l), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  else:
    k, v = k[:, :, :, :capacity], v[:, :, :, :capacity]
  lengths = jnp.broadcast_to(len_B[None, :, None], (n, b, kh)).astype(jnp.int32)
  # fresh buffers throughout: append donates the cache, and the capture and len_B must survive it
  # (outside jit, astype to the same dtype and a zero pad return the very same array)
  return KVCache(k=jnp.copy(k), v=jnp.copy(v), lengths=jnp.copy(lengths), pos=jnp.copy(len_B))


def prefill_key(seed: int = 0) -> jax.Array:
  """The key generate() hands model.prefill (the random press draws from it)."""
  return jax.random.split(jax.random.PRNGKey(seed))[1]


def verify_against_prefill(params, cfg, tokens_BL, len_B, cap, press, capacity: int, chunk: int) -> dict:
  """Runs model.prefill with `press` and compares its cache with compress(cap): kept sets and K/V."""
  key = prefill_key()
  _, ref, ref_info = model_lib.prefill(params, tokens_BL, len_B, key, cfg=cfg, press=press,
                                       capacity=capacity, chunk=chunk, return_positions=True)
  got, got_info = compress(cap, len_B, key, cfg=cfg, press=press, capacity=capacity, return_positions=True)
  pos_ref, pos_got = np.asarray(ref_info["positions"]), np.asarray(got_info["positions"])
  live = pos_ref >= 0
  return {
      "press": press_label(press),
      "lengths_equal": bool(np.array_equal(np.asarray(ref.lengths), np.asarray(got.lengths))),
      "kept_positions_equal_fraction": float(np.mean((pos_ref == pos_got)[live])),
      "k_max_abs_diff": float(jnp.max(jnp.abs(ref.k - got.k))),
      "retained_mass_max_abs_diff": float(np.max(np.abs(np.asarray(ref_info["retained_mass"])
                                                        - np.asarray(got_info["retained_mass"])))),
  }


def press_label(press) -> str:
  if press is None:
    return "full"
  name = {("snapkv", "uniform", "flat"): "snapkv", ("snapkv", "adaptive", "flat"): "ada-snapkv",
          ("snapkv", "uniform", "pyramid"): "pyramidkv", ("snapkv", "adaptive", "pyramid"): "ada-pyramidkv",
          ("h2o", "uniform", "flat"): "h2o", ("h2o", "adaptive", "flat"): "ada-h2o"}
  return name.get((press.scorer, press.allocation, press.schedule), press.scorer) + f"@{press.budget}"


# ---- decoding ----------------------------------------------------------------------------------------

def greedy(params, cfg, logits_BV, cache: KVCache, steps: int) -> list[list[int]]:
  """Greedy continuation of `steps` tokens from last-token logits (EOS not special: fixed length)."""
  tok = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  out = [np.asarray(tok)]
  key = jax.random.PRNGKey(0)
  for _ in range(steps - 1):
    tok, _, cache = decode_step(params, tok, cache, key, cfg=cfg, sampling=Sampling(), backend=BACKEND)
    out.append(np.asarray(tok))
  return np.stack(out, axis=1).tolist()


# ---- output ------------------------------------------------------------------------------------------

def git_commit() -> str:
  try:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.strip()
    return rev + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


START_COMMIT = git_commit()  # the code a run imported, before anything changes the tree under it


def run_meta(args, **extra) -> dict:
  """Everything needed to read a result: model, dtype, backend, press defaults, machine, date."""
  return {
      "script": Path(sys.argv[0]).name,
      "args": vars(args),
      "model": MODEL,
      "dtype": DTYPE,
      "backend": BACKEND,
      "press_defaults": PRESS_DEFAULTS,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git_commit": START_COMMIT,
      "jax_version": jax.__version__,
      "device": str(jax.devices()[0]),
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
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
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
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
