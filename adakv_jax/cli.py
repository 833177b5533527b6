"""Command line: `python -m adakv_jax generate --model smollm2-135m --prompt "..." [--press ada-snapkv]`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

PRESS_NAMES = (
  "full",
  "snapkv",
  "ada-snapkv",
  "pyramidkv",
  "ada-pyramidkv",
  "h2o",
  "ada-h2o",
  "streamingllm",
  "knorm",
  "random",
)
# compression options (attribute names of the parsed args); --press full would silently ignore them
_COMPRESSION_OPTIONS = (
  "budget",
  "compression_ratio",
  "window",
  "kernel",
  "pool",
  "floor_alpha",
  "floor_mode",
  "gqa",
  "granularity",
  "chunk_score",
)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m adakv_jax", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", help="generate text with a full or compressed KV cache")
  g.add_argument(
    "--model",
    default="smollm2-135m",
    help="a registered name (smollm2-135m, "
    "qwen2.5-coder-0.5b), a HF checkpoint dir, a .gguf file or a converted (orbax) dir",
  )
  src = g.add_mutually_exclusive_group()  # one is required unless --load-context gives the context
  src.add_argument("--prompt", help="prompt text (the context, in question-agnostic mode)")
  src.add_argument("--prompt-file", help="read the prompt from this file")
  g.add_argument("--max-new-tokens", type=int, default=64)
  g.add_argument("--raw", action="store_true", help="skip the chat template")
  g.add_argument("--json", action="store_true", help="print one JSON object")
  g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--backend", choices=("auto", "xla", "pallas"), default="auto")
  c = g.add_argument_group("compression")
  c.add_argument(
    "--press",
    help=f"one of: {', '.join(PRESS_NAMES)} (default full; with --load-context, the saved context's)",
  )
  b = c.add_mutually_exclusive_group()
  b.add_argument("--budget", type=int, help="average cache entries per head, window included")
  b.add_argument("--compression-ratio", type=float, help="fraction of the prompt's entries to evict")
  c.add_argument("--window", type=int, help="observation window (default 32)")
  c.add_argument("--kernel", type=int, help="pooling kernel (default 7 for snapkv)")
  c.add_argument("--pool", choices=("max", "avg"))
  c.add_argument("--floor-alpha", type=float, help="safeguard floor alpha in [0, 1] (default 0.2)")
  c.add_argument("--floor-mode", choices=("reserve", "mix"))
  c.add_argument("--gqa", choices=("kv", "query"), help="select per KV head (default) or per query head")
  c.add_argument(
    "--granularity",
    choices=("token", "page"),
    help="select single entries (default) or whole page-sized chunks, so no span is cut",
  )
  c.add_argument(
    "--chunk-score",
    choices=("mean", "max"),
    help="page granularity: a chunk's score is the mean (default) or max of its tokens' pooled scores",
  )
  c.add_argument(
    "--page-size", type=int, default=16, help="entries per cache page (a power of two, 8-256; default 16)"
  )
  c.add_argument(
    "--question",
    action="append",
    help="question-agnostic mode: compress the prompt alone, "
    "then answer each question against the same compressed cache (repeatable)",
  )
  c.add_argument("--show-positions", action="store_true", help="include kept positions in --json")
  sc = g.add_argument_group("saved contexts")
  sc.add_argument(
    "--save-context",
    metavar="DIR",
    help="compress the prompt alone (question-agnostic), save the compressed context to DIR and exit",
  )
  sc.add_argument(
    "--load-context",
    metavar="DIR",
    help="answer each --question from the compressed context "
    "saved in DIR (no prompt, no prefill; the same model and press it was saved with)",
  )
  sc.add_argument("--overwrite", action="store_true", help="with --save-context: replace a saved context")
  cv = sub.add_parser("convert", help="convert a checkpoint once (orbax) so later runs load it fast")
  cv.add_argument("--model", required=True, help="a registered name, a HF checkpoint dir or a .gguf file")
  cv.add_argument("--out", required=True, help="directory to write (then use it as --model)")
  cv.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  cv.add_argument("--overwrite", action="store_true")
  return p


def cmd_convert(a) -> int:
  from adakv_jax.checkpoints import SaveTargetError, check_save_target, load_model, save_converted

  try:
    check_save_target(a.out, a.overwrite)  # before the source model loads, which can take minutes
    cfg, params, tok = load_model(a.model, dtype=a.dtype)
    path = save_converted(a.out, cfg, params, tok, overwrite=a.overwrite)
  except SaveTargetError as e:
    raise ValueError(e.for_option("--overwrite")) from None
  print(f"wrote {path} ({cfg.architecture}, {cfg.num_layers} layers, {a.dtype}); use --model {path}")
  return 0


def _press_from_args(a):
  from adakv_jax.press import make_press

  if a.press not in PRESS_NAMES:
    raise ValueError(f"unknown press {a.press!r}; choose one of: {', '.join(PRESS_NAMES)}")
  overrides = {
    k: v
    for k, v in dict(
      budget=a.budget,
      compression_ratio=a.compression_ratio,
      window=a.window,
      kernel=a.kernel,
      pool=a.pool,
      floor_alpha=a.floor_alpha,
      floor_mode=a.floor_mode,
      gqa=a.gqa,
      granularity=a.granularity,
      chunk_score=a.chunk_score,
      backend=a.backend,
    ).items()
    if v is not None
  }
  if a.compression_ratio is not None:
    overrides["budget"] = None
  if a.press == "full":
    _refuse_compression_options(a)
    return None
  return make_press(a.press, **overrides)


def _refuse_compression_options(a) -> None:
  given = ["--" + name.replace("_", "-") for name in _COMPRESSION_OPTIONS if getattr(a, name) is not None]
  if given:
    verb, pronoun = ("has", "it") if len(given) == 1 else ("have", "them")
    raise ValueError(
      f"{', '.join(given)} {verb} no effect with --press full, which keeps the whole cache "
      f"(no compression); drop {pronoun} or choose a compressing press"
    )


def _read_prompt_file(name: str) -> str:
  try:
    data = Path(name).read_bytes()
  except OSError as e:
    raise ValueError(f"cannot read --prompt-file {name!r}: {e.strerror or e}") from None
  try:
    return data.decode("utf-8-sig")  # a leading byte-order mark is not part of the prompt
  except UnicodeDecodeError as e:
    raise ValueError(
      f"--prompt-file {name!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
      f"{e.start}); re-encode it, e.g. iconv -f latin1 -t utf-8"
    ) from None


def _encode_prompt(tok, text: str, raw: bool, questions):
  """Token ids of the prompt and of each question (question-agnostic), with the chat template unless raw."""
  return tok.encode_chat(text, questions or (), raw=raw)


def _check_run_options(a) -> None:
  """Everything that can be refused before the model loads (which can take a minute)."""
  from pallas_kernels.paged_attention import check_page_size

  if a.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
  try:
    check_page_size(a.page_size)
  except ValueError as e:
    raise ValueError(f"--page-size: {e}") from None
  if a.show_positions and a.press == "full":
    raise ValueError("--show-positions lists the positions a press kept; --press full keeps all of them")


class _Streamer:
  """Prints the answer as decode loops hand tokens out: the new suffix of the decoded text."""

  def __init__(self, tok):
    self.tok, self.ids, self.shown = tok, [], ""

  def __call__(self, new_ids):
    self.ids.extend(new_ids[0])
    text = self.tok.decode(self.ids)
    if text.startswith(self.shown):
      print(text[len(self.shown) :], end="", flush=True)
      self.shown = text


def cmd_generate(a) -> int:
  from adakv_jax.checkpoints import load_model
  from adakv_jax.generation import Sampling, generate

  press_given = a.press is not None or any(getattr(a, n) is not None for n in _COMPRESSION_OPTIONS)
  a.press = "full" if a.press is None else a.press
  _check_context_options(a)
  if a.load_context is not None:
    return _answer_saved_context(a, press_given)
  text = a.prompt if a.prompt is not None else _read_prompt_file(a.prompt_file)
  if not text.strip():
    raise ValueError("the prompt is empty")
  sampling = Sampling(a.temperature, a.top_p)  # bad values are refused before the model loads
  _check_run_options(a)
  press = _press_from_args(a)
  if press is not None:
    press.check_page_size(a.page_size)
  if a.save_context is not None:
    return _save_context(a, text, press)
  cfg, params, tok = load_model(a.model, dtype=a.dtype)
  prompt_ids, question_ids = _encode_prompt(tok, text, a.raw, a.question)
  eos = tuple(tok.eos_token_ids) or cfg.eos_token_ids
  stream = _Streamer(tok) if not a.json and not a.question else None
  res = generate(
    params,
    cfg,
    [prompt_ids],
    max_new_tokens=a.max_new_tokens,
    press=press,
    sampling=sampling,
    eos_token_ids=eos,
    questions=question_ids or None,
    return_positions=a.show_positions,
    backend=a.backend,
    seed=a.seed,
    page_size=a.page_size,
    progress=not a.json and a.question is not None and sys.stderr.isatty(),
    on_tokens=stream,
  )
  return _report(a, tok, res, press, a.press, a.question, stream)


def _report(a, tok, res, press, press_name: str, questions, stream) -> int:
  out = {
    "model": a.model,
    "press": press_name,
    "press_config": dataclasses.asdict(press) if press is not None else None,
    "text": tok.decode(res.token_ids[0]),
    "token_ids": res.token_ids[0],
    "prompt_tokens": res.prompt_tokens[0],
    **res.memory(),
    "prefill_s": round(res.prefill_s, 4),
    "compile_s": round(res.compile_s, 4),
    "decode_tokens_per_s": round(res.decode_tokens_per_s, 3),
    "notes": res.notes,
  }
  if press is not None:
    out["budgets"] = res.budgets[:, 0, :].tolist()
    out["layer_totals"] = res.budgets[:, 0, :].sum(-1).tolist()
    out["retained_mass"] = [round(float(m), 6) for m in res.retained_mass[:, 0]]
  if res.positions is not None:
    out["positions"] = res.positions[:, 0].tolist()
  if res.answers is not None:
    out["answers"] = [
      {"question": q, "text": tok.decode(ans[0]), "token_ids": ans[0]}
      for q, ans in zip(questions, res.answers)
    ]
  if a.json:
    print(json.dumps(out))
    return 0
  for n in res.notes:
    print(f"note: {n}", file=sys.stderr)
  if res.answers is not None:
    for item in out["answers"]:
      print(f"Q: {item['question']}\nA: {item['text']}\n", flush=True)
  else:
    print(out["text"][len(stream.shown) :] if out["text"].startswith(stream.shown) else "", flush=True)
  mib = lambda x: f"{x / 2**20:.2f} MiB"
  saved = 1 - res.cache_bytes / res.full_cache_bytes
  print(
    f"[{res.prompt_tokens[0]} prompt tokens | cache {mib(res.cache_bytes)} allocated for "
    f"{mib(res.kept_bytes)} kept + {mib(res.decode_room_bytes)} decode room (padding overhead "
    f"{res.padding_overhead:.2f}x, {res.pages_used} pages of {res.page_size}) vs full cache "
    f"{mib(res.full_cache_bytes)}: {saved:.1%} saved | prefill {res.prefill_s:.2f}s | "
    f"{res.decode_tokens_per_s:.1f} tok/s]",
    file=sys.stderr,
  )
  return 0


def _check_context_options(a) -> None:
  """Saved-context flags that contradict each other or the rest of the command, before anything loads."""
  if a.save_context is not None and a.load_context is not None:
    raise ValueError("--save-context and --load-context exclude each other: save in one run, load in another")
  if a.overwrite and a.save_context is None:
    raise ValueError("--overwrite replaces a saved context: it needs --save-context DIR")
  if a.load_context is not None:
    if a.prompt is not None or a.prompt_file is not None:
      raise ValueError("--load-context DIR is the context: drop --prompt / --prompt-file")
    if not a.question:
      raise ValueError("--load-context needs at least one --question to answer from the saved context")
    if a.raw:
      raise ValueError(
        "--raw has no effect with --load-context: questions are encoded as the context was when it was saved"
      )
    return
  if a.prompt is None and a.prompt_file is None:
    raise ValueError("one of --prompt / --prompt-file is required (or --load-context DIR with --question)")
  if a.save_context is not None:
    if a.question:
      raise ValueError(
        "--save-context compresses the prompt alone and exits; ask the questions later with "
        "--load-context DIR --question ..."
      )
    if a.show_positions:
      raise ValueError("--show-positions has no effect with --save-context (the positions are saved)")


def _save_context(a, text: str, press) -> int:
  from adakv_jax.checkpoints import SaveTargetError, load_model, save_context
  from adakv_jax.checkpoints.contexts import check_context_target, saved_bytes
  from adakv_jax.generation import compress_context

  try:
    check_context_target(a.save_context, a.overwrite)  # before the model loads
  except SaveTargetError as e:
    raise ValueError(e.for_option("--overwrite")) from None
  cfg, params, tok = load_model(a.model, dtype=a.dtype)
  # as a question-agnostic run encodes its context: the user turn left open for the questions
  prompt_ids, _ = _encode_prompt(tok, text, a.raw, ("",))
  ctx = compress_context(params, cfg, [prompt_ids], press=press, seed=a.seed, page_size=a.page_size)
  ctx.meta.update(raw=bool(a.raw), model=str(a.model))
  path = save_context(a.save_context, ctx, cfg=cfg, params=params, tokenizer=tok, overwrite=a.overwrite)
  out = {
    "saved_context": str(path),
    "model": a.model,
    "press": a.press,
    "press_config": dataclasses.asdict(press) if press is not None else None,
    "prompt_tokens": ctx.prompt_lens[0],
    "kept_bytes": ctx.cache.kept_bytes(),
    "saved_bytes": saved_bytes(path),
    "prefill_s": round(ctx.prefill_s, 4),
    "notes": (press.check_prompt(ctx.prompt_lens) if press is not None else []),
  }
  if a.json:
    print(json.dumps(out))
  else:
    mib = lambda x: f"{x / 2**20:.2f} MiB"
    print(
      f"saved the compressed context of {out['prompt_tokens']} prompt tokens to {path}: "
      f"{mib(out['saved_bytes'])} on disk for {mib(out['kept_bytes'])} of kept entries; answer with "
      f"--load-context {path} --question ..."
    )
  return 0


def _answer_saved_context(a, press_given: bool) -> int:
  from adakv_jax.checkpoints import load_context, load_model
  from adakv_jax.checkpoints.contexts import read_context_marker
  from adakv_jax.generation import Sampling, answer_questions
  from adakv_jax.press import press_label

  sampling = Sampling(a.temperature, a.top_p)
  if a.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
  read_context_marker(a.load_context)  # not a saved context: refused before the model loads
  press = _press_from_args(a) if press_given else None
  cfg, params, tok = load_model(a.model, dtype=a.dtype)
  kw = dict(press=press) if press_given else {}
  ctx = load_context(a.load_context, cfg=cfg, params=params, tokenizer=tok, **kw)
  _, question_ids = _encode_prompt(tok, "", bool(ctx.meta.get("raw")), a.question)
  eos = tuple(tok.eos_token_ids) or cfg.eos_token_ids
  res = answer_questions(
    params,
    cfg,
    ctx,
    question_ids,
    max_new_tokens=a.max_new_tokens,
    sampling=sampling,
    eos_token_ids=eos,
    backend=a.backend,
    seed=a.seed,
  )
  if not a.show_positions:
    res.positions = None
  return _report(a, tok, res, ctx.press, press_label(ctx.press), a.question, None)


def main(argv=None) -> int:
  from adakv_jax.cache import CacheCapacityError

  a = _parser().parse_args(argv)
  try:
    if a.command == "generate":
      return cmd_generate(a)
    if a.command == "convert":
      return cmd_convert(a)
  except (ValueError, TypeError, OSError, CacheCapacityError) as e:  # our errors carry the explanation
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 1


if __name__ == "__main__":
  sys.exit(main())
