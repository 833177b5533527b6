"""LongBench (Bai et al., 2023) the way the Ada-KV paper runs it, for a local copy of the data.

ADAKV_SPEC 5: Mistral-7B-Instruct-v0.2, 16 English datasets, budgets 128/256/512/1024 per head,
question-aware, greedy, batch size 1. The data cannot be downloaded here: put the official LongBench
`<dataset>.jsonl` files (fields input, context, answers, length, dataset, all_classes, _id; the
data.zip of THUDM/LongBench on the HF hub) in one directory and pass it as --data-dir.

Faithful to LongBench's pred.py / eval.py: the per-dataset prompt templates and generation lengths
(DATASET2PROMPT / DATASET2MAXLEN, written out below from the LongBench repository), middle truncation
of the tokenized prompt to --max-length tokens (decode the first and last halves and join the text),
the chat template except for trec / triviaqa / samsum / lsht / lcc / repobench-p, greedy decoding, and
the official metrics (experiments/metrics.py). Differences: samsum is not stopped at its first newline
(LongBench adds "\\n" as an EOS with min_length); the scorer keeps only the first line of samsum
predictions anyway, so only the decode time differs. The chat template is the tokenizer's own
(LongBench hard-codes one per model family); the Ada-KV authors' pred.py applies none to Mistral, which
`--chat none` reproduces.

Question-agnostic (--question-agnostic): each template is split right after its {context} field.
The context part (chat head + template text up to and including the context) is prefilled and
compressed alone; the rest of the template (instructions that follow the context, the question
{input}, "Answer:") plus the chat tail is then appended to the compressed cache. Templates without
{input} (gov_report, multi_news, passage_count, lcc) still have a post-context instruction, which plays
the question's role. The two parts are tokenized separately, so a few boundary tokens can differ from
the question-aware prompt.

Predictions go to one JSONL file per (mode, press, budget, dataset) and are resumed by _id, each with the
memory its cache allocated (allocated, kept, decode-room bytes, page size); the scores (per dataset and
the average, the layout of ADAKV_SPEC 5) go to results/longbench_<model>[_agnostic][_page<P>].json and a
PNG of the average score against the budget. Every example runs through the library's `generate`.

    python -m experiments.longbench --data-dir ~/LongBench/data \\
        --model ~/models/Mistral-7B-Instruct-v0.2 --dtype bfloat16      # the paper's grid
    python -m experiments.longbench --selftest                           # synthetic data, smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from experiments import common, metrics

# THUDM/LongBench LongBench/config/dataset2prompt.json (LongBench v1). Written from memory, then checked
# character for character against that file at the repository's HEAD (2e00731): all 21 templates and
# lengths match. Its quirks are kept on purpose: "asconcisely" (narrativeqa; an older revision of the
# file has "as concisely") and the space before "Answer the question" (qasper).
DATASET2PROMPT = {
  "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer "
  "the question asconcisely as you can, using a single phrase if possible. Do not provide any "
  "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely "
  "as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: "
  "{input}\n\nAnswer:",
  "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, "
  "using a single phrase or sentence if possible. If the question cannot be answered based on the "
  'information in the article, write "unanswerable". If the question is a yes/no question, answer '
  '"yes", "no", or "unanswerable". Do not provide any explanation.\n\nArticle: {context}\n\n '
  "Answer the question based on the above article as concisely as you can, using a single phrase or "
  "sentence if possible. If the question cannot be answered based on the information in the "
  'article, write "unanswerable". If the question is a yes/no question, answer "yes", "no", '
  'or "unanswerable". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:',
  "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
  "question based on the above text, only give me the answer and do not output any other "
  "words.\n\nQuestion: {input}\nAnswer:",
  "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，"
  "不要输出任何其他字词。\n\n问题：{input}\n回答：",
  "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any "
  "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on "
  "the given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
  "{input}\nAnswer:",
  "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any "
  "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on "
  "the given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
  "{input}\nAnswer:",
  "musique": "Answer the question based on the given passages. Only give me the answer and do not output any "
  "other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on "
  "the given passages. Only give me the answer and do not output any other words.\n\nQuestion: "
  "{input}\nAnswer:",
  "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
  "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
  "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
  "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the "
  "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
  "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
  "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
  "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
  "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
  "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}"
  "\n{input}",
  "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any "
  "other words. The following are some examples.\n\n{context}\n\n{input}",
  "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}"
  "\n\n{input}",
  "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
  "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
  "Please carefully read these paragraphs and determine how many unique paragraphs there are "
  "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
  "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
  "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on."
  "\n\nThe final answer is: ",
  "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
  "which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract."
  "\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. "
  'The answer format must be like "Paragraph 1", "Paragraph 2", etc.\n\nThe answer '
  "is: ",
  "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个"
  '摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
  "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
  "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
# config/dataset2maxlen.json: generated tokens per dataset.
DATASET2MAXLEN = {
  "narrativeqa": 128,
  "qasper": 128,
  "multifieldqa_en": 64,
  "multifieldqa_zh": 64,
  "hotpotqa": 32,
  "2wikimqa": 32,
  "musique": 32,
  "dureader": 128,
  "gov_report": 512,
  "qmsum": 512,
  "multi_news": 512,
  "vcsum": 512,
  "trec": 64,
  "triviaqa": 32,
  "samsum": 128,
  "lsht": 64,
  "passage_count": 32,
  "passage_retrieval_en": 32,
  "passage_retrieval_zh": 32,
  "lcc": 64,
  "repobench-p": 64,
}
# The Ada-KV paper's 16 (Table 1): single-doc QA, multi-doc QA, summarisation, few-shot, synthetic, code.
PAPER_DATASETS = [
  "narrativeqa",
  "qasper",
  "multifieldqa_en",
  "hotpotqa",
  "2wikimqa",
  "musique",
  "gov_report",
  "qmsum",
  "multi_news",
  "trec",
  "triviaqa",
  "samsum",
  "passage_count",
  "passage_retrieval_en",
  "lcc",
  "repobench-p",
]
ZH_DATASETS = ["multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"]
NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")  # pred.py: few-shot/code go raw
PRESSES = ["full", "h2o", "streamingllm", "snapkv", "pyramidkv", "ada-snapkv", "ada-pyramidkv"]
# ADAKV_SPEC 5: Mistral-7B-Instruct-v0.2, question-aware, average over the 16 datasets (full cache 42.51).
PAPER_AVERAGES = {
  "full": 42.51,
  "h2o": {128: 34.40, 256: 36.03, 512: 37.22, 1024: 38.70},
  "streamingllm": {128: 27.63, 256: 28.85, 512: 29.60, 1024: 31.02},
  "snapkv": {128: 35.09, 256: 38.66, 512: 40.26, 1024: 41.44},
  "pyramidkv": {128: 35.58, 256: 38.22, 512: 40.01, 1024: 41.07},
  "ada-snapkv": {128: 36.71, 256: 39.72, 512: 40.57, 1024: 41.54},
  "ada-pyramidkv": {128: 36.81, 256: 39.28, 512: 40.45, 1024: 41.23},
}
DEFAULT_MAX_LENGTH = 31500  # the Ada-KV / KVCache-Factory LongBench scripts' value for Mistral-7B (32K)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data-dir", type=Path, help="directory with LongBench's <dataset>.jsonl files")
  p.add_argument(
    "--model",
    default="smollm2-135m",
    help="smollm2-135m, a HF checkpoint dir, a .gguf or a "
    "converted dir (the paper: a Mistral-7B-Instruct-v0.2 HF dir)",
  )
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--backend", choices=("auto", "xla", "pallas"), default="auto")
  p.add_argument("--datasets", nargs="+", default=PAPER_DATASETS, choices=list(DATASET2PROMPT))
  p.add_argument("--presses", nargs="+", default=PRESSES)
  p.add_argument(
    "--budgets",
    type=int,
    nargs="+",
    default=[128, 256, 512, 1024],
    help="average cache entries per head, window included",
  )
  p.add_argument("--window", type=int, default=32)
  p.add_argument("--kernel", type=int, default=7)
  p.add_argument("--pool", choices=("max", "avg"), default="max")
  p.add_argument("--floor-alpha", type=float, default=0.2)
  common.add_press_args(p)
  p.add_argument("--limit", type=int, help="first N examples per dataset")
  p.add_argument(
    "--max-length",
    type=int,
    default=DEFAULT_MAX_LENGTH,
    help="middle-truncate prompts to this many tokens (clamped to the model's context)",
  )
  p.add_argument("--max-gen", type=int, help="cap DATASET2MAXLEN (smoke tests only)")
  p.add_argument(
    "--chat",
    choices=("auto", "none"),
    default="auto",
    help="auto: the tokenizer's chat template (LongBench's rule: not for trec, triviaqa, samsum, "
    "lsht, lcc, repobench-p); none: raw prompts everywhere, which is what the Ada-KV authors' "
    "pred.py does for Mistral (its build_chat has no Mistral branch)",
  )
  p.add_argument(
    "--question-agnostic",
    action="store_true",
    help="compress the context part alone, then append the question part",
  )
  p.add_argument("--pred-dir", type=Path, help="default results/longbench_preds/<model>/<mode>")
  p.add_argument("--out", type=Path, help="default results/longbench_<model>[_agnostic].json")
  p.add_argument("--score-only", action="store_true", help="score the existing predictions")
  p.add_argument(
    "--jax-cache-dir",
    type=Path,
    help="persistent XLA compilation cache: a resumed run reuses "
    "the compiled prefill / decode shapes instead of compiling them again",
  )
  p.add_argument("--selftest", action="store_true", help="synthetic data in a temp dir, end to end")
  a = p.parse_args(argv)
  if not a.selftest and a.data_dir is None:
    p.error("--data-dir is required (or --selftest)")
  return a


def model_tag(model: str) -> str:
  """A file-name-safe model name: the checkpoint directory's or file's name."""
  return re.sub(
    r"[^A-Za-z0-9._-]+", "_", Path(model).stem if Path(model).suffix == ".gguf" else Path(model).name
  )


def mode_tag(a) -> str:
  return "agnostic" if a.question_agnostic else "aware"


def selection_tag(a) -> str:
  """Page-granular selection keeps other entries: its predictions and scores live apart."""
  return f"_page{a.page_size}" if a.granularity == "page" else ""


def configs(a) -> list[tuple[str, int | None]]:
  """(press, budget): "full" once, every other press at every budget."""
  return [(p, None) for p in a.presses if p == "full"] + [
    (p, b) for p in a.presses if p != "full" for b in a.budgets
  ]


def config_tag(press: str, budget: int | None) -> str:
  return press if budget is None else f"{press}_b{budget}"


# ---- data and prompts ------------------------------------------------------------------------------


def load_dataset(data_dir: Path, dataset: str, limit: int | None) -> list[dict]:
  path = data_dir / f"{dataset}.jsonl"
  if not path.is_file():
    raise FileNotFoundError(
      f"{path} not found: --data-dir must hold LongBench's <dataset>.jsonl files "
      "(data.zip of THUDM/LongBench, unzipped)"
    )
  rows = []
  with path.open(encoding="utf-8") as f:
    for i, line in enumerate(f):
      if line.strip():
        row = json.loads(line)
        row.setdefault("_id", f"{dataset}-{i}")
        rows.append(row)
      if limit is not None and len(rows) >= limit:
        break
  return rows


def truncate_middle(tok, prompt: str, max_length: int) -> tuple[str, bool]:
  """pred.py: if the tokenized prompt exceeds max_length, keep the first and last max_length/2 tokens
  (decoded separately, special tokens skipped, and joined as text)."""
  ids = tok.encode(prompt, add_special_tokens=True)
  if len(ids) <= max_length:
    return prompt, False
  half = int(max_length / 2)
  return (
    tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:], skip_special_tokens=True)
  ), True


def question_suffix(dataset: str, example: dict) -> str:
  """The template after {context}, filled in: what question-agnostic mode appends after compression."""
  template = DATASET2PROMPT[dataset]
  return template[template.index("{context}") + len("{context}") :].format(**example)


def build_prompt(
  tok, dataset: str, example: dict, max_length: int, agnostic: bool, chat: str = "auto"
) -> dict:
  """Token ids of one example: {"ids"} (question-aware) or {"ctx", "q"} (question-agnostic). With a chat
  template both modes wrap the prompt in the tokenizer's one split of it (Tokenizer.chat_split)."""
  prompt, truncated = truncate_middle(tok, DATASET2PROMPT[dataset].format(**example), max_length)
  use_chat = dataset not in NO_CHAT and chat != "none" and getattr(tok, "chat_template", None) is not None
  chat = tok.chat_split() if use_chat else None
  if not agnostic:
    if chat is None:
      return {"ids": tok.encode(prompt, add_special_tokens=True), "truncated": truncated}
    return {"ids": tok.encode(chat[0] + prompt + chat[1], add_special_tokens=False), "truncated": truncated}
  suffix = question_suffix(dataset, example)
  if not prompt.endswith(suffix):
    raise ValueError(
      f"{dataset} {example['_id']}: truncation reached the question part; it cannot be "
      "split off for question-agnostic mode (raise --max-length)"
    )
  ctx_text = prompt[: len(prompt) - len(suffix)]
  if chat is None:
    ctx, q = tok.encode(ctx_text, add_special_tokens=True), tok.encode(suffix, add_special_tokens=False)
  else:
    ctx = tok.encode(chat[0] + ctx_text, add_special_tokens=False)
    q = tok.encode(suffix + chat[1], add_special_tokens=False)
  return {"ctx": ctx, "q": q, "truncated": truncated}


# ---- predictions -----------------------------------------------------------------------------------


def pred_path(pred_dir: Path, press: str, budget: int | None, dataset: str) -> Path:
  return pred_dir / config_tag(press, budget) / f"{dataset}.jsonl"


def done_ids(path: Path) -> set[str]:
  """_ids already predicted (a line cut short by an interruption is ignored and redone)."""
  if not path.is_file():
    return set()
  ids = set()
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      ids.add(json.loads(line)["_id"])
    except (json.JSONDecodeError, KeyError):
      continue
  return ids


def read_preds(path: Path) -> list[dict]:
  if not path.is_file():
    return []
  out, seen = [], set()
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if row["_id"] not in seen:
      seen.add(row["_id"])
      out.append(row)
  return out


def predict(a, model) -> int:
  """Runs every missing (dataset, example, press, budget); returns how many generations ran."""
  from tqdm import tqdm

  from adakv_jax.generation import generate

  cfg, params, tok = model
  eos = tuple(tok.eos_token_ids) or tuple(cfg.eos_token_ids)
  grid = configs(a)
  presses = {
    c: common.build_press(
      c[0],
      a,
      **(
        {}
        if c[1] is None
        else dict(
          budget=c[1],
          window=a.window,
          kernel=a.kernel,
          pool=a.pool,
          floor_alpha=a.floor_alpha,
          backend=a.backend,
        )
      ),
    )
    for c in grid
  }
  ran = 0
  for dataset in a.datasets:
    examples = load_dataset(a.data_dir, dataset, a.limit)
    done = {c: done_ids(pred_path(a.pred_dir, *c, dataset)) for c in grid}
    todo = [(ex, c) for ex in examples for c in grid if ex["_id"] not in done[c]]
    if not todo:
      continue
    max_gen = min(DATASET2MAXLEN[dataset], a.max_gen or 10**9)
    max_length = min(a.max_length, cfg.max_position_embeddings - max_gen - 64)  # room for the chat wrap
    bar = tqdm(total=len(todo), desc=dataset, unit="gen")
    built: dict = {}
    for ex, c in todo:
      if ex["_id"] not in built:
        built = {ex["_id"]: build_prompt(tok, dataset, ex, max_length, a.question_agnostic, a.chat)}
      prompt = built[ex["_id"]]
      t0 = time.perf_counter()
      # untrimmed pools keep the plan's shape, which for a budget press is the same for every prompt longer
      # than the budget: the examples share compiled programs (trimming would compile one per example)
      run = dict(
        max_new_tokens=max_gen,
        press=presses[c],
        eos_token_ids=eos,
        backend=a.backend,
        page_size=a.page_size,
        trim=False,
      )
      if a.question_agnostic:
        res = generate(params, cfg, [prompt["ctx"]], questions=[prompt["q"]], **run)
        ids, n_prompt = res.answers[0][0], len(prompt["ctx"]) + len(prompt["q"])
      else:
        res = generate(params, cfg, [prompt["ids"]], **run)
        ids, n_prompt = res.token_ids[0], len(prompt["ids"])
      row = {
        "_id": ex["_id"],
        "pred": tok.decode(ids, skip_special_tokens=True),
        "answers": ex["answers"],
        "all_classes": ex.get("all_classes"),
        "length": ex.get("length"),
        "prompt_tokens": n_prompt,
        "truncated": prompt["truncated"],
        "allocated_bytes": res.cache_bytes,
        "kept_bytes": res.kept_bytes,
        "decode_room_bytes": res.decode_room_bytes,
        "full_cache_bytes": res.full_cache_bytes,
        "padding_overhead": round(res.padding_overhead, 4),
        "page_size": res.page_size,
        "seconds": round(time.perf_counter() - t0, 3),
      }
      path = pred_path(a.pred_dir, *c, dataset)
      path.parent.mkdir(parents=True, exist_ok=True)
      with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
      ran += 1
      bar.update(1)
    bar.close()
  return ran


# ---- scoring and output ----------------------------------------------------------------------------


def score_all(a) -> dict:
  """{config tag: {"press", "budget", "datasets": {name: score}, "n": {name: count}, "average",
  "allocated_mib_mean"}} (the mean allocated cache over the scored examples)."""
  table = {}
  for press, budget in configs(a):
    scores, counts, allocated = {}, {}, []
    for dataset in a.datasets:
      rows = read_preds(pred_path(a.pred_dir, press, budget, dataset))
      if not rows:
        continue
      scores[dataset] = metrics.longbench_score(
        dataset, [r["pred"] for r in rows], [r["answers"] for r in rows], rows[0].get("all_classes") or []
      )
      counts[dataset] = len(rows)
      allocated += [r["allocated_bytes"] / 2**20 for r in rows if "allocated_bytes" in r]
    avg = round(sum(scores.values()) / len(scores), 2) if scores else None
    table[config_tag(press, budget)] = {
      "press": press,
      "budget": budget,
      "datasets": scores,
      "n": counts,
      "average": avg,
      "allocated_mib_mean": round(sum(allocated) / len(allocated), 3) if allocated else None,
      "complete": len(scores) == len(a.datasets),
    }
  return table


def print_table(table: dict, a) -> None:
  """ADAKV_SPEC 5's layout: rows = budget, columns = press, cells = average score."""
  presses = [p for p in a.presses if p != "full"]
  if "full" in table:
    print(f"full cache average: {table['full']['average']}")
  print("B per head | " + " | ".join(f"{p:>13}" for p in presses))
  for b in a.budgets:
    cells = [table.get(config_tag(p, b), {}).get("average") for p in presses]
    print(f"{b:>10} | " + " | ".join(f"{'-' if c is None else c:>13}" for c in cells))


def plot(table: dict, a, path: Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4))
  for p in [p for p in a.presses if p != "full"]:
    pts = [
      (b, table[config_tag(p, b)]["average"])
      for b in a.budgets
      if table.get(config_tag(p, b), {}).get("average") is not None
    ]
    if pts:
      ax.plot(*zip(*pts), marker="o", ls="--" if not p.startswith("ada-") else "-", label=p)
  if table.get("full", {}).get("average") is not None:
    ax.axhline(table["full"]["average"], color="k", lw=1, ls=":", label="full cache")
  ax.set_xscale("log", base=2)
  ax.set_xticks(a.budgets, [str(b) for b in a.budgets])
  ax.set_xlabel("budget B per head (entries, window included)")
  ax.set_ylabel(f"average score over {len(a.datasets)} datasets")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  print(f"wrote {path}")


def run(a, model=None) -> dict:
  """Predict what is missing, score everything, write the JSON and the PNG; returns the payload."""
  tag = model_tag(a.model)
  a.pred_dir = a.pred_dir or common.RESULTS / "longbench_preds" / tag / (mode_tag(a) + selection_tag(a))
  a.out = a.out or common.RESULTS / (
    f"longbench_{tag}{'_agnostic' if a.question_agnostic else ''}{selection_tag(a)}.json"
  )
  if set(a.datasets) & set(ZH_DATASETS):
    metrics._jieba()  # fail before hours of generation, not after
  t0 = time.perf_counter()
  ran = 0
  if not a.score_only:
    if a.jax_cache_dir is not None:
      import jax

      jax.config.update("jax_compilation_cache_dir", str(a.jax_cache_dir))
    model = model or common.load(a.model, dtype=a.dtype)
    ran = predict(a, model)
  table = score_all(a)
  payload = {
    "meta": common.run_meta(
      a,
      model=a.model,
      dtype=a.dtype,
      backend=a.backend,
      mode=mode_tag(a),
      generations_this_run=ran,
      wall_s=round(time.perf_counter() - t0, 1),
    ),
    "datasets": a.datasets,
    "metric": {d: metrics.DATASET2METRIC[d].__name__ for d in a.datasets},
    "max_gen": {d: min(DATASET2MAXLEN[d], a.max_gen or 10**9) for d in a.datasets},
    "table": table,
    "paper_question_aware_averages": PAPER_AVERAGES,
    "note": "paper averages: Mistral-7B-Instruct-v0.2, 16 datasets, question-aware (ADAKV_SPEC 5)",
  }
  a.out.parent.mkdir(parents=True, exist_ok=True)
  a.out.write_text(json.dumps(payload, indent=1, default=str, ensure_ascii=False) + "\n")
  print(f"wrote {a.out}")
  print_table(table, a)
  plot(
    table,
    a,
    a.out.with_suffix(".png"),
    f"LongBench, {tag}, question-{mode_tag(a)}, {len(a.datasets)} datasets",
  )
  return payload


# ---- selftest --------------------------------------------------------------------------------------


def write_synthetic_data(root: Path) -> list[str]:
  """Three tiny LongBench-format datasets (QA F1, classification, count), 2 examples each; one prompt is
  long enough to be middle-truncated by the selftest's --max-length."""
  from pydoc_data.topics import topics

  words = " ".join(topics[k].strip() for k in sorted(topics)).split()
  filler = lambda i, n: " ".join(words[100 * i : 100 * i + n])
  rows = {
    "hotpotqa": [
      {
        "input": "What is the capital of Freedonia?",
        "answers": ["Fredville"],
        "context": f"Passage 1:\n{filler(0, 150)}\nPassage 2:\nThe capital of Freedonia is Fredville.\n"
        f"Passage 3:\n{filler(40, 150)}",
      },
      {
        "input": "Which river flows through Fredville?",
        "answers": ["the Blue Otter", "Blue Otter river"],
        "context": f"Passage 1:\n{filler(60, 700)}\nPassage 2:\nThe Blue Otter river flows through "
        f"Fredville.\nPassage 3:\n{filler(90, 300)}",
      },
    ],
    "trec": [
      {
        "input": "Question: Who wrote Hamlet ?\nType:",
        "answers": ["Individual"],
        "all_classes": ["Individual", "City", "Date", "Number of something", "Definition of something"],
        "context": "Question: What is the capital of Peru ?\nType: City\nQuestion: When did the war end ?\n"
        "Type: Date\nQuestion: Who invented the telephone ?\nType: Individual\nQuestion: How many "
        "legs does a spider have ?\nType: Number of something\n" + filler(120, 200),
      },
      {
        "input": "Question: What city hosts the Louvre ?\nType:",
        "answers": ["City"],
        "all_classes": ["Individual", "City", "Date", "Number of something", "Definition of something"],
        "context": "Question: What is a galaxy ?\nType: Definition of something\nQuestion: Which city is "
        "the largest in Japan ?\nType: City\n" + filler(140, 200),
      },
    ],
    "passage_count": [
      {
        "input": "",
        "answers": ["3"],
        "context": f"Paragraph 1: {filler(5, 60)}\n\nParagraph 2: {filler(9, 60)}\n\nParagraph 3: "
        f"{filler(5, 60)}\n\nParagraph 4: {filler(15, 60)}",
      },
      {
        "input": "",
        "answers": ["2"],
        "context": f"Paragraph 1: {filler(20, 80)}\n\nParagraph 2: {filler(20, 80)}\n\nParagraph 3: "
        f"{filler(30, 80)}",
      },
    ],
  }
  root.mkdir(parents=True, exist_ok=True)
  for name, examples in rows.items():
    with (root / f"{name}.jsonl").open("w", encoding="utf-8") as f:
      for i, ex in enumerate(examples):
        full = {
          "dataset": name,
          "length": len(ex["context"].split()),
          "all_classes": None,
          "_id": f"selftest-{name}-{i}",
          **ex,
        }
        f.write(json.dumps(full) + "\n")
  return list(rows)


def selftest() -> None:
  """End to end on synthetic data: both modes, resume (a second run generates nothing), JSON checks."""
  root = Path(tempfile.mkdtemp(prefix="longbench_selftest_"))
  datasets = write_synthetic_data(root / "data")
  model = common.load("smollm2-135m")
  base = [
    "--data-dir",
    str(root / "data"),
    "--datasets",
    *datasets,
    "--presses",
    "full",
    "snapkv",
    "ada-snapkv",
    "--budgets",
    "64",
    "128",
    "--max-length",
    "700",
    "--max-gen",
    "16",
  ]
  t0 = time.perf_counter()
  for extra in ([], ["--question-agnostic"]):
    tag = "agnostic" if extra else "aware"
    a = parse_args(
      base + extra + ["--pred-dir", str(root / "preds" / tag), "--out", str(root / f"{tag}.json")]
    )
    payload = run(a, model)
    check_payload(payload, datasets, n_configs=5, n_examples=2)
    again = run(
      parse_args(
        base + extra + ["--pred-dir", str(root / "preds" / tag), "--out", str(root / f"{tag}_resumed.json")]
      ),
      model,
    )
    assert again["meta"]["generations_this_run"] == 0, "resume re-ran finished predictions"
    assert again["table"] == payload["table"], "scores changed on resume"
    truncated = [r["truncated"] for r in read_preds(root / "preds" / tag / "full" / "hotpotqa.jsonl")]
    assert truncated == [False, True], f"middle truncation not exercised as planned: {truncated}"
  print(f"selftest OK in {time.perf_counter() - t0:.0f} s: {root}")


def check_payload(payload: dict, datasets: list[str], n_configs: int, n_examples: int) -> None:
  table = payload["table"]
  assert len(table) == n_configs, sorted(table)
  for tag, row in table.items():
    assert set(row["datasets"]) == set(datasets), (tag, row["datasets"])
    assert all(row["n"][d] == n_examples for d in datasets), (tag, row["n"])
    assert all(0.0 <= s <= 100.0 for s in row["datasets"].values()), (tag, row["datasets"])
    assert row["average"] == round(sum(row["datasets"].values()) / len(datasets), 2), tag
  assert payload["meta"]["generations_this_run"] == n_configs * n_examples * len(datasets)


def main(argv=None) -> None:
  a = parse_args(argv)
  if a.selftest:
    selftest()
    return
  run(a)


if __name__ == "__main__":
  main()
