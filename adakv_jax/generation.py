"""Generation over token ids: prefill into a paged cache (full or compressed), then decoding on device.

The decode loop is one jitted `lax.while_loop` (`decode_loop`): sampling, EOS and the step budget live on
device, and the host sees tokens only when a loop returns (once, or once per `stream_every` tokens for
streaming). All model state is in the PagedKVCache pytree that each call takes in and hands back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from adakv_jax import model as model_lib
from adakv_jax import sharding
from adakv_jax.cache import DEFAULT_PAGE_SIZE, CacheCapacityError, PagedKVCache, plan_cache, with_room
from adakv_jax.config import ModelConfig
from adakv_jax.params import param_dtype

_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)
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
  """A prompt that cannot be run: empty, with ids outside the vocabulary, or longer than the context."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0 = greedy
  top_p: float = 1.0
  MIN_TEMPERATURE = 1e-6  # a class constant, not a field

  def __post_init__(self):
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
      raise ValueError(
        f"temperature must be 0 (greedy) or >= {self.MIN_TEMPERATURE:g}, got "
        f"{self.temperature:g}: a near-zero temperature is greedy in effect, and below float32's "
        "smallest normal (~1e-38) it breaks sampling"
      )
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
def decode_step(
  params,
  tokens_B: jax.Array,
  cache: PagedKVCache,
  key: jax.Array,
  *,
  cfg: ModelConfig,
  sampling: Sampling,
  backend: str = "auto",
):
  """One token per sequence -> (next token [B], logits [B, V], new cache). Does not check the room
  (cache.check_room does): a step past a head's pages drops its write."""
  logits, cache = model_lib.append_step(
    params, tokens_B[:, None], jnp.ones_like(tokens_B), cache, cfg=cfg, backend=backend
  )
  return sample(logits, key, sampling), logits, cache


# ---- the decode loop on device --------------------------------------------------------------------------


@struct.dataclass
class DecodeState:
  """Everything a decode loop carries: resumable, so a stream is several loops over one state."""

  tokens_BS: jax.Array  # [B, S] generated ids (S = the most this state can generate), 0 past count_B
  count_B: jax.Array  # [B] tokens generated so far (the first one included)
  last_B: jax.Array  # [B] the token to feed next
  done_B: jax.Array  # [B] bool: EOS generated or the step budget spent
  cache: PagedKVCache
  key: jax.Array


def start_decode(
  first_B: jax.Array, cache: PagedKVCache, key: jax.Array, max_new_tokens: int, eos_ids: Sequence[int]
) -> DecodeState:
  """The state after the first generated token (sampled from prefill's or the question's logits)."""
  b = first_B.shape[0]
  tokens = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first_B)
  done = jnp.isin(first_B, jnp.asarray(list(eos_ids) or [-1], jnp.int32)) | (max_new_tokens <= 1)
  return DecodeState(
    tokens_BS=tokens, count_B=jnp.ones((b,), jnp.int32), last_B=first_B, done_B=done, cache=cache, key=key
  )


@functools.partial(
  jax.jit, static_argnames=("cfg", "sampling", "eos_ids", "steps", "backend"), donate_argnames=("state",)
)
def decode_loop(
  params,
  state: DecodeState,
  *,
  cfg: ModelConfig,
  sampling: Sampling,
  eos_ids: tuple[int, ...],
  steps: int,
  backend: str = "auto",
) -> DecodeState:
  """Up to `steps` decode steps on device, stopping early once every sequence is done.

  A done sequence keeps stepping with its last token while others run (its writes land in room reserved
  for it and its outputs are discarded), so the batch stays one static shape.
  """
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  limit = state.tokens_BS.shape[1]
  params = model_lib.per_layer_params(params)  # once, outside the loop (see per_layer_params)

  def cond(carry):
    i, st = carry
    return (i < steps) & ~jnp.all(st.done_B)

  def body(carry):
    i, st = carry
    key, sub = jax.random.split(st.key)
    logits, cache = model_lib.append_step(
      params, st.last_B[:, None], jnp.ones_like(st.last_B), st.cache, cfg=cfg, backend=backend
    )
    tok = sample(logits, sub, sampling)
    live = ~st.done_B
    b = jnp.arange(tok.shape[0])
    tokens = st.tokens_BS.at[b, jnp.minimum(st.count_B, limit - 1)].set(
      jnp.where(live, tok, st.tokens_BS[b, jnp.minimum(st.count_B, limit - 1)])
    )
    count = st.count_B + live.astype(jnp.int32)
    done = st.done_B | (live & jnp.isin(tok, eos)) | (count >= limit)
    last = jnp.where(live, tok, st.last_B)
    return i + 1, st.replace(tokens_BS=tokens, count_B=count, last_B=last, done_B=done, cache=cache, key=key)

  _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
  return state


# ---- generate -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
  token_ids: list[list[int]]  # generated ids per sequence (EOS included when hit)
  prompt_tokens: list[int]
  cache_bytes: int  # K/V bytes allocated by the cache that lives during decoding (every pool page)
  kept_bytes: int  # K/V bytes of the entries prefill kept
  decode_room_bytes: int  # K/V bytes reserved for the tokens still to come (questions + new tokens)
  full_cache_bytes: int  # what the uncompressed cache of the same run allocates in the same layout
  page_size: int
  pages_used: int  # pages the heads own after prefill
  pages_allocated: int  # pages in the pools
  prefill_s: float  # prefill run time, tracing and compilation excluded (those are compile_s)
  decode_s: float
  decode_tokens_per_s: float  # generated tokens per second of decode-loop run time (compile excluded)
  budgets: np.ndarray | None = None  # [layers, batch, heads] kept entries per head after prefill
  retained_mass: np.ndarray | None = None  # [layers, batch]
  positions: np.ndarray | None = None  # [layers, batch, heads, C] kept prompt positions, -1 = none
  notes: list[str] = dataclasses.field(default_factory=list)
  answers: list[list[list[int]]] | None = None  # question-agnostic: [question][sequence] -> ids
  final_logits: np.ndarray | None = None  # logits that chose the first generated token [B, V]
  compile_s: float = 0.0  # tracing + compilation of prefill and decode (0 when already compiled)
  press: object = None  # the press that ran (head_groups set by a mesh)

  @property
  def padding_overhead(self) -> float:
    """Allocated K/V bytes over what the run needs: kept entries plus the reserved decode room."""
    return self.cache_bytes / max(self.kept_bytes + self.decode_room_bytes, 1)

  def memory(self) -> dict:
    """The cache's memory figures as one JSON-ready record (the CLI's --json and the experiments)."""
    return {
      "cache_bytes": self.cache_bytes,
      "kept_bytes": self.kept_bytes,
      "decode_room_bytes": self.decode_room_bytes,
      "full_cache_bytes": self.full_cache_bytes,
      "padding_overhead": round(self.padding_overhead, 4),
      "page_size": self.page_size,
      "pages_used": self.pages_used,
      "pages_allocated": self.pages_allocated,
    }


def pad_rows(rows: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
  """Right-padded int32 token rows [len(rows), width] (width: the longest row by default); the padding
  is never read, since every consumer follows the rows' lengths."""
  width = max(len(r) for r in rows) if width is None else width
  if any(len(r) > width for r in rows):
    raise ValueError(f"a row of {max(len(r) for r in rows)} tokens does not fit width {width}")
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    out[i, : len(r)] = r
  return out


def check_token_ids(seqs: Sequence[Sequence[int]], vocab_size: int, what: str = "prompt") -> None:
  """Ids must be integers in [0, vocab): an embedding lookup would silently clamp anything else."""
  for i, seq in enumerate(seqs):
    arr = np.asarray(seq)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
      raise PromptError(
        f"{what} {i} must be a flat list of integer token ids, got {type(seq).__name__} of dtype {arr.dtype}"
      )
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
      j = int(bad[0])
      raise PromptError(
        f"{what} {i}, position {j}: token id {int(arr[j])} is outside the vocabulary "
        f"[0, {vocab_size}) ({bad.size} such id(s))"
      )


def _check_count(name: str, value, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  return int(value)


def _question_rounds(questions, batch: int) -> list[list[list[int]]] | None:
  """Each round: one id list shared by every sequence, or one list per sequence -> [B][ids]."""
  if questions is None:
    return None
  if len(questions) == 0:
    raise PromptError("question-agnostic mode needs at least one question")
  rounds = []
  for r, q in enumerate(questions):
    per_seq = len(q) > 0 and not isinstance(q[0], (int, np.integer))
    qs = [list(x) for x in q] if per_seq else [list(q)] * batch
    if len(qs) != batch:
      raise PromptError(f"question {r} has {len(qs)} per-sequence questions for {batch} sequences")
    if any(len(x) == 0 for x in qs):
      raise PromptError(f"question {r} is empty")
    rounds.append(qs)
  return rounds


def full_cache_bytes(cfg: ModelConfig, prompt_lens: Sequence[int], room: int, page_size: int) -> int:
  """K/V bytes the uncompressed paged cache of these prompts allocates (the same layout as any press)."""
  pages = sum(-(-(n + room) // page_size) for n in prompt_lens)
  itemsize = jnp.dtype(param_dtype(cfg)).itemsize
  return 2 * cfg.num_layers * cfg.num_kv_heads * pages * page_size * cfg.head_dim * itemsize


def generate(
  params,
  cfg: ModelConfig,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int = 64,
  press=None,
  sampling: Sampling = Sampling(),
  eos_token_ids: Sequence[int] | None = None,
  questions=None,
  return_positions: bool = False,
  backend: str = "auto",
  seed: int = 0,
  mesh=None,
  page_size: int = DEFAULT_PAGE_SIZE,
  trim: bool = True,
  progress: bool = False,
  on_tokens: Callable[[list[list[int]]], None] | None = None,
  stream_every: int = 16,
) -> GenerationResult:
  """Runs a batch of prompts (any lengths) with an optional press.

  questions=None: question-aware (whatever question there is sits at the end of each prompt).
  questions=[q1, q2, ...]: question-agnostic: prefill and compress the prompts alone, then for each
  question roll every head back to its compressed context, append the question and decode. A question
  is one id list for every sequence, or a list of per-sequence id lists.
  mesh: run SPMD over a ("data", "model") mesh (shard the params with sharding.shard_params first):
  sequences split over "data", heads over "model"; each model shard selects within its own heads
  (press.head_groups = the shard count), which a single-device run with that head_groups reproduces.
  trim: drop the pool pages token-granular adaptive selection left unused (exact memory; the decode
  loop then compiles for the trimmed shapes). on_tokens: called with each sequence's new ids every
  `stream_every` tokens (streaming; question-aware mode).
  """
  max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
  _check_count("stream_every", stream_every, 1)
  if not isinstance(sampling, Sampling):
    raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise PromptError("empty prompt: every prompt needs at least one token")
  check_token_ids(prompts, cfg.vocab_size)
  rounds = _question_rounds(questions, len(prompts))
  for r in rounds or []:
    check_token_ids(r, cfg.vocab_size, what="question")
  if mesh is not None:
    heads = press.cache_heads(cfg.num_heads, cfg.num_kv_heads) if press is not None else cfg.num_kv_heads
    sharding.check_fits(cfg, mesh, batch=len(prompts), cache_heads=heads)
    if press is not None and press.head_groups % mesh.shape["model"]:
      if press.head_groups != 1:
        raise ValueError(
          f"press.head_groups={press.head_groups} is not a multiple of the mesh's model "
          f"axis ({mesh.shape['model']})"
        )
      press = press.replace(head_groups=mesh.shape["model"])
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    return _generate(
      params,
      cfg,
      prompts,
      max_new_tokens=max_new_tokens,
      press=press,
      sampling=sampling,
      eos_token_ids=eos_token_ids,
      rounds=rounds,
      return_positions=return_positions,
      backend=backend,
      seed=seed,
      mesh=mesh,
      page_size=page_size,
      trim=trim,
      progress=progress,
      on_tokens=on_tokens,
      stream_every=stream_every,
    )


def _check_context_length(cfg: ModelConfig, lens, q_max: int, max_new_tokens: int) -> None:
  need = max(lens) + q_max + max_new_tokens
  if need > cfg.max_position_embeddings:
    raise PromptError(
      f"prompt of {max(lens)} tokens + {q_max} question tokens + {max_new_tokens} new tokens = {need} "
      f"exceeds the model's context of {cfg.max_position_embeddings} tokens"
    )


def _eos_ids(cfg: ModelConfig, eos_token_ids) -> tuple[int, ...]:
  return tuple(int(e) for e in (cfg.eos_token_ids if eos_token_ids is None else eos_token_ids))


def _prefill(params, cfg, prompts, *, press, room, key, page_size, mesh, trim):
  """Prefill (and compress) the prompts into a cache with `room` entries per head past the kept ones.
  Returns (last-token logits, cache, host info, prefill run seconds, compile seconds)."""
  lens = [len(p) for p in prompts]
  if press is not None:
    press.check_page_size(page_size)
  chunk = model_lib.prompt_chunk(max(lens))
  padded = model_lib.padded_length(max(lens))
  heads = press.cache_heads(cfg.num_heads, cfg.num_kv_heads) if press is not None else cfg.num_kv_heads
  shards = sharding.mesh_shards()
  plan = plan_cache(cfg.num_layers, heads, lens, room=room, press=press, page_size=page_size, shards=shards)
  tokens = jnp.asarray(pad_rows(prompts, padded))
  len_B = jnp.asarray(lens, jnp.int32)
  if mesh is not None:
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
    len_B = jax.device_put(len_B, sharding.batch_sharding(mesh, 1))
  with _stopwatch() as clock:
    logits, cache, info = model_lib.prefill(
      params, tokens, len_B, key, cfg=cfg, press=press, plan=plan, chunk=chunk
    )
    jax.block_until_ready(cache)
  info = sharding.to_host(info)
  if trim:
    cache = cache.trim(shards[0] * shards[1])
  return logits, cache, info, clock["run_s"], clock["compile_s"]


def _answer_rounds(run, params, cfg, cache: PagedKVCache, rounds, key, *, sampling, backend, stats):
  """Question-agnostic decoding: each round rolls every head back to the context, appends the round's
  questions and decodes. Returns (answers [round][sequence] -> ids, the cache)."""
  saved_len, saved_pos = sharding.to_host((cache.lengths, cache.pos))  # host: never donated
  answers = []
  for qs in rounds:
    cache = cache.rollback(saved_len, saved_pos)
    t = max(len(q) for q in qs)
    q_BT = jnp.asarray(pad_rows(qs, t))
    with _stopwatch() as qclock:
      logits, cache = model_lib.append(
        params, q_BT, jnp.asarray([len(q) for q in qs], jnp.int32), cache, cfg=cfg, backend=backend
      )
      jax.block_until_ready(logits)
    stats["compile_s"] += qclock["compile_s"]
    key, sub, loop_key = jax.random.split(key, 3)
    ans, cache = run(sample(logits, sub, sampling), cache, loop_key, on_tokens=None)
    answers.append(ans)
  return answers, cache


def _generate(
  params,
  cfg,
  prompts,
  *,
  max_new_tokens,
  press,
  sampling,
  eos_token_ids,
  rounds,
  return_positions,
  backend,
  seed,
  mesh,
  page_size,
  trim,
  progress,
  on_tokens,
  stream_every,
) -> GenerationResult:
  lens = [len(p) for p in prompts]
  q_max = max((len(q) for r in rounds or [] for q in r), default=0)
  _check_context_length(cfg, lens, q_max, max_new_tokens)
  eos = _eos_ids(cfg, eos_token_ids)
  notes = list(press.check_prompt(lens)) if press is not None else []
  room = q_max + max_new_tokens
  key = jax.random.PRNGKey(seed)
  key, pkey = jax.random.split(key)
  logits, cache, info, prefill_s, compile_s = _prefill(
    params, cfg, prompts, press=press, room=room, key=pkey, page_size=page_size, mesh=mesh, trim=trim
  )
  kept_bytes, pages_used = cache.kept_bytes(), cache.pages_used()
  stats = {"decode_s": 0.0, "tokens": 0, "compile_s": 0.0}
  run = functools.partial(
    _decode,
    params,
    cfg=cfg,
    sampling=sampling,
    eos=eos,
    backend=backend,
    max_new_tokens=max_new_tokens,
    stats=stats,
    progress=progress,
    stream_every=stream_every,
  )
  answers = None
  if rounds is None:
    key, sub, loop_key = jax.random.split(key, 3)
    out, cache = run(sample(logits, sub, sampling), cache, loop_key, on_tokens=on_tokens)
  else:
    answers, cache = _answer_rounds(
      run, params, cfg, cache, rounds, key, sampling=sampling, backend=backend, stats=stats
    )
    out = answers[0]
  return _result(
    cfg,
    cache,
    out,
    answers,
    lens=lens,
    room=room,
    page_size=page_size,
    kept_bytes=kept_bytes,
    pages_used=pages_used,
    prefill_s=prefill_s,
    compile_s=compile_s,
    stats=stats,
    info=info,
    press=press,
    notes=notes,
    return_positions=return_positions,
    final_logits=sharding.to_host(logits) if rounds is None else None,
  )


def _result(
  cfg,
  cache,
  out,
  answers,
  *,
  lens,
  room,
  page_size,
  kept_bytes,
  pages_used,
  prefill_s,
  compile_s,
  stats,
  info,
  press,
  notes,
  return_positions,
  final_logits,
) -> GenerationResult:
  entry = cache.entry_bytes
  return GenerationResult(
    token_ids=out,
    prompt_tokens=lens,
    cache_bytes=cache.nbytes(),
    kept_bytes=kept_bytes,
    decode_room_bytes=cfg.num_layers * len(lens) * cache.num_heads * room * entry,
    full_cache_bytes=full_cache_bytes(cfg, lens, room, page_size),
    page_size=page_size,
    pages_used=pages_used,
    pages_allocated=cache.pages_allocated(),
    prefill_s=prefill_s,
    decode_s=stats["decode_s"],
    decode_tokens_per_s=stats["tokens"] / stats["decode_s"] if stats["decode_s"] > 0 else float("nan"),
    budgets=np.asarray(info["budgets"]),
    retained_mass=np.asarray(info["retained_mass"]) if press is not None else None,
    positions=np.asarray(info["positions"]) if return_positions else None,
    notes=notes,
    answers=answers,
    final_logits=final_logits,
    compile_s=compile_s + stats["compile_s"],
    press=press,
  )


# ---- compressed contexts: compress once, answer questions later (or in another process) ----------------


@dataclasses.dataclass
class CompressedContext:
  """Prompts prefilled and compressed without any question (question-agnostic), ready for questions.

  cache: the kept entries (any layout; `answer_questions` lays them out with room for the questions);
  positions: [L, B, H', C] kept prompt positions in storage order (-1 = none); meta: free-form notes
  that travel with a saved context (e.g. how the CLI encoded the prompt)."""

  cache: PagedKVCache
  press: object
  prompt_lens: list[int]
  positions: np.ndarray
  retained_mass: np.ndarray | None = None
  prefill_s: float = 0.0
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def page_size(self) -> int:
    return self.cache.page_size


def compress_context(
  params,
  cfg: ModelConfig,
  prompts: Sequence[Sequence[int]],
  *,
  press,
  seed: int = 0,
  page_size: int = DEFAULT_PAGE_SIZE,
) -> CompressedContext:
  """The prefill and compression of `generate(..., questions=...)` alone (same seed, same kept entries),
  with no room reserved: save it (checkpoints.save_context) or answer with `answer_questions`."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise PromptError("empty prompt: every prompt needs at least one token")
  check_token_ids(prompts, cfg.vocab_size)
  lens = [len(p) for p in prompts]
  _check_context_length(cfg, lens, 0, 0)
  _, pkey = jax.random.split(jax.random.PRNGKey(seed))
  _, cache, info, prefill_s, _ = _prefill(
    params, cfg, prompts, press=press, room=0, key=pkey, page_size=page_size, mesh=None, trim=True
  )
  return CompressedContext(
    cache=cache,
    press=press,
    prompt_lens=lens,
    positions=np.asarray(info["positions"]),
    retained_mass=np.asarray(info["retained_mass"]) if press is not None else None,
    prefill_s=prefill_s,
  )


def answer_questions(
  params,
  cfg: ModelConfig,
  context: CompressedContext,
  questions,
  *,
  max_new_tokens: int = 64,
  sampling: Sampling = Sampling(),
  eos_token_ids: Sequence[int] | None = None,
  backend: str = "auto",
  seed: int = 0,
) -> GenerationResult:
  """Each question against the compressed context, as `generate(..., questions=...)` answers it: the
  context is laid out as that run's cache (room for the longest question and the new tokens), so with
  the same press, seed and questions the answers are the same. prefill_s is the context's."""
  max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
  if not isinstance(sampling, Sampling):
    raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
  lens = list(context.prompt_lens)
  rounds = _question_rounds(questions, len(lens))
  if rounds is None:
    raise PromptError("answer_questions needs at least one question")
  for r in rounds:
    check_token_ids(r, cfg.vocab_size, what="question")
  q_max = max(len(q) for r in rounds for q in r)
  _check_context_length(cfg, lens, q_max, max_new_tokens)
  press, room, page_size = context.press, q_max + max_new_tokens, context.page_size
  heads = context.cache.num_heads
  plan = plan_cache(cfg.num_layers, heads, lens, room=room, press=press, page_size=page_size)
  cache = with_room(context.cache, room, max_pages=plan.max_pages)
  kept_bytes, pages_used = cache.kept_bytes(), cache.pages_used()
  stats = {"decode_s": 0.0, "tokens": 0, "compile_s": 0.0}
  run = functools.partial(
    _decode,
    params,
    cfg=cfg,
    sampling=sampling,
    eos=_eos_ids(cfg, eos_token_ids),
    backend=backend,
    max_new_tokens=max_new_tokens,
    stats=stats,
    progress=False,
    stream_every=max_new_tokens,
  )
  key, _ = jax.random.split(jax.random.PRNGKey(seed))  # the key generate has left after its prefill
  answers, cache = _answer_rounds(
    run, params, cfg, cache, rounds, key, sampling=sampling, backend=backend, stats=stats
  )
  info = {
    "budgets": np.asarray(context.cache.lengths),
    "retained_mass": context.retained_mass,
    "positions": context.positions,
  }
  return _result(
    cfg,
    cache,
    answers[0],
    answers,
    lens=lens,
    room=room,
    page_size=page_size,
    kept_bytes=kept_bytes,
    pages_used=pages_used,
    prefill_s=context.prefill_s,
    compile_s=0.0,
    stats=stats,
    info=info,
    press=press,
    notes=[],
    return_positions=True,
    final_logits=None,
  )


def _decode(
  params,
  first_B,
  cache,
  key,
  *,
  cfg,
  sampling,
  eos,
  backend,
  max_new_tokens,
  stats,
  progress,
  stream_every,
  on_tokens,
):
  """The first token is given; the rest come from decode loops (one, or one per streamed chunk)."""
  from tqdm.auto import tqdm

  state = start_decode(first_B, cache, key, max_new_tokens, eos)
  chunk = stream_every if on_tokens is not None or progress else max_new_tokens
  bar = tqdm(total=max_new_tokens, desc="decode", unit="tok", disable=not progress, leave=False)
  shown = np.ones(first_B.shape[0], np.int64)
  if on_tokens is not None:
    on_tokens([[int(t)] for t in sharding.to_host(first_B)])
  bar.update(1)
  while True:
    done, count = sharding.to_host((state.done_B, state.count_B))
    if done.all():
      break
    with _stopwatch() as clock:
      state = decode_loop(
        params, state, cfg=cfg, sampling=sampling, eos_ids=eos, steps=chunk, backend=backend
      )
      jax.block_until_ready(state.count_B)
    stats["decode_s"] += clock["run_s"]
    stats["compile_s"] += clock["compile_s"]
    new_count = sharding.to_host(state.count_B)
    stats["tokens"] += int(np.sum(new_count - count))
    bar.update(int(new_count.max() - count.max()))
    if on_tokens is not None:
      toks = sharding.to_host(state.tokens_BS)
      on_tokens([toks[i, shown[i] : new_count[i]].tolist() for i in range(len(new_count))])
      shown = new_count.copy()
  bar.close()
  toks, count = sharding.to_host((state.tokens_BS, state.count_B))
  return [toks[i, : count[i]].tolist() for i in range(len(count))], state.cache


__all__ = [
  "generate",
  "compress_context",
  "answer_questions",
  "CompressedContext",
  "decode_step",
  "decode_loop",
  "start_decode",
  "DecodeState",
  "sample",
  "Sampling",
  "GenerationResult",
  "PromptError",
  "CacheCapacityError",
  "full_cache_bytes",
  "check_token_ids",
]
