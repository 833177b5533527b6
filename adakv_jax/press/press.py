"""Press = scorer x allocation x schedule x budget x granularity, and the per-layer selection.

`select` runs once per layer at the end of prefill: score every prompt entry, choose the kept entries of
each cache head (ADAKV_SPEC 3.5), always keep the observation window. It needs nothing of the model but
the layer's window queries and keys, so any attention layer can be compressed with it. The Press itself
is a frozen, hashable dataclass passed to jit as a static argument.

Budget convention: `budget` B is the average number of entries per head INCLUDING the window w; the
selectable part is B' = B - w per head and a head group of H_g heads selects H_g * B' entries.
`compression_ratio` r instead gives every sequence B = floor(len * (1 - r)) (kvpress convention), never
less than the window. A prompt of at most B tokens keeps everything.

Granularity. "token" (the paper's method): single entries are selected. "page": the prefix is cut into
whole page-sized chunks [c P, (c + 1) P), each chunk scored by the mean (or max, `chunk_score`) of its
tokens' pooled scores, and whole chunks are selected by the same cross-head rule with budgets, floors and
totals counted in pages; so a kept span is never cut inside a page. The prefix tokens after its last
whole chunk (fewer than P) are kept with the window, so no chunk is cut there either; they are the only
entries a page-granular cache keeps beyond its budget, and they are counted in every byte figure.

Head groups. `head_groups` G splits the cache heads of a layer into G contiguous groups that each select
their own exact share; a mesh whose model axis has G shards runs this, one group per shard, so a
single-device run with head_groups=G reproduces it.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from adakv_jax.press import allocation, schedules, scorers
from pallas_kernels.backend import BACKENDS

SCORER_NAMES = tuple(scorers.SCORERS)
ALLOCATIONS = ("uniform", "adaptive")
FLOOR_MODES = ("reserve", "mix")
POOLS = ("max", "avg")
GQA_MODES = ("kv", "query")
GQA_REDUCES = ("mean", "max")
GRANULARITIES = ("token", "page")
CHUNK_SCORES = ("mean", "max")


def _fraction(x: float) -> Fraction:
  """A user's decimal (0.2, 0.7) as the exact fraction it means, so floors do not fall off by an ulp."""
  return Fraction(x).limit_denominator(10_000)


def _floor_mul(x_B, frac: Fraction):
  """floor(x * p / q) exactly in integers, without int32 overflow for any prompt length."""
  p, q = frac.numerator, frac.denominator
  return (x_B // q) * p + ((x_B % q) * p) // q


def _check_choice(field: str, value, valid) -> None:
  if value not in valid:
    raise ValueError(f"unknown {field} {value!r}; valid: {', '.join(map(str, valid))}")


def _check_int(field: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")


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
  granularity: str = "token"
  chunk_score: str = "mean"
  gqa: str = "kv"
  gqa_reduce: str = "mean"
  head_groups: int = 1
  pyramid_beta: int = 20
  sink_tokens: int = 4
  seed: int = 0
  backend: str = "auto"

  def __post_init__(self):
    for field, valid in (
      ("scorer", SCORER_NAMES),
      ("allocation", ALLOCATIONS),
      ("schedule", schedules.SCHEDULES),
      ("floor_mode", FLOOR_MODES),
      ("pool", POOLS),
      ("gqa", GQA_MODES),
      ("gqa_reduce", GQA_REDUCES),
      ("granularity", GRANULARITIES),
      ("chunk_score", CHUNK_SCORES),
      ("backend", BACKENDS),
    ):
      _check_choice(field, getattr(self, field), valid)
    _check_int("window", self.window, 1)
    if (
      isinstance(self.kernel, bool)
      or not isinstance(self.kernel, int)
      or self.kernel < 1
      or self.kernel % 2 == 0
    ):
      raise ValueError(f"pooling kernel must be an odd integer >= 1 (1 = no pooling), got {self.kernel!r}")
    _check_int("pyramid_beta", self.pyramid_beta, 1)
    _check_int("sink_tokens", self.sink_tokens, 0)
    _check_int("head_groups", self.head_groups, 1)
    _check_int("seed", self.seed, 0)
    if not isinstance(self.floor_alpha, (int, float)) or not 0.0 <= self.floor_alpha <= 1.0:
      raise ValueError(f"floor_alpha must lie in [0, 1], got {self.floor_alpha!r}")
    if (self.budget is None) == (self.compression_ratio is None):
      raise ValueError(
        "give exactly one of budget and compression_ratio (set budget=None to use a compression ratio)"
      )
    if self.budget is not None:
      _check_int("budget", self.budget, 1)
      if self.budget < self.window:
        raise ValueError(
          f"budget smaller than the window: budget {self.budget} < window {self.window} "
          "(the budget counts the window, which is always kept)"
        )
    if self.compression_ratio is not None and (
      not isinstance(self.compression_ratio, (int, float)) or not 0.0 <= self.compression_ratio < 1.0
    ):
      raise ValueError(f"compression_ratio must lie in [0, 1), got {self.compression_ratio!r}")

  def replace(self, **kw) -> Press:
    return dataclasses.replace(self, **kw)

  # ---- shapes --------------------------------------------------------------------------------------

  def cache_heads(self, num_heads: int, num_kv_heads: int) -> int:
    """H': the heads the compressed cache stores (KV heads, or query heads for gqa="query")."""
    return num_heads if self.gqa == "query" else num_kv_heads

  @property
  def needs_colsum(self) -> bool:
    """H2O scores keys by attention summed over all prompt queries, which the model must accumulate."""
    return self.scorer == "h2o"

  def check_page_size(self, page_size: int) -> None:
    """Page granularity counts budgets in pages: B' must be a whole number of them."""
    if self.granularity == "page" and self.budget is not None and (self.budget - self.window) % page_size:
      raise ValueError(
        f"page granularity needs budget - window to be a whole number of pages: budget {self.budget} - "
        f"window {self.window} = {self.budget - self.window} is not a multiple of page size {page_size} "
        f"(e.g. budget {self.window + page_size * max((self.budget - self.window) // page_size, 1)})"
      )

  # ---- budgets -------------------------------------------------------------------------------------

  def layer_units(self, num_layers: int, prompt_len_B, page_size: int):
    """Selectable units per head, int32 [num_layers, B]: entries (token granularity) or whole chunks
    (page granularity), the window excluded; works on traced lengths.

    Sums over layers to num_layers * B' (in units) per sequence. Ratio mode rounds B' down to whole
    pages at page granularity. A prompt within its budget gets its whole prefix in every layer.
    """
    len_B = jnp.asarray(prompt_len_B, jnp.int32).reshape(-1)
    if self.budget is not None:
      bp_B = jnp.full_like(len_B, self.budget - self.window)
    else:
      bp_B = jnp.maximum(_floor_mul(len_B, _fraction(1.0 - self.compression_ratio)) - self.window, 0)
    prefix_B = jnp.maximum(len_B - self.window, 0)
    if self.granularity == "page":
      bp_B, prefix_B = bp_B // page_size, prefix_B // page_size
    sel = schedules.layer_selectable(self.schedule, bp_B, num_layers, self.pyramid_beta, prefix_B)
    return sel.astype(jnp.int32)

  def page_needs(self, num_layers: int, prompt_lens, cache_heads: int, room: int, page_size: int):
    """Host-side pages each head group needs per (layer, sequence), and the most pages one head needs.

    Returns (group_pages [L, B, head_groups] int, head_max [L, B] int). Exact for uniform allocation and
    page granularity; for token-granular adaptive allocation (only the group total is known before
    prefill) a bound: kept + room + at most one partial page per head.
    """
    if cache_heads % self.head_groups:
      raise ValueError(f"{cache_heads} cache heads do not split into head_groups={self.head_groups}")
    lens = np.asarray(prompt_lens, np.int64)
    units = np.asarray(jax.device_get(self.layer_units(num_layers, lens, page_size)), np.int64)  # [L, B]
    w, hg, p = self.window, cache_heads // self.head_groups, page_size
    win = np.minimum(lens, w)[None, :]
    prefix = np.maximum(lens - w, 0)[None, :]
    slack = hg if self.floor_mode == "mix" and self.allocation == "adaptive" else 0  # rounding of the mix
    if self.granularity == "page":
      chunks = prefix // p
      tail = win + prefix - chunks * p  # window + the prefix tokens past the last whole chunk
      base = -(-(tail + room) // p)  # pages of the tail and the room, the same for every head
      if self.allocation == "uniform":
        total = hg * np.minimum(units, chunks)
      else:
        total = np.minimum(hg * units + slack, hg * chunks)
      group = hg * base + total
      head_max = base + np.minimum(total, chunks)
    else:
      if self.allocation == "uniform":
        per_head = -(-(win + np.minimum(units, prefix) + room) // p)
        group = hg * per_head
        head_max = per_head
      else:
        total = np.minimum(hg * units + slack, hg * prefix)
        bound = (hg * (win + room + p - 1) + total) // p
        group = np.minimum(bound, hg * (-(-(win + prefix + room) // p)))
        head_max = -(-(win + np.minimum(total, prefix) + room) // p)
    groups = self.head_groups
    return np.repeat(group[..., None], groups, axis=-1), head_max

  def check_prompt(self, prompt_lens) -> list[str]:
    """Host-side checks before prefill. Returns notes on prompts that will not (fully) be compressed.

    Raises ValueError only for prompts the pipeline cannot handle: empty or non-integer lengths. A prompt
    no longer than the window (or the budget) is valid: the window covers it and everything is kept.
    """
    notes = []
    for i, n in enumerate(prompt_lens):
      if int(n) != n or n < 1:
        raise ValueError(
          f"prompt {i}: length {n!r} is not a positive integer (empty prompts cannot be prefilled or scored)"
        )
      n = int(n)
      if n <= self.window:
        notes.append(
          f"prompt {i}: {n} tokens <= window {self.window}: the observation window covers the "
          "whole prompt; nothing to evict"
        )
        continue
      if self.budget is not None:
        if n <= self.budget:
          notes.append(f"prompt {i}: prompt of {n} tokens <= budget {self.budget}: nothing to evict")
      else:
        kept = _floor_mul(n, _fraction(1.0 - self.compression_ratio))
        if kept < self.window:
          notes.append(
            f"prompt {i}: compression_ratio {self.compression_ratio} would keep {kept} of {n} "
            f"tokens, fewer than the window {self.window}, which is always kept"
          )
    return notes


# ---- the per-layer selection -------------------------------------------------------------------------


def select(
  press: Press,
  q_win_BHWD: jax.Array,
  k_BKLD: jax.Array,
  prompt_len_B: jax.Array,
  units_B: jax.Array,
  *,
  page_size: int,
  colsum_BHL: jax.Array | None = None,
  rng: jax.Array | None = None,
  groups: int | None = None,
):
  """Chooses one layer's kept entries: (keep_BHL bool over cache heads, info).

  q_win_BHWD: the last w queries of each right-padded prompt (after RoPE; slots before position 0 are
  garbage and masked); k_BKLD: the layer's keys; units_B: this layer's row of press.layer_units;
  colsum_BHL: attention summed over the prompt queries (H2O only); groups: head groups selecting their
  own share (default press.head_groups; a mesh shard passes its own count).
  info: "budgets" [B, H'] kept entries incl. window; "retained_mass" [B] the window queries' attention
  mass (softmax over all valid keys) on kept entries, averaged over queries and query heads.
  """
  b, kh, n, d = k_BKLD.shape
  w = press.window
  if (
    q_win_BHWD.ndim != 4
    or q_win_BHWD.shape[0] != b
    or q_win_BHWD.shape[2:] != (w, d)
    or q_win_BHWD.shape[1] % kh
  ):
    raise ValueError(
      f"q_win_BHWD has shape {q_win_BHWD.shape}, expected [B={b}, H (a multiple of K={kh}), "
      f"window={w}, D={d}]"
    )
  groups = press.head_groups if groups is None else groups
  hp = scorers.cache_heads_of(q_win_BHWD, k_BKLD, press)
  if hp % groups:
    raise ValueError(f"{hp} cache heads do not split into head_groups={groups}")

  len_B = jnp.asarray(prompt_len_B, jnp.int32).reshape(b)
  prefix_B = jnp.maximum(len_B - w, 0)
  pos_L = jnp.arange(n, dtype=jnp.int32)
  prefix_BL = pos_L[None, :] < prefix_B[:, None]
  raw_BHL = scorers.SCORERS[press.scorer](q_win_BHWD, k_BKLD, colsum_BHL, len_B, rng, press)
  scores_BHL = scorers.finish_scores(raw_BHL, prefix_BL, press)

  units_B = jnp.asarray(units_B, jnp.int32).reshape(b)
  if press.granularity == "page":
    chunks_B = prefix_B // page_size
    scores = scorers.chunk_scores(scores_BHL, chunks_B, page_size, press.chunk_score)
    tail_start_B = chunks_B * page_size
  else:
    scores = scores_BHL
    tail_start_B = prefix_B
  keep_units = _allocate_in_groups(press, scores, units_B, groups)
  if press.granularity == "page":
    c = scores.shape[-1]
    keep_BHL = (
      jnp.zeros((b, hp, n), bool).at[:, :, : c * page_size].set(jnp.repeat(keep_units, page_size, axis=-1))
    )
  else:
    keep_BHL = keep_units
  tail_BL = (pos_L[None, :] >= tail_start_B[:, None]) & (pos_L[None, :] < len_B[:, None])
  keep_BHL = keep_BHL | tail_BL[:, None, :]
  info = {
    "budgets": jnp.sum(keep_BHL, axis=-1, dtype=jnp.int32),
    "retained_mass": retained_mass(q_win_BHWD, k_BKLD, len_B, keep_BHL, press),
  }
  return keep_BHL, info


def _allocate_in_groups(press: Press, scores_BHN, units_B, groups: int):
  """The allocation rule inside each head group: groups fold into the batch axis of `allocate`."""
  b, h, n = scores_BHN.shape
  hg = h // groups
  s = scores_BHN.reshape(b * groups, hg, n)
  units = jnp.repeat(units_B, groups)
  if press.allocation == "uniform":
    mode = "uniform"
  else:
    mode = "adaptive" if press.floor_mode == "reserve" else "mix"
  keep, _ = allocation.allocate(
    s,
    hg * units,
    _floor_mul(units, _fraction(press.floor_alpha)),
    mode,
    alpha=press.floor_alpha,
    backend=press.backend,
  )
  return keep.reshape(b, h, n)


def retained_mass(q_win_BHWD, k_BKLD, len_B, keep_BHL, press) -> jax.Array:
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
    if overrides:
      raise ValueError(
        f"press 'full' keeps the whole cache: {', '.join(sorted(overrides))} would have no effect"
      )
    return None
  if overrides.get("compression_ratio") is not None and "budget" not in overrides:
    overrides["budget"] = None
  return Press(**{**fields, **overrides})


def press_label(press: Press | None) -> str:
  """A short name for tables: the preset it matches (else its scorer) @ budget or ratio, granularity."""
  if press is None:
    return "full"
  key = (press.scorer, press.allocation, press.schedule)
  names = {
    (v["scorer"], v["allocation"], v.get("schedule", "flat")): k for k, v in PRESETS.items() if v is not None
  }
  size = f"@{press.budget}" if press.budget is not None else f"@r{press.compression_ratio}"
  return (
    names.get(key, f"{press.scorer}-{press.allocation}-{press.schedule}")
    + size
    + ("/page" if press.granularity == "page" else "")
  )
