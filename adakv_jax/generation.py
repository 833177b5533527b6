"""Generation over token ids: prefill (full or compressed), then a jitted, cache-donating decode loop.

The Python loop only feeds tokens and checks for EOS; all model state lives in the KVCache pytree that
each step takes in and hands back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adakv_jax import model as model_lib
from adakv_jax import sharding
from adakv_jax.cache import KVCache, CacheCapacityError
from adakv_jax.config import ModelConfig


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_duration(event: str, seconds: float, **_):
  if event in _COMPILE_EVENTS:
    _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@contextlib.contextmanager
def _stopwatch():
  """Wall time of the block, split into (compile, run) with JAX's own compile-duration events."""
  out = {}
  c0, t0 = _compile_seconds[0], time.perf_counter()
  yield out
  out["compile_s"] = _compile_seconds[0] - c0
  out["run_s"] = max(time.perf_counter() - t0 - out["compile_s"], 0.0)


class PromptError(ValueError):
  """A prompt that cannot be run: empty, or longer than the model's context."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  MIN_TEMPERATURE = 1e-6  # a class constant, not a field

  def __post_init__(self):
    import math
    import numbers

    # a static jit argument: plain floats keep it hashable, and equal settings share one compiled step
    for name in ("temperature", "top_p"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
      if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
      object.__setattr__(self, name, float(value))
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if 0 < self.temperature < self.MIN_TEMPERATURE:
      raise ValueError(f"temperature must be 0 (greedy) or >= {self.MIN_TEMPERATURE:g}, got "
                       f"{self.temperature:g}: a near-zero temperature is greedy in effect, and below float32's "
                       "smallest normal (~1e-38) it breaks sampling")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV / sampling.temperature
  if sampling.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always survives)
    cut = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < sampling.top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_desc, cut - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "backend"), donate_argnames=("cache",))
def decode_step(params, tokens_B: jax.Array, cache: KVCache, key: jax.Array, *, cfg: ModelConfig,
                sampling: Sampling, backend: str = "auto"):
  """One token per sequence -> (next token [B], logits [B, V], new cache)."""
  logits, cache = model_lib.append(params, tokens_B[:, None], jnp.ones_like(tokens_B), cache, cfg=cfg,
                                   backend=backend)
  return sample(logits, key, sampling), logits, cache


@dataclasses.dataclass
class GenerationResult:
  token_ids: list[list[int]]  # generated ids per sequence (EOS included when hit)
  prompt_tokens: list[int]
  cache_bytes: int  # allocated bytes of the cache that lives during decoding
  full_cache_bytes: int  # what an uncompressed cache for the same run would allocate
  live_cache_bytes: int  # bytes of live (kept) K/V entries right after prefill
  prefill_s: float  # prefill run time, tracing and compilation excluded (those are compile_s)
  decode_s: float
  decode_tokens_per_s: float  # steady state: the first (compiling) decode step is not counted
  budgets: np.ndarray | None = None  # [layers, batch, heads] live entries per head after prefill
  retained_mass: np.ndarray | None = None  # [layers, batch]
  positions: np.ndarray | None = None  # [layers, batch, heads, capacity], -1 = padding
  notes: list[str] = dataclasses.field(default_factory=list)
  head_cap: int | None = None  # most prompt entries one head may keep (cap + window)
  answers: list[list[list[int]]] | None = None  # question-agnostic: [question][sequence] -> ids
  final_logits: np.ndarray | None = None  # logits that chose the first generated token [B, V]
  compile_s: float = 0.0  # tracing + compilation of the prefill (0 when it was already compiled)

  @property
  def heads_at_cap(self) -> float | None:
    """Fraction of (layer, sequence, head) budgets that hit the cap: high means the cap binds."""
    if self.budgets is None or self.head_cap is None:
      return None
    return float(np.mean(self.budgets >= self.head_cap))

  @property
  def padding_overhead(self) -> float:
    return self.cache_bytes / max(self.live_cache_bytes, 1)


def _pad_batch(prompts: Sequence[Sequence[int]], length: int) -> np.ndarray:
  out = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    out[i, :len(p)] = p
  return out


def full_cache_bytes(cfg: ModelConfig, batch: int, tokens: int) -> int:
  itemsize = jnp.dtype(model_lib.dtype_of(cfg)).itemsize
  return 2 * cfg.num_layers * batch * cfg.num_kv_heads * tokens * cfg.head_dim * itemsize


def _decode(params, cfg, first_B, cache, key, steps, sampling, eos, backend, stats, progress=False):
  """Greedy/sampled continuation from `first_B` for up to `steps` tokens in total (first included)."""
  from tqdm.auto import tqdm

  b = first_B.shape[0]
  bar = tqdm(total=steps, desc="decode", unit="tok", disable=not progress, leave=False)
  bar.update(1)
  out = [[int(t)] for t in np.asarray(first_B)]
  done = np.array([t in eos for t in np.asarray(first_B)])
  tok = first_B
  t0, n = None, 0  # the clock starts after the first step, which may include compilation
  for _ in range(steps - 1):
    if done.all():
      break
    key, sub = jax.random.split(key)
    tok, _, cache = decode_step(params, tok, cache, sub, cfg=cfg, sampling=sampling, backend=backend)
    host = np.asarray(tok)  # syncs: the step is done
    if t0 is None:
      t0 = time.perf_counter()
    else:
      n += 1
    bar.update(1)
    for i in range(b):
      if not done[i]:
        out[i].append(int(host[i]))
        done[i] = int(host[i]) in eos
  bar.close()
  if t0 is not None:
    stats["decode_s"] = stats.get("decode_s", 0.0) + time.perf_counter() - t0
  stats["decode_steps"] = stats.get("decode_steps", 0) + n * b
  return out, cache


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             press=None, sampling: Sampling = Sampling(), eos_token_ids: Sequence[int] | None = None,
             questions: Sequence[Sequence[int]] | None = None, return_positions: bool = False,
             backend: str = "auto", seed: int = 0, mesh=None, progress: bool = False) -> GenerationResult:
  """Runs a batch of prompts (any lengths) with an optional press.

  questions=None: question-aware (whatever question there is sits at the end of each prompt).
  questions=[q1, q2, ...]: question-agnostic: prefill and compress the prompts alone, then for each
  question roll every head back to its compressed context length, append the question and decode.
  mesh: run SPMD over a ("data", "model") mesh (see adakv_jax.sharding; shard the params with
  sharding.shard_params first): sequences split over "data", heads over "model".
  """
  if mesh is not None:
    heads = press.cache_heads(cfg) if press is not None else cfg.num_kv_heads
    sharding.check_fits(cfg, mesh, batch=len(prompts), cache_heads=heads)
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    return _generate(params, cfg, prompts, max_new_tokens=max_new_tokens, press=press, sampling=sampling,
                     eos_token_ids=eos_token_ids, questions=questions, return_positions=return_positions,
                     backend=backend, seed=seed, mesh=mesh, progress=progress)


def _generate(params, cfg, prompts, *, max_new_tokens, press, sampling, eos_token_ids, questions,
              return_positions, backend, seed, mesh, progress) -> GenerationResult:
  if not prompts or any(len(p) == 0 for p in prompts):
    raise PromptError("empty prompt: every prompt needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  lens = [len(p) for p in prompts]
  q_max = max((len(q) for q in questions), default=0) if questions else 0
  if questions is not None and (not questions or any(len(q) == 0 for q in questions)):
    raise PromptError("question-agnostic mode needs non-empty questions")
  need = max(lens) + q_max + max_new_tokens
  if need > cfg.max_position_embeddings:
    raise PromptError(
        f"prompt of {max(lens)} tokens + {q_max} question tokens + {max_new_tokens} new tokens = {need} "
        f"exceeds the model's context of {cfg.max_position_embeddings} tokens")
  eos = set(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
  notes = list(press.check_prompt(lens)) if press is not None else []

  chunk = model_lib.prompt_chunk(max(lens))
  padded = -(-max(lens) // chunk) * chunk
  extra = q_max + max_new_tokens
  if press is None:
    capacity = padded + extra  # bucketed with the prompt: one compiled decode step per bucket
  else:
    capacity = press.capacity(cfg.num_layers, max(lens), extra)
  head_cap = press.head_cap(cfg.num_layers, max(lens)) if press is not None else None
  tokens = jnp.asarray(_pad_batch(prompts, padded))
  len_B = jnp.asarray(lens, jnp.int32)
  if mesh is not None:
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
    len_B = jax.device_put(len_B, sharding.batch_sharding(mesh, 1))
  key = jax.random.PRNGKey(seed)
  key, pkey = jax.random.split(key)

  with _stopwatch() as clock:
    logits, cache, info = model_lib.prefill(params, tokens, len_B, pkey, cfg=cfg, press=press,
                                            capacity=capacity, chunk=chunk, head_cap=head_cap,
                                            return_positions=return_positions)
    if mesh is not None:
      cache = sharding.shard_cache(cache, mesh)
    jax.block_until_ready(cache)
  prefill_s = clock["run_s"]
  live = cache.live_bytes()
  stats: dict = {}

  answers = None
  if questions is None:
    key, sub = jax.random.split(key)
    first = sample(logits, sub, sampling)
    out, cache = _decode(params, cfg, first, cache, key, max_new_tokens, sampling, eos, backend, stats,
                         progress)
  else:
    saved_len, saved_pos = np.asarray(cache.lengths), np.asarray(cache.pos)
    answers = []
    for q in questions:
      cache = cache.rollback(jnp.asarray(saved_len), jnp.asarray(saved_pos))
      cache.check_room(len(q) + max_new_tokens)
      q_BT = jnp.asarray(np.tile(np.asarray(q, np.int32), (len(prompts), 1)))
      logits, cache = model_lib.append(params, q_BT, jnp.full((len(prompts),), len(q), jnp.int32), cache,
                                       cfg=cfg, backend=backend)
      key, sub = jax.random.split(key)
      first = sample(logits, sub, sampling)
      ans, cache = _decode(params, cfg, first, cache, key, max_new_tokens, sampling, eos, backend, stats,
                         progress)
      answers.append(ans)
    out = answers[0]

  steps = stats.get("decode_steps", 0)
  decode_s = stats.get("decode_s", 0.0)
  info = jax.device_get(info)
  return GenerationResult(
      token_ids=out,
      prompt_tokens=lens,
      cache_bytes=cache.nbytes(),
      full_cache_bytes=full_cache_bytes(cfg, len(prompts), max(lens) + extra),
      live_cache_bytes=live,
      prefill_s=prefill_s,
      decode_s=decode_s,
      decode_tokens_per_s=steps / decode_s if decode_s > 0 else float("nan"),
      budgets=np.asarray(info["budgets"]) if press is not None else None,
      retained_mass=np.asarray(info["retained_mass"]) if press is not None else None,
      positions=np.asarray(info["positions"]) if return_positions and press is not None else None,
      notes=notes,
      head_cap=head_cap + press.window if press is not None else None,
      answers=answers,
      final_logits=np.asarray(logits) if questions is None else None,
      compile_s=clock["compile_s"],
  )


__all__ = ["generate", "decode_step", "sample", "Sampling", "GenerationResult", "PromptError",
           "CacheCapacityError", "full_cache_bytes"]
