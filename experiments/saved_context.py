"""A saved compressed context against re-prefilling the document, for several questions.

    python -m experiments.saved_context [--tokens 3000] [--reps 3] [--budget 128]

Per repetition, on the embedded SmolLM2-135M (float32, CPU): (a) prefill + compress the document
(`compress_context`), (b) save it (`save_context`), (c) restore it (`load_context`: read, check the model's
fingerprint, lay the pages out again), then answer the same questions from (a) and from (c). Every
function is compiled by a warm-up round first, so the times are run times. The answers from the restored
context must equal the ones from the fresh one. Writes experiments/results/saved_context.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

import adakv_jax as ak
from adakv_jax.checkpoints.contexts import saved_bytes

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = (
  "What is this text about?",
  "Which statement does the text describe first?",
  "Give one keyword of the Python language that the text mentions.",
)


def document(tok, tokens: int) -> str:
  """Deterministic English text of about `tokens` tokens: the stdlib's documentation topics in order."""
  from pydoc_data.topics import topics

  parts, n = [], 0
  for key in sorted(topics):
    parts.append(topics[key])
    n += len(tok.encode(topics[key], add_special_tokens=False))
    if n >= tokens:
      break
  text = "\n\n".join(parts)
  ids = tok.encode(text, add_special_tokens=False)[:tokens]
  return tok.decode(ids)


def timed(fn):
  t0 = time.perf_counter()
  out = fn()
  if hasattr(out, "cache"):
    jax.block_until_ready(out.cache)
  return out, time.perf_counter() - t0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=3000, help="document length in tokens")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--budget", type=int, default=128)
  p.add_argument("--max-new-tokens", type=int, default=24)
  p.add_argument("--out", default=str(RESULTS / "saved_context.json"))
  a = p.parse_args(argv)

  cfg, params, tok = ak.load_model("smollm2-135m")
  press = ak.make_press("ada-snapkv", budget=a.budget)
  ctx_ids, q_ids = tok.encode_chat(document(tok, a.tokens), QUESTIONS)
  eos = tuple(tok.eos_token_ids) or cfg.eos_token_ids
  answer = lambda ctx: ak.answer_questions(
    params,
    cfg,
    ctx,
    q_ids,
    max_new_tokens=a.max_new_tokens,
    eos_token_ids=eos,
  )
  reps = []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(a.reps + 1):  # round 0 compiles everything
      ctx, t_prefill = timed(lambda: ak.compress_context(params, cfg, [ctx_ids], press=press))
      path, t_save = timed(
        lambda: ak.save_context(Path(tmp) / f"ctx{r}", ctx, cfg=cfg, params=params, tokenizer=tok)
      )
      restored, t_restore = timed(lambda: ak.load_context(path, cfg=cfg, params=params, tokenizer=tok))
      fresh, t_answer_fresh = timed(lambda: answer(ctx))
      again, t_answer_restored = timed(lambda: answer(restored))
      if again.answers != fresh.answers:
        raise AssertionError("the restored context answered differently from the fresh one")
      row = dict(
        prefill_compress_s=t_prefill,
        prefill_run_s=ctx.prefill_s,
        save_s=t_save,
        restore_s=t_restore,
        answer_s_fresh=t_answer_fresh,
        answer_s_restored=t_answer_restored,
        saved_bytes=saved_bytes(path),
        kept_bytes=restored.cache.kept_bytes(),
      )
      if r:
        reps.append(row)
      print(
        f"rep {r}{' (compile)' if r == 0 else ''}: "
        + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
        flush=True,
      )

  med = {k: statistics.median(row[k] for row in reps) for k in reps[0]}
  out = {
    "what": "prefill + compress a long document vs restore its saved compressed context (run times, "
    "compiled in a warm-up round); both then answer the same questions",
    "model": "smollm2-135m",
    "dtype": cfg.dtype,
    "device": jax.devices()[0].device_kind,
    "machine": platform.machine(),
    "press": dataclasses.asdict(press),
    "document_tokens": len(ctx_ids),
    "questions": list(QUESTIONS),
    "max_new_tokens": a.max_new_tokens,
    "repetitions": reps,
    "median": med,
    "restore_speedup": med["prefill_compress_s"] / med["restore_s"],
    "first_answers_s": {
      "re_prefill": med["prefill_compress_s"] + med["answer_s_fresh"],
      "restored": med["restore_s"] + med["answer_s_restored"],
    },
    "saved_over_kept_bytes": med["saved_bytes"] / med["kept_bytes"],
    "answers_equal": True,
    "answers": [tok.decode(ans[0]) for ans in fresh.answers],
  }
  Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
  print(
    f"prefill+compress {med['prefill_compress_s']:.2f}s vs restore {med['restore_s']:.2f}s "
    f"({out['restore_speedup']:.1f}x); saved {med['saved_bytes'] / 2**20:.2f} MiB for "
    f"{med['kept_bytes'] / 2**20:.2f} MiB kept ({out['saved_over_kept_bytes']:.3f}x) -> {a.out}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
