"""Press = scorer x allocation x schedule x budget, and the per-layer compression the model calls.

`compress_layer` runs once per layer at the end of prefill, inside the model's `lax.scan` over layers:
score every prompt entry, pick the kept entries per head (ADAKV_SPEC 3.5), gather them plus the window
into a cache of static capacity. Everything here is pure and shape-static; the Press itself is a frozen,
hashable dataclass passed to jit as a static argument.

Budget convention: `budget` B is the average number of entries per head INCLUDING the window w; the
selectable part is B' = B - w per head and the layer selects H' * B' entries (H' = cache heads).
`compression_ratio` r instead gives every sequence B = floor(len * (1 - r)) (kvpress convention), never
less than the window. A prompt of at most B tokens keeps everything.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp

from adakv_jax.press import allocation, schedules, scorers
from pallas_kernels.backend import BACKENDS

SCORER_NAMES = tuple(scorers.SCORERS)
ALLOCATIONS = ("uniform", "adaptive")
FLOOR_MODES = ("reserve", "mix")
POOLS = ("max", "avg")
GQA_MODES = ("kv", "query")
GQA_REDUCES = ("mean", "max")


def _fraction(x: float) -> Fraction:
  """A user's decimal (0.2, 0.7) as the exact fraction it means, so floors do not fall off by an ulp."""
  return Fraction(x).limit_denominator(10_000)


def _floor_mul(x_B: jax.Array, frac: Fraction) -> jax.Array:
  """floor(x * p / q) exactly in int32, without overflow for any prompt length int32 can hold."""
  p, q = frac.numerator, frac.denominator
  return (x_B // q) * p + ((x_B % q) * p) // q


def _check_choice(field: str, value, valid) -> None:
  if value not in valid:
    raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(map(str, valid))}")


@dataclasses.dataclass(frozen=True)
class Press:
  """One compression method. Defaults: Ada-SnapKV of the authors' evaluation (w=32, k=7, max, 0.2)."""

  scorer: str = "snapkv"
  allocation: str = "adaptive"
  schedule: str = "flat"
  budget: int | None = 128
  compression_ratio: float | None = None
  window: int = 32
  kernel: int = 7
  pool: str = "max"
  floor_alpha: float = 0.2
  floor_mode: str = "reserve"
  head_cap_factor: float = 2.0
  gqa: str = "kv"
  gqa_reduce: str = "mean"
  pyramid_beta: int = 20
  sink_tokens: int = 4
  seed: int = 0
  backend: str = "auto"

  def __post_init__(self):
    _check_choice("scorer", self.scorer, SCORER_NAMES)
    _check_choice("allocation", self.allocation, ALLOCATIONS)
    _check_choice("schedule", self.schedule, schedules.SCHEDULES)
    _check_choice("floor_mode", self.floor_mode, FLOOR_MODES)
    _check_choice("pool", self.pool, POOLS)
    _check_choice("gqa", self.gqa, GQA_MODES)
    _check_choice("gqa_reduce", self.gqa_reduce, GQA_REDUCES)
    _check_choice("backend", self.backend, BACKENDS)
    if not isinstance(self.window, int) or self.window <= 0:
      raise ValueError(f"window must be a positive integer, got {self.window!r}")
    if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
      raise ValueError(f"pooling kernel must be an odd integer >= 1 (1 = no pooling), got {self.kernel!r}")
    if not 0.0 <= self.floor_alpha <= 1.0:
      raise ValueError(f"floor_alpha must lie in [0, 1], got {self.floor_alpha}")
    if not isinstance(self.pyramid_beta, int) or self.pyramid_beta < 1:
      raise ValueError(f"pyramid_beta must be an integer >= 1, got {self.pyramid_beta!r}")
    if self.sink_tokens < 0:
      raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
    if (self.budget is None) == (self.compression_ratio is None):
      raise ValueError("give exactly one of budget and compression_ratio "
                       "(set budget=None to use a compression ratio)")
    if self.budget is not None and self.budget < self.window:
      raise ValueError(f"budget smaller than the window: budget {self.budget} < window {self.window} "
                       "(the budget counts the window, which is always kept)")
    if self.compression_ratio is not None and not 0.0 <= self.compression_ratio < 1.0:
      raise ValueError(f"compression_ratio must lie in [0, 1), got {self.compression_ratio}")
    if self.allocation == "adaptive":
      bp = self.budget - self.window if self.budget is not None else 1000
      floor = _floor_mul(bp, _fraction(self.floor_alpha))
      cap = -((-bp * _fraction(self.head_cap_factor)) // 1)
      if cap < floor:
        raise ValueError(f"per-head cap below the floor: head_cap_factor {self.head_cap_factor} x B' {bp} "
                         f"= {cap} < floor_alpha {self.floor_alpha} x B' = {floor}")
      if self.head_cap_factor < 1.0:
        raise ValueError(f"head_cap_factor must be >= 1, got {self.head_cap_factor}: a per-head cap below "
                         "the average budget cannot hold the layer total")

  # ---- shapes and static sizes -------------------------------------------------------------------

  def cache_heads(self, cfg) -> int:
    """H': the heads the compressed cache stores (KV heads, or query heads for gqa="query")."""
    return cfg.num_heads if self.gqa == "query" else cfg.num_kv_heads

  @property
  def needs_colsum(self) -> bool:
    """H2O scores keys by attention summed over all prompt queries, which the model must accumulate."""
    return self.scorer == "h2o"

  def selectable(self, prompt_len: int) -> int:
    """Host-side B' for a prompt of this length (static; ratio mode depends on the length)."""
    if self.budget is not None:
      return self.budget - self.window
    return max(_floor_mul(int(prompt_len), _fraction(1.0 - self.compression_ratio)) - self.window, 0)

  def head_cap(self, num_layers: int, max_prompt_len: int) -> int:
    """Static per-head maximum of selected (non-window) entries, never more than the longest prefix.

    Uniform needs the largest layer's B'. Adaptive may go to ceil(head_cap_factor * B') of the MEAN B',
    but never below the largest layer's B' (a pyramid's bottom layer is ~2B'): the padded cache is one
    size for all layers, so a cap tied to the largest layer would double every layer's padding.
    """
    bp = self.selectable(max_prompt_len)
    bp_max = schedules.max_selectable(self.schedule, bp, num_layers, self.pyramid_beta)
    if self.allocation == "adaptive":
      bp_max = max(bp_max, int(-((-bp * _fraction(self.head_cap_factor)) // 1)))
    return max(min(bp_max, max_prompt_len - self.window), 0)

  def capacity(self, num_layers: int, max_prompt_len: int, extra: int) -> int:
    """Static entries per head of the compressed cache: cap + window + extra (decode/question room),
    never more than max_prompt_len + extra."""
    return min(self.head_cap(num_layers, max_prompt_len) + self.window, max_prompt_len) + extra

  # ---- budgets -----------------------------------------------------------------------------------

  def layer_budgets(self, num_layers: int, prompt_len_B: jax.Array) -> jax.Array:
    """Per-head average budget INCLUDING the window, int32 [num_layers, B]; works on traced lengths.

    Sums over layers to num_layers * B per sequence. A prompt within its budget (len <= B) gets B in
    every layer, pyramid or not, so it is kept whole ("nothing to evict").
    """
    len_B = jnp.asarray(prompt_len_B, jnp.int32).reshape(-1)
    if self.budget is not None:
      bp_B = jnp.full_like(len_B, self.budget - self.window)
    else:
      kept_B = _floor_mul(len_B, _fraction(1.0 - self.compression_ratio))
      bp_B = jnp.maximum(kept_B - self.window, 0)
    prefix_B = jnp.maximum(len_B - self.window, 0)
    sel_NB = schedules.layer_selectable(self.schedule, bp_B, num_layers, self.pyramid_beta, prefix_B)
    return (sel_NB + self.window).astype(jnp.int32)

  def check_prompt(self, prompt_lens: list[int]) -> list[str]:
    """Host-side checks before prefill. Returns notes on prompts that will not (fully) be compressed.

    Raises ValueError only for prompts the pipeline cannot handle: empty or non-integer lengths. A prompt
    no longer than the window (or the budget) is valid: the window covers it and everything is kept.
    """
    notes = []
    for i, n in enumerate(prompt_lens):
      if int(n) != n or n < 1:
        raise ValueError(f"prompt {i}: length {n!r} is not a positive integer (empty prompts cannot be "
                         "prefilled or scored)")
      n = int(n)
      if n <= self.window:
        notes.append(f"prompt {i}: {n} tokens <= window {self.window}: the observation window covers the "
                     "whole prompt; nothing to evict")
        continue
      if self.budget is not None:
        if n <= self.budget:
          notes.append(f"prompt {i}: prompt of {n} tokens <= budget {self.budget}: nothing to evict")
      else:
        kept = _floor_mul(n, _fraction(1.0 - self.compression_ratio))
        if kept < self.window:
          notes.append(f"prompt {i}: compression_ratio {self.compression_ratio} would keep {kept} of {n} "
                       f"tokens, fewer than the window {self.window}, which is always kept")
    return notes


# ---- the per-layer entry point ---------------------------------------------------------------------


def compress_layer(press: Press, cfg, *, q_win_BHWD: jax.Array, k_BKLD: jax.Array, v_BKLD: jax.Array,
                   prompt_len_B: jax.Array, budget_B: jax.Array, colsum_BHL: jax.Array | None = None,
                   rng: jax.Array | None = None, capacity: int, head_cap: int | None = None,
                   return_positions: bool = False):
  """Compresses one layer's prompt K/V: (k_c_BHCD, v_c_BHCD, lengths_BH, info).

  budget_B: this layer's row of press.layer_budgets (incl. window). capacity: static, normally
  press.capacity(cfg.num_layers, max_prompt_len, extra). Each head holds its kept prefix entries in
  ascending position order followed by the window, zero-padded to `capacity`.
  info: "budgets" [B, H'] kept entries incl. window; "retained_mass" [B] the window queries' attention
  mass (softmax over all valid keys) on kept entries, averaged over queries and query heads;
  "positions" [B, H', capacity] absolute positions, -1 for padding (if return_positions).
  """
  b, kh, n, d = k_BKLD.shape
  w = press.window
  if q_win_BHWD.shape != (b, cfg.num_heads, w, d):
    raise ValueError(f"q_win_BHWD has shape {q_win_BHWD.shape}, expected {(b, cfg.num_heads, w, d)}")
  hp = press.cache_heads(cfg)
  group = cfg.num_heads // kh if press.gqa == "query" else 1

  len_B = jnp.asarray(prompt_len_B, jnp.int32).reshape(b)
  prefix_B = jnp.maximum(len_B - w, 0)
  pos_L = jnp.arange(n, dtype=jnp.int32)
  prefix_BL = pos_L[None, :] < prefix_B[:, None]
  window_BL = (pos_L[None, :] >= prefix_B[:, None]) & (pos_L[None, :] < len_B[:, None])

  raw_BHL = scorers.SCORERS[press.scorer](q_win_BHWD, k_BKLD, colsum_BHL, len_B, rng, press, cfg)
  scores_BHL = scorers.finish_scores(raw_BHL, prefix_BL, press)

  bp_B = jnp.maximum(jnp.asarray(budget_B, jnp.int32).reshape(b) - w, 0)
  # head_cap: the static cap the caller sized `capacity` with (press.head_cap at the longest REAL
  # prompt); the padded length n would give more in ratio mode and eat the room left for decoding.
  cap = press.head_cap(cfg.num_layers, n) if head_cap is None else head_cap
  cap = min(cap, max(capacity - w, 0))
  if press.allocation == "uniform":
    mode = "uniform"
  else:
    mode = "adaptive" if press.floor_mode == "reserve" else "mix"
  keep_BHL, _ = allocation.allocate(scores_BHL, hp * bp_B, _floor_mul(bp_B, _fraction(press.floor_alpha)),
                                    cap, mode, alpha=press.floor_alpha, backend=press.backend)
  keep_BHL = keep_BHL | window_BL[:, None, :]

  positions_BHC, lengths_BH = _positions(keep_BHL, capacity)
  k_c, v_c = _gather(k_BKLD, v_BKLD, positions_BHC, group)
  info = {"budgets": lengths_BH, "retained_mass": _retained_mass(q_win_BHWD, k_BKLD, len_B, keep_BHL, press)}
  if return_positions:
    info["positions"] = positions_BHC
  return k_c, v_c, lengths_BH, info


def _positions(keep_BHL: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Kept positions in ascending order, -1-padded to capacity (a cumsum scatter; entries past capacity
  are dropped, which a capacity from Press.capacity never causes)."""
  b, h, n = keep_BHL.shape
  slot_BHL = jnp.where(keep_BHL, jnp.cumsum(keep_BHL, axis=-1, dtype=jnp.int32) - 1, capacity)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  pos_BHL = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, h, n))
  positions = jnp.full((b, h, capacity), -1, jnp.int32).at[bi, hi, slot_BHL].set(pos_BHL, mode="drop")
  lengths = jnp.minimum(jnp.sum(keep_BHL, axis=-1, dtype=jnp.int32), capacity)
  return positions, lengths


def _gather(k_BKLD, v_BKLD, positions_BHC, group: int):
  """Cache head h reads KV head h // group (group > 1 only for gqa="query"); padding slots are zero."""
  b, h, _ = positions_BHC.shape
  bi = jnp.arange(b)[:, None, None]
  ki = (jnp.arange(h) // group)[None, :, None]
  idx = jnp.maximum(positions_BHC, 0)
  live = (positions_BHC >= 0)[..., None]
  k_c = jnp.where(live, k_BKLD[bi, ki, idx], 0).astype(k_BKLD.dtype)
  v_c = jnp.where(live, v_BKLD[bi, ki, idx], 0).astype(v_BKLD.dtype)
  return k_c, v_c


def _retained_mass(q_win_BHWD, k_BKLD, len_B, keep_BHL, press) -> jax.Array:
  """The paper's quantity: attention mass the window queries keep on the kept entries ([B], 1 = all)."""
  probs_BHWL, qvalid_BW = scorers.window_attention(q_win_BHWD, k_BKLD, len_B)
  h = probs_BHWL.shape[1]
  keep_q = keep_BHL if press.gqa == "query" else jnp.repeat(keep_BHL, h // keep_BHL.shape[1], axis=1)
  mass_BHW = jnp.einsum("bhwl,bhl->bhw", probs_BHWL, keep_q.astype(jnp.float32))
  nq_B = jnp.maximum(jnp.sum(qvalid_BW, axis=1), 1).astype(jnp.float32)
  return jnp.sum(mass_BHW, axis=(1, 2)) / (h * nq_B)


# ---- presets -----------------------------------------------------------------------------------------

PRESETS: dict[str, dict | None] = {
    "full": None,
    "snapkv": dict(scorer="snapkv", allocation="uniform"),
    "ada-snapkv": dict(scorer="snapkv", allocation="adaptive"),
    "pyramidkv": dict(scorer="snapkv", allocation="uniform", schedule="pyramid"),
    "ada-pyramidkv": dict(scorer="snapkv", allocation="adaptive", schedule="pyramid"),
    "h2o": dict(scorer="h2o", allocation="uniform", kernel=1),
    "ada-h2o": dict(scorer="h2o", allocation="adaptive", kernel=1),
    "streamingllm": dict(scorer="streamingllm", allocation="uniform", kernel=1),
    "knorm": dict(scorer="knorm", allocation="uniform", kernel=1),
    "random": dict(scorer="random", allocation="uniform", kernel=1),
}


def make_press(name: str, **overrides) -> Press | None:
  """A named method with optional field overrides; "full" (no compression) returns None.

  Giving compression_ratio without budget switches the preset to ratio mode (budget=None).
  """
  if name not in PRESETS:
    raise ValueError(f"unknown press {name!r}; valid: {', '.join(PRESETS)}")
  fields = PRESETS[name]
  if fields is None:
    return None
  if overrides.get("compression_ratio") is not None and "budget" not in overrides:
    overrides["budget"] = None
  return Press(**{**fields, **overrides})
