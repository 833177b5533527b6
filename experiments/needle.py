"""Pass-key retrieval: a 5-digit key hidden at depths 10/50/90% of filler, asked at the end, over prompt
lengths (a context x depth heatmap per press), token- and page-granular selection side by side.

Question-aware (the question closes the prompt), chat template, greedy 12 tokens (the model answers
"The pass key is NNNNN", 10 tokens, so 8 would cut the key off); a trial succeeds when
the key's digits appear in the answer. ADAKV_SPEC 7 warns that on a 135M model this is a cliff, not a
gradient, so beside accuracy each configuration records how many (layer, KV-head) pairs kept every digit
token of the key (of both mentions, and of at least one mention) -- the mechanism behind a lost key --
and the memory each cache allocates. One capture per prompt length serves every press; every adaptive
press is compared with its uniform press on the same trials (McNemar's exact test, pooled over depths and
lengths), and page granularity with token granularity.

    python -m experiments.needle                                   # SmolLM2, 1K tokens, ~3 min
    python -m experiments.needle --contexts 1024 2048 4096 8000    # the heatmap (8192 - the answer)
    python -m experiments.needle --model qwen2.5-coder-0.5b --contexts 1024 2048 4096
    python -m experiments.needle --quick
"""

from __future__ import annotations

import argparse
import random

import numpy as np
from tqdm import tqdm

from adakv_jax.cache import DEFAULT_PAGE_SIZE
from adakv_jax.press import make_press
from experiments import common
from experiments.metrics import mcnemar

PRESSES = ("full", "snapkv", "ada-snapkv", "pyramidkv", "ada-pyramidkv")
UNIFORM_OF = {"ada-snapkv": "snapkv", "ada-pyramidkv": "pyramidkv"}
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? Answer with the 5-digit number only."


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  p.add_argument("--model", default=common.MODEL)
  p.add_argument("--contexts", type=int, nargs="+", default=[1024], help="prompt lengths in tokens")
  p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
  p.add_argument("--keys", type=int, default=5, help="pass keys per depth (the same keys at every length)")
  p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
  p.add_argument("--presses", nargs="+", default=list(PRESSES))
  p.add_argument("--granularities", nargs="+", choices=("token", "page"), default=["token", "page"])
  p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="entries per cache page")
  p.add_argument("--new-tokens", type=int, default=12, help='the answer "The pass key is NNNNN" takes 10')
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="results/<out>.json / .png; default needle[_<model>]")
  a = p.parse_args()
  if a.quick:
    a.contexts, a.depths, a.keys, a.budgets, a.presses = (
      [256],
      [0.5],
      2,
      [64],
      ["full", "snapkv", "ada-snapkv"],
    )
  if a.out is None:
    a.out = "needle" if a.model == common.MODEL else f"needle_{a.model}"
  return a


def label(press: str, granularity: str, budget) -> str:
  return press if budget is None else f"{press}{'/page' if granularity == 'page' else ''}@{budget}"


def cut_at_sentence(text: str, depth: float) -> int:
  """Character index of the sentence end nearest to depth * len(text)."""
  target = int(depth * len(text))
  ends = [i + 1 for i, c in enumerate(text) if c in ".\n" and (i + 1 == len(text) or text[i + 1] in " \n")]
  return min(ends, key=lambda i: abs(i - target)) if ends else target


def build_trial(tok, filler: str, depth: float, key: str):
  """Prompt ids and the positions of the key's digit tokens, per mention."""
  head, tail = tok.chat_split()
  cut = cut_at_sentence(filler, depth)
  before = tok.encode(head + filler[:cut], add_special_tokens=False)
  needle = tok.encode(NEEDLE.format(key=key), add_special_tokens=False)
  after = tok.encode(filler[cut:] + "\n\n" + QUESTION + tail, add_special_tokens=False)
  digits = [len(before) + i for i, t in enumerate(needle) if tok.decode([t]).strip().isdigit()]
  half = len(digits) // 2  # the key is mentioned twice
  return {
    "ids": before + needle + after,
    "key": key,
    "depth": depth,
    "key_positions": digits,
    "mentions": [digits[:half], digits[half:]],
    "depth_actual": len(before) / (len(before) + len(needle) + len(after)),
  }


def key_kept(positions_NBHC: np.ndarray, trials) -> tuple[np.ndarray, np.ndarray]:
  """Per trial, the fraction of (layer, head) pairs that keep every key token of both mentions, and of
  at least one complete mention."""
  both, one = [], []
  for b, t in enumerate(trials):
    full = [common.span_kept_LH(positions_NBHC[:, b], m) for m in t["mentions"]]
    both.append(float((full[0] & full[1]).mean()))
    one.append(float((full[0] | full[1]).mean()))
  return np.asarray(both), np.asarray(one)


def run_config(params, cfg, tok, cap, plan, trials, press, a, eos):
  """Answers, per-trial results and the cache's memory of one press configuration."""
  cache, info, mem = common.compress(cfg, cap, press, plan)
  if press is None:
    kept = one = np.ones(len(trials))
  else:
    kept, one = key_kept(np.asarray(info["positions"]), trials)
  answers = common.decode(
    params, cfg, common.greedy_first(cap.logits_BV), cache, max_new_tokens=a.new_tokens, eos_ids=eos
  )
  out = []
  for t, ids, k, k1 in zip(trials, answers, kept, one):
    text = tok.decode(ids)
    out.append(
      {
        "key": t["key"],
        "depth": t["depth"],
        "prompt_tokens": len(t["ids"]),
        "answer": text,
        "success": t["key"] in text.replace(" ", ""),
        "key_kept_layer_head_fraction": float(k),
        "one_mention_kept_layer_head_fraction": float(k1),
      }
    )
  return out, mem


def summarise(config, results, depths, mem):
  row = {
    **config,
    "label": label(config["press"], config["granularity"], config["budget"]),
    "n": len(results),
    "accuracy": float(np.mean([r["success"] for r in results])),
    "key_kept_layer_head_fraction": float(np.mean([r["key_kept_layer_head_fraction"] for r in results])),
    "one_mention_kept_layer_head_fraction": float(
      np.mean([r["one_mention_kept_layer_head_fraction"] for r in results])
    ),
  }
  for d in depths:
    row[f"acc@{d:g}"] = float(np.mean([r["success"] for r in results if r["depth"] == d]))
  row.update(mem, allocated_mib=mem["allocated_bytes"] / 2**20)
  return row


def comparisons(details, contexts) -> list[dict]:
  """Paired tests on the same trials: each adaptive press against its uniform press (same budget and
  granularity), and page against token granularity (same press and budget); per prompt length and pooled
  over all lengths. McNemar's exact test on the discordant trials; allocated bytes beside."""
  by = {(d["context"], d["press"], d["granularity"], d["budget"]): d for d in details}
  pairs = []
  for (ctx, press, gran, budget), d in by.items():
    if press in UNIFORM_OF and (ctx, UNIFORM_OF[press], gran, budget) in by:
      pairs.append(("adaptive vs uniform", d, by[(ctx, UNIFORM_OF[press], gran, budget)]))
    if gran == "page" and (ctx, press, "token", budget) in by:
      pairs.append(("page vs token", d, by[(ctx, press, "token", budget)]))
  rows = []
  groups: dict[tuple, list] = {}
  for kind, x, y in pairs:
    key = (kind, x["press"], x["granularity"], y["press"], y["granularity"], x["budget"])
    groups.setdefault(key, []).append((x, y))
  for (kind, px, gx, py, gy, budget), members in sorted(groups.items(), key=str):
    for ctx in [*contexts, "all"]:
      sel = [(x, y) for x, y in members if ctx == "all" or x["context"] == ctx]
      if not sel or (ctx == "all" and len(contexts) == 1):
        continue
      a = [t["success"] for x, _ in sel for t in x["trials"]]
      b = [t["success"] for _, y in sel for t in y["trials"]]
      rows.append(
        {
          "kind": kind,
          "context": ctx,
          "a": label(px, gx, budget),
          "b": label(py, gy, budget),
          **mcnemar(a, b),
          "allocated_ratio_a_over_b": round(
            sum(x["memory"]["allocated_bytes"] for x, _ in sel)
            / sum(y["memory"]["allocated_bytes"] for _, y in sel),
            4,
          ),
        }
      )
  return rows


def plot(rows, depths, contexts, name, n_keys, model):
  plt = common.pyplot()
  labels = list(dict.fromkeys(r["label"] for r in rows))
  cell = {(r["label"], r["context"]): r for r in rows}
  cols = [(c, d) for c in contexts for d in depths]
  acc = np.array(
    [[cell[(lab, c)][f"acc@{d:g}"] if (lab, c) in cell else np.nan for c, d in cols] for lab in labels]
  )
  fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(cols), 0.32 * len(labels) + 1.6))
  im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
  for (i, j), v in np.ndenumerate(acc):
    if not np.isnan(v):
      ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
  ax.set_xticks(range(len(cols)), [f"{c // 1024 if c >= 1024 else c / 1024:g}K\n{d:.0%}" for c, d in cols])
  ax.tick_params(axis="x", labelsize=7)
  for j in range(1, len(contexts)):
    ax.axvline(j * len(depths) - 0.5, color="k", lw=0.8)
  ax.set_yticks(range(len(labels)), labels, fontsize=7)
  ax.set_xlabel("prompt length / needle depth")
  fig.colorbar(im, ax=ax, fraction=0.04)
  ax.set_title(
    f"{model}: pass-key accuracy, {n_keys} keys per cell, question-aware (max-pool k=7, w=32, alpha=0.2)",
    fontsize=8,
  )
  fig.tight_layout()
  common.save_png(fig, name)


def main():
  a = parse_args()
  name = common.out_name(a.out, a.quick)
  if a.replot:
    d = common.read_json(name)
    return plot(d["rows"], a.depths, d["meta"]["contexts"], name, len(d["meta"]["keys"]), d["meta"]["model"])
  rng = random.Random(a.seed)
  keys = [str(rng.randrange(10000, 100000)) for _ in range(a.keys)]
  grid = [
    (p, g, b)
    for p in a.presses
    for g in (["token"] if p == "full" else a.granularities)
    for b in ([None] if p == "full" else a.budgets)
  ]
  presses = {c: None if c[0] == "full" else make_press(c[0], granularity=c[1], budget=c[2]) for c in grid}
  colsum = any(press is not None and press.needs_colsum for press in presses.values())
  rows, details, prompt_tokens = [], [], {}
  with common.Timer() as total:
    cfg, params, tok = common.load(a.model)
    eos = tuple(tok.eos_token_ids) or tuple(cfg.eos_token_ids)
    overhead = len(build_trial(tok, "", 0.5, keys[0])["ids"])
    for ctx in a.contexts:  # every length is checked before any prefill
      if ctx <= overhead or ctx + a.new_tokens > cfg.max_position_embeddings:
        raise SystemExit(
          f"--contexts {ctx}: a prompt needs more than the {overhead} tokens of needle and question, and "
          f"with {a.new_tokens} new tokens at most {cfg.max_position_embeddings} ({a.model}'s context)"
        )
    for ctx in a.contexts:
      filler = common.context_text(tok, ctx - overhead, start=len(common.topics()) // 2)
      trials = [build_trial(tok, filler, d, k) for d in a.depths for k in keys]
      prompt_tokens[ctx] = [len(t["ids"]) for t in trials]
      cap = common.capture(params, cfg, [t["ids"] for t in trials], window=32, with_colsum=colsum)
      plan = common.fitting_plan(
        cfg, [cap.lens], list(presses.values()), room=a.new_tokens, page_size=a.page_size
      )
      for pname, gran, budget in tqdm(grid, desc=f"needle {ctx}"):
        press = presses[(pname, gran, budget)]
        res, mem = run_config(params, cfg, tok, cap, plan, trials, press, a, eos)
        config = {"context": ctx, "press": pname, "granularity": gran, "budget": budget}
        rows.append(summarise(config, res, a.depths, mem))
        details.append({**config, "memory": mem, "trials": res})
      del cap
  tests = comparisons(details, a.contexts)
  payload = {
    "meta": common.run_meta(
      a,
      model=a.model,
      wall_s=round(total.s, 1),
      needle=NEEDLE,
      question=QUESTION,
      keys=keys,
      contexts=a.contexts,
      prompt_tokens=prompt_tokens,
      success="the key's 5 digits appear in the greedy answer (spaces removed); greedy decoding stops at EOS",
      comparisons="McNemar's exact two-sided test on the trials where exactly one of the pair succeeds",
    ),
    "rows": rows,
    "comparisons": tests,
    "details": details,
  }
  common.write_json(name, payload)
  plot(rows, a.depths, a.contexts, name, len(keys), a.model)
  common.print_table(
    rows,
    [
      "context",
      "label",
      "accuracy",
      *[f"acc@{d:g}" for d in a.depths],
      "key_kept_layer_head_fraction",
      "allocated_mib",
      "padding_overhead",
    ],
  )
  common.print_table(
    tests, ["kind", "context", "a", "b", "n", "a_correct", "b_correct", "a_only", "b_only", "p_value"]
  )
  print(f"total {total.s:.0f}s")


if __name__ == "__main__":
  main()
