"""Fidelity of compressed caches against the full cache (ADAKV_SPEC 7), question-aware and -agnostic.

For each context (chat template; a question closes the user turn) the full cache's greedy continuation
y_1..y_M is teacher-forced through every compressed cache with one multi-token `append(all_logits=True)`:
  - question-aware: prefill context + question, compress, append y_1..y_M;
  - question-agnostic: prefill the context alone, compress, append question + y_1..y_M.
The full cache goes through the same path. Reported over the M next-token distributions after y_1..y_M
(positions after an EOS of the reference are dropped): mean KL(full || compressed), greedy top-1
agreement, and the mean retained attention mass of the window queries (press info, mean over layers).
Agnostic mode also reports the first answer token (after the question), which aware mode gets exactly.
Per layer, the relative L2 error of the window queries' attention output over the kept keys against all
keys (the quantity ADAKV_SPEC 2 bounds) is reported too, and each cache's memory (allocated, kept, decode
room), so that presses can also be compared at equal allocated bytes: within a run, each adaptive press
against its uniform one at the same budget (`comparisons`); across runs on the same contexts (`--against
NAME ...`, e.g. query- against KV-head budgets), each row against the other run's row of the same press
that allocates the nearest bytes (`against`, by run name).

One capture per mode serves every press (common.capture / common.compress).

    python -m experiments.fidelity           # ~5-6.5 min on 2 shared CPU cores
    python -m experiments.fidelity --quick   # smoke run
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from adakv_jax import model as model_lib
from adakv_jax.generation import pad_rows
from adakv_jax.press import PRESETS
from experiments import common, metrics

PRESSES = tuple(name for name in PRESETS if name != "full")
# open questions, so that the reference answer rarely ends (EOS) before M tokens
QUESTIONS = (
  "Explain in detail what the text above says.",
  "Describe the main ideas of the text above in a few sentences.",
  "Which Python keywords or statements does the text above describe? Explain each one.",
  "Summarise the text above for a beginner, step by step.",
)
MODES = ("aware", "agnostic")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny smoke run")
  p.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
  p.add_argument(
    "--against",
    nargs="+",
    default=None,
    help="results/<name>.json of runs on the same contexts: compare each row with its press's row there "
    "that allocates the nearest bytes (with --replot: add the comparisons to an existing run)",
  )
  p.add_argument("--model", default=common.MODEL)
  p.add_argument("--contexts", type=int, default=4)
  p.add_argument("--ctx-tokens", type=int, default=960, help="context tokens (the prompt fits 1024)")
  p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256])
  p.add_argument("--presses", nargs="+", default=list(PRESSES))
  p.add_argument("--new-tokens", type=int, default=32, help="M: teacher-forced continuation length")
  p.add_argument("--pool", choices=("max", "avg"), default="max", help="pooling of the SnapKV-family scores")
  p.add_argument("--kernel", type=int, default=7, help="pooling kernel of the SnapKV-family scores")
  common.add_press_args(p, gqa=True)
  p.add_argument(
    "--out", default=None, help="results/<out>.json / .png; default fidelity[_<model>][_gqa-query]"
  )
  return p


def parse_args():
  a = parser().parse_args()
  if a.quick:
    a.contexts, a.ctx_tokens, a.budgets, a.presses, a.new_tokens = 1, 200, [64], ["snapkv", "ada-snapkv"], 8
  if a.out is None:
    a.out = "fidelity" if a.model == common.MODEL else f"fidelity_{a.model}"
    a.out += "_gqa-query" if a.gqa == "query" else ""
  return a


def pooling(pname: str, a) -> dict:
  """--pool/--kernel apply to the SnapKV-family presses (the others' presets do not pool: kernel 1)."""
  return dict(pool=a.pool, kernel=a.kernel) if "snapkv" in pname or "pyramidkv" in pname else {}


def build_contexts(tok, n: int, n_tokens: int):
  """n contexts from evenly spaced start topics, each with its own question."""
  count = len(common.topics())
  out = []
  for i in range(n):
    text = common.context_text(tok, n_tokens, start=i * count // max(n, 1))
    ctx, (q,) = tok.encode_chat(text, [QUESTIONS[i % len(QUESTIONS)]])
    out.append({"ctx": ctx, "q": q, "question": QUESTIONS[i % len(QUESTIONS)], "preview": text[:120]})
  return out


@jax.jit
def attention_output_error(layers, positions_NBKC, len_B):
  """Per layer: relative L2 error of the window queries' attention output over the kept keys (softmax
  renormalised over them) against all keys, mean over sequences, query heads and window queries.
  layers: a capture's model.LayerOutputs (q_win [N, B, H, W, D], k/v [N, B, K, L, D]); positions of
  KV-head or query-head caches (gqa="query": each query head keeps its own keys)."""
  q, k, v = layers.q_win_BHWD, layers.k_BKLD, layers.v_BKLD
  n, b, h, w, d = q.shape
  kh, l = k.shape[2], k.shape[3]
  idx = jnp.where(positions_NBKC >= 0, positions_NBKC, l).reshape(-1, positions_NBKC.shape[-1])
  per_kv = positions_NBKC.shape[2] // kh  # cache heads per KV head: 1, or the group for gqa="query"
  keep = jax.vmap(lambda i: jnp.zeros(l + 1, bool).at[i].set(True))(idx)[:, :l].reshape(
    n, b, kh, per_kv, 1, l
  )
  s = jnp.einsum("nbkgwd,nbkld->nbkgwl", q.reshape(n, b, kh, h // kh, w, d), k) / jnp.sqrt(jnp.float32(d))
  qpos_BW = len_B[:, None] - w + jnp.arange(w)[None, :]
  ok = (jnp.arange(l)[None, None, :] <= qpos_BW[:, :, None])[None, :, None, None]  # [1, B, 1, 1, W, L]

  def out(mask):
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("nbkgwl,nbkld->nbkgwd", p, v)

  o_full, o_comp = out(ok), out(ok & keep)
  err = jnp.linalg.norm(o_comp - o_full, axis=-1) / jnp.maximum(jnp.linalg.norm(o_full, axis=-1), 1e-9)
  return jnp.mean(err, axis=(1, 2, 3, 4))


@jax.jit
def kl_and_agree(full_BTV, comp_BTV):
  """Per position KL(full || comp) and whether the argmaxes agree."""
  lp = jax.nn.log_softmax(full_BTV, axis=-1)
  lq = jax.nn.log_softmax(comp_BTV, axis=-1)
  kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)
  return kl, jnp.argmax(full_BTV, -1) == jnp.argmax(comp_BTV, -1)


def append_tokens(mode: str, items, ys):
  """Tokens to append per sequence, right-padded: (tokens [B, T], n_valid [B], offset of y_1's logits)."""
  rows = [y if mode == "aware" else it["q"] + y for it, y in zip(items, ys)]
  first = [0 if mode == "aware" else len(it["q"]) for it in items]  # index of y_1 in the row
  return jnp.asarray(pad_rows(rows)), jnp.asarray([len(r) for r in rows], jnp.int32), first


def teacher_force(params, cfg, cache, toks, n_valid, first, m: int):
  """Logits after y_1..y_M [B, M, V] and, where a question precedes y_1, the logits after it [B, V]."""
  logits, _ = model_lib.append(params, toks, n_valid, cache, cfg=cfg, backend=common.BACKEND, all_logits=True)
  idx = jnp.asarray(first)[:, None] + jnp.arange(m)[None, :]
  after_y = jnp.take_along_axis(logits, idx[:, :, None], axis=1)
  before = jnp.take_along_axis(logits, jnp.maximum(jnp.asarray(first) - 1, 0)[:, None, None], axis=1)[:, 0]
  return after_y, before


def eos_mask(ys, eos) -> np.ndarray:
  """valid[b, j]: the distribution after y_{j+1} counts iff no EOS among y_1..y_{j+1}."""
  return np.array([[not any(t in eos for t in y[: j + 1]) for j in range(len(y))] for y in ys])


def capture_mode(params, cfg, mode, items, presses, m: int, page_size: int):
  """One capture of this mode's prompts (context + question, or the context alone) and the one plan that
  fits every press's cache of them, with room for what gets appended (question and y_1..y_M)."""
  prompts = [it["ctx"] + it["q"] if mode == "aware" else it["ctx"] for it in items]
  colsum = any(press is not None and press.needs_colsum for press in presses)
  cap = common.capture(params, cfg, prompts, window=32, with_colsum=colsum)
  room = m + (max(len(it["q"]) for it in items) if mode == "agnostic" else 0)
  return {
    "cap": cap,
    "plan": common.fitting_plan(cfg, [cap.lens], [None, *presses], room=room, page_size=page_size),
  }


def add_reference(params, cfg, st, mode, items, ys, m):
  """The full-cache reference logits of this mode, through the same append path as the presses."""
  toks, n_valid, first = append_tokens(mode, items, ys)
  full, _, _ = common.compress(cfg, st["cap"], None, st["plan"])
  ref_y, ref_first = teacher_force(params, cfg, full, toks, n_valid, first, m)
  st.update(toks=toks, n_valid=n_valid, first=first, ref_y=ref_y, ref_first=ref_first)
  return st


def evaluate(params, cfg, st, press, mode, m, valid):
  """Metrics of one press against the full reference of this mode."""
  cap = st["cap"]
  cache, info, mem = common.compress(cfg, cap, press, st["plan"])
  attn_err = np.asarray(attention_output_error(cap.layers, info["positions"], cap.len_B))
  kept = np.asarray(info["budgets"]).sum(axis=(0, 2))  # per sequence, over layers and heads
  mass = np.asarray(info["retained_mass"])  # [layers, B]
  y, fst = teacher_force(params, cfg, cache, st["toks"], st["n_valid"], st["first"], m)
  kl, agree = (np.asarray(x) for x in kl_and_agree(st["ref_y"], y))
  kl0, agree0 = (np.asarray(x) for x in kl_and_agree(st["ref_first"][:, None], fst[:, None]))
  full_entries = np.asarray(cap.lens) * cfg.num_layers * cfg.num_kv_heads
  return {
    "kl_mean": float(kl[valid].mean()),
    "top1_agreement": float(agree[valid].mean()),
    "retained_mass": float(mass.mean()),
    "kl_first_token": float(kl0.mean()) if mode == "agnostic" else 0.0,
    "top1_first_token": float(agree0.mean()) if mode == "agnostic" else 1.0,
    "kept_fraction": float((kept / full_entries).mean()),
    **mem,
    "allocated_mib": mem["allocated_bytes"] / 2**20,
    "attn_out_rel_error": float(attn_err.mean()),
    "attn_out_rel_error_per_layer": [round(float(x), 5) for x in attn_err],
    "per_context": {
      "kl_mean": [float(kl[b][valid[b]].mean()) for b in range(len(kl))],
      "top1_agreement": [float(agree[b][valid[b]].mean()) for b in range(len(kl))],
      "retained_mass": mass.mean(axis=0).tolist(),
    },
  }


# (adaptive, uniform) pairs compared when both ran.
PAIRS = [("ada-snapkv", "snapkv"), ("ada-pyramidkv", "pyramidkv")]


def compare(rows: list[dict]) -> list[dict]:
  """Per (mode, budget) and pair: the per-context KL and top-1 differences (a - b) with their standard
  error and sign test, and the allocated bytes of a over b."""
  by = {(r["mode"], r["press"], r["budget"]): r for r in rows}
  out = []
  for (mode, pa, budget), ra in by.items():
    for a, b in PAIRS:
      rb = by.get((mode, b, budget))
      if pa != a or rb is None:
        continue
      out.append(
        {
          "mode": mode,
          "budget": budget,
          "a": a,
          "b": b,
          "kl": metrics.paired_differences(ra["per_context"]["kl_mean"], rb["per_context"]["kl_mean"]),
          "top1": metrics.paired_differences(
            ra["per_context"]["top1_agreement"], rb["per_context"]["top1_agreement"]
          ),
          "allocated_bytes_ratio": round(ra["allocated_bytes"] / rb["allocated_bytes"], 4),
        }
      )
  return out


# What makes two runs' contexts the same: the same token counts and the same reference continuation.
CONTEXT_IDENTITY = ("context_tokens", "question_tokens", "reference", "valid_positions")
# The settings a run can vary on the same contexts.
SETTINGS = ("model", "gqa", "granularity", "page_size", "pool", "kernel", "new_tokens")


def compare_runs(payload: dict, other: dict, other_name: str) -> dict:
  """Each row of this run against the row of the same mode and press in another run on the same contexts
  that allocates the nearest bytes (by ratio): the comparison at equal memory rather than equal budget,
  with the per-context KL and top-1 differences (a = this run) and the bytes of a over b."""
  ours, theirs = ([tuple(c[k] for k in CONTEXT_IDENTITY) for c in p["contexts"]] for p in (payload, other))
  common.require_same_trials(
    ours, theirs, "context", other_name, "the model, --contexts, --ctx-tokens or --new-tokens"
  )
  out = []
  for ra in payload["rows"]:
    same = [r for r in other["rows"] if (r["mode"], r["press"]) == (ra["mode"], ra["press"])]
    if not same:
      continue
    rb = min(same, key=lambda r: abs(math.log(r["allocated_bytes"] / ra["allocated_bytes"])))
    out.append(
      {
        "mode": ra["mode"],
        "press": ra["press"],
        "a_budget": ra["budget"],
        "b_budget": rb["budget"],
        "kl": metrics.paired_differences(ra["per_context"]["kl_mean"], rb["per_context"]["kl_mean"]),
        "top1": metrics.paired_differences(
          ra["per_context"]["top1_agreement"], rb["per_context"]["top1_agreement"]
        ),
        "a_allocated_mib": ra["allocated_mib"],
        "b_allocated_mib": rb["allocated_mib"],
        "allocated_bytes_ratio": round(ra["allocated_bytes"] / rb["allocated_bytes"], 4),
      }
    )
  defaults = vars(parser().parse_args([]))
  return {
    "run": other_name,
    "differs": common.settings_that_differ(
      payload["meta"]["args"], other["meta"]["args"], SETTINGS, defaults
    ),
    "comparisons": out,
  }


def print_against(against: dict) -> None:
  for name, run in against.items():
    print(f"\nagainst {name} ({run['differs']}), nearest allocated bytes:")
    for c in run["comparisons"]:
      kl = c["kl"]
      print(
        f"{c['mode']} {c['press']} @{c['a_budget']} ({c['a_allocated_mib']} MiB) vs @{c['b_budget']} "
        f"({c['b_allocated_mib']} MiB, {c['allocated_bytes_ratio']}x): KL {kl['mean']:+.4f} "
        f"(se {kl['se'] or 0:.4f}, lower in {kl['a_lower']}/{kl['n']}, higher in {kl['a_higher']}, "
        f"sign p = {kl['sign_p']:.3g})"
      )


def plot(rows, budgets, presses, name, pool="max", kernel=7, model=common.MODEL, ctx_tokens=960):
  """KL and agreement against the budget (top rows) and KL against allocated memory (bottom row)."""
  plt = common.pyplot()
  fig, axes = plt.subplots(3, 2, figsize=(12, 12))
  colors = plt.get_cmap("tab10")
  for col, mode in enumerate(MODES):
    for p in presses:
      rs = sorted((r for r in rows if r["mode"] == mode and r["press"] == p), key=lambda r: r["budget"])
      style = dict(color=colors(_family(p, presses)), ls="-" if p.startswith("ada-") else "--", marker="o")
      axes[0, col].plot([r["budget"] for r in rs], [r["kl_mean"] for r in rs], label=p, **style)
      axes[1, col].plot([r["budget"] for r in rs], [r["top1_agreement"] for r in rs], label=p, **style)
      if all("allocated_mib" in r for r in rs):
        axes[2, col].plot([r["allocated_mib"] for r in rs], [r["kl_mean"] for r in rs], label=p, **style)
    axes[0, col].set_title(f"question-{mode}: KL(full || compressed), mean over positions")
    axes[1, col].set_title(f"question-{mode}: greedy top-1 agreement with full cache")
    axes[2, col].set_title(f"question-{mode}: KL at equal allocated memory")
    for ax in axes[:2, col]:
      ax.set_xscale("log", base=2)
      ax.set_xticks(budgets, [str(b) for b in budgets])
    axes[1, col].set_xlabel("budget per head (entries, window of 32 included)")
    axes[1, col].set_ylim(0, 1.02)
    axes[0, col].set_yscale("log")
    axes[2, col].set_yscale("log")
    axes[2, col].set_xscale("log", base=2)
    axes[2, col].set_xlabel("K/V bytes allocated by the cache (MiB, decode room included)")
  axes[0, 0].set_ylabel("KL (nats)")
  axes[1, 0].set_ylabel("agreement")
  axes[2, 0].set_ylabel("KL (nats)")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(presses), fontsize=8, bbox_to_anchor=(0.5, -0.02))
  fig.suptitle(
    f"{model}, ~{ctx_tokens}-token pydoc contexts, teacher-forced 32-token continuation "
    f"(SnapKV family: {pool}-pool k={kernel}; w=32, alpha=0.2, kv-head GQA)",
    fontsize=10,
  )
  fig.tight_layout()
  common.save_png(fig, name)


def _family(press: str, presses) -> int:
  base = [p.removeprefix("ada-") for p in presses]
  return list(dict.fromkeys(base)).index(press.removeprefix("ada-"))


def main():
  a = parse_args()
  name = common.out_name(a.out, a.quick)
  if a.replot:
    d = common.read_json(name)
    if a.against:
      d["against"] = {n: compare_runs(d, common.read_json(n), n) for n in a.against}
      print_against(d["against"])
      common.write_json(name, d)
    return plot(
      d["rows"],
      d["meta"]["args"]["budgets"],
      d["meta"]["args"]["presses"],
      name,
      d["meta"]["args"].get("pool", "max"),
      d["meta"]["args"].get("kernel", 7),
      d["meta"]["args"].get("model", common.MODEL),
      d["meta"]["args"]["ctx_tokens"],
    )
  others = {n: common.read_json(n) for n in a.against or []}  # a missing file fails before the run
  with common.Timer() as total:
    cfg, params, tok = common.load(a.model)
    items = build_contexts(tok, a.contexts, a.ctx_tokens)
    eos = set(tok.eos_token_ids) | set(cfg.eos_token_ids)
    grid = [(m, p, b) for m in MODES for p in a.presses for b in a.budgets]
    presses = {(p, b): common.build_press(p, a, budget=b, **pooling(p, a)) for _, p, b in grid}
    states = {
      mode: capture_mode(params, cfg, mode, items, list(presses.values()), a.new_tokens, a.page_size)
      for mode in MODES
    }
    # the reference continuation: greedy from the full cache of the question-aware prompt, fixed length
    aware = states["aware"]
    cache, _, _ = common.compress(cfg, aware["cap"], None, aware["plan"])
    ys = common.decode(
      params, cfg, common.greedy_first(aware["cap"].logits_BV), cache, max_new_tokens=a.new_tokens
    )
    valid = eos_mask(ys, eos)
    for mode in MODES:
      add_reference(params, cfg, states[mode], mode, items, ys, a.new_tokens)
    sanity = {
      mode: {
        "full_vs_reference_top1": float(
          np.mean(np.asarray(jnp.argmax(states[mode]["ref_y"][:, :-1], -1)) == np.asarray(ys)[:, 1:])
        )
      }
      for mode in MODES
    }
    rows = []
    for mode, pname, budget in tqdm(grid, desc="fidelity"):
      with common.Timer() as t:
        r = evaluate(params, cfg, states[mode], presses[(pname, budget)], mode, a.new_tokens, valid)
      rows.append({"mode": mode, "press": pname, "budget": budget, **r, "wall_s": round(t.s, 2)})
  payload = {
    "meta": common.run_meta(
      a,
      model=a.model,
      wall_s=round(total.s, 1),
      new_tokens=a.new_tokens,
      questions=list(QUESTIONS[: a.contexts]),
    ),
    "contexts": [
      {
        "preview": it["preview"],
        "question": it["question"],
        "context_tokens": len(it["ctx"]),
        "question_tokens": len(it["q"]),
        "reference": tok.decode(y),
        "valid_positions": int(v.sum()),
      }
      for it, y, v in zip(items, ys, valid)
    ],
    "reference_sanity": sanity,
    "rows": rows,
    "comparisons": compare(rows),
  }
  if others:
    payload["against"] = {n: compare_runs(payload, other, n) for n, other in others.items()}
  common.write_json(name, payload)
  plot(rows, a.budgets, a.presses, name, a.pool, a.kernel, a.model, a.ctx_tokens)
  common.print_table(
    rows,
    [
      "mode",
      "press",
      "budget",
      "kl_mean",
      "top1_agreement",
      "retained_mass",
      "kl_first_token",
      "attn_out_rel_error",
      "kept_fraction",
      "allocated_mib",
      "padding_overhead",
    ],
  )
  for c in payload["comparisons"]:
    kl = c["kl"]
    print(
      f"{c['mode']} @{c['budget']}: KL {c['a']} - {c['b']} = {kl['mean']:+.4f} (se {kl['se'] or 0:.4f}, "
      f"lower in {kl['a_lower']}/{kl['n']}, sign p = {kl['sign_p']:.3g}) "
      f"at {c['allocated_bytes_ratio']}x bytes"
    )
  if a.against:
    print_against(payload["against"])
  print(f"total {total.s:.0f}s")


if __name__ == "__main__":
  main()
