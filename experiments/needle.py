"""Pass-key retrieval: a 5-digit key hidden at depths 10/50/90% of ~1K tokens of filler, asked at the end.

Question-aware (the question closes the prompt), chat template, greedy 12 tokens (the model answers
"The pass key is NNNNN", 10 tokens, so 8 would cut the key off); a trial succeeds when
the key's digits appear in the answer. ADAKV_SPEC 7 warns that on a 135M model this is a cliff, not a
gradient, so beside accuracy each configuration records how many (layer, KV-head) pairs kept every digit
token of the key (of both mentions, and of at least one mention) -- the mechanism behind a lost key --
and the memory each cache allocates. One capture of all trials serves every press.

    python -m experiments.needle           # ~1.5-3 min on 2 shared CPU cores
    python -m experiments.needle --quick
"""

from __future__ import annotations

import argparse
import random

import numpy as np
from tqdm import tqdm

from experiments import common

PRESSES = ("full", "snapkv", "ada-snapkv", "pyramidkv", "ada-pyramidkv")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? Answer with the 5-digit number only."


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  p.add_argument("--filler-tokens", type=int, default=930, help="filler tokens (the prompt fits 1024)")
  p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
  p.add_argument("--keys", type=int, default=5, help="pass keys per depth")
  p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
  p.add_argument("--presses", nargs="+", default=list(PRESSES))
  p.add_argument("--new-tokens", type=int, default=12, help='the answer "The pass key is NNNNN" takes 10')
  p.add_argument("--seed", type=int, default=0)
  common.add_press_args(p)
  a = p.parse_args()
  if a.quick:
    a.filler_tokens, a.depths, a.keys, a.budgets, a.presses = 200, [0.5], 2, [64], ["full", "ada-snapkv"]
  return a


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
    kept = positions_NBHC[:, b]  # [layers, heads, capacity]
    has = {p: (kept == p).any(axis=-1) for p in t["key_positions"]}
    full = [np.all([has[p] for p in m], axis=0) for m in t["mentions"]]
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
        "answer": text,
        "success": t["key"] in text.replace(" ", ""),
        "key_kept_layer_head_fraction": float(k),
        "one_mention_kept_layer_head_fraction": float(k1),
      }
    )
  return out, mem


def summarise(pname, budget, results, depths, mem):
  row = {
    "press": pname,
    "budget": budget if pname != "full" else None,
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


def plot(rows, depths, name, n_keys, prompt_tokens):
  plt = common.pyplot()
  labels = [r["press"] + ("" if r["budget"] is None else f"@{r['budget']}") for r in rows]
  acc = np.array([[r[f"acc@{d:g}"] for d in depths] for r in rows])
  kept = np.array(
    [[r["key_kept_layer_head_fraction"], r["one_mention_kept_layer_head_fraction"]] for r in rows]
  )
  fig, (ax, ax2) = plt.subplots(
    1, 2, figsize=(9, 0.45 * len(rows) + 2), gridspec_kw={"width_ratios": [len(depths), 2]}
  )
  im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
  for (i, j), v in np.ndenumerate(acc):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9)
  ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
  ax.set_yticks(range(len(labels)), labels)
  ax.set_xlabel("needle depth")
  ax.set_title(f"pass-key accuracy ({n_keys} keys per cell)", fontsize=10)
  fig.colorbar(im, ax=ax, fraction=0.05)
  ax2.imshow(kept, cmap="Blues", vmin=0, vmax=1, aspect="auto")
  for (i, j), v in np.ndenumerate(kept):
    ax2.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9, color="w" if v > 0.5 else "k")
  ax2.set_xticks([0, 1], ["both\nmentions", "one\nmention"])
  ax2.set_title("(layer, head) pairs keeping\nevery digit of the key", fontsize=9)
  ax2.set_yticks([])
  fig.suptitle(
    f"SmolLM2-135M-Instruct, {min(prompt_tokens)}-{max(prompt_tokens)}-token prompts, "
    "question-aware (max-pool k=7, w=32, alpha=0.2)",
    fontsize=9,
  )
  fig.tight_layout()
  common.save_png(fig, name)


def main():
  a = parse_args()
  name = common.out_name("needle", a.quick)
  if a.replot:
    d = common.read_json(name)
    return plot(d["rows"], a.depths, name, len(d["meta"]["keys"]), d["meta"]["prompt_tokens"])
  rng = random.Random(a.seed)
  with common.Timer() as total:
    cfg, params, tok = common.load()
    filler = common.context_text(tok, a.filler_tokens, start=len(common.topics()) // 2)
    keys = [str(rng.randrange(10000, 100000)) for _ in range(a.keys)]
    trials = [build_trial(tok, filler, d, k) for d in a.depths for k in keys]
    eos = tuple(tok.eos_token_ids) or tuple(cfg.eos_token_ids)
    grid = [(p, b) for p in a.presses for b in ([None] if p == "full" else a.budgets)]
    presses = {(p, b): common.build_press(p, a, **({} if b is None else {"budget": b})) for p, b in grid}
    colsum = any(press is not None and press.needs_colsum for press in presses.values())
    cap = common.capture(params, cfg, [t["ids"] for t in trials], window=32, with_colsum=colsum)
    plan = common.fitting_plan(
      cfg, [cap.lens], list(presses.values()), room=a.new_tokens, page_size=a.page_size
    )
    rows, details = [], []
    for pname, budget in tqdm(grid, desc="needle"):
      res, mem = run_config(params, cfg, tok, cap, plan, trials, presses[(pname, budget)], a, eos)
      rows.append(summarise(pname, budget, res, a.depths, mem))
      details.append({"press": pname, "budget": budget, "trials": res})
  payload = {
    "meta": common.run_meta(
      a,
      wall_s=round(total.s, 1),
      needle=NEEDLE,
      question=QUESTION,
      keys=keys,
      prompt_tokens=[len(t["ids"]) for t in trials],
      depth_actual=[round(t["depth_actual"], 3) for t in trials],
      success="the key's 5 digits appear in the greedy answer (spaces removed); greedy decoding stops at EOS",
    ),
    "rows": rows,
    "details": details,
  }
  common.write_json(name, payload)
  plot(rows, a.depths, name, len(keys), payload["meta"]["prompt_tokens"])
  common.print_table(
    rows,
    [
      "press",
      "budget",
      "accuracy",
      *[f"acc@{d:g}" for d in a.depths],
      "key_kept_layer_head_fraction",
      "one_mention_kept_layer_head_fraction",
      "allocated_mib",
      "padding_overhead",
    ],
  )
  print(f"total {total.s:.0f}s")


if __name__ == "__main__":
  main()
