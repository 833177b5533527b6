"""Scoring functions of LongBench and RULER, written out so the scripts need no extra packages.

LongBench (THUDM/LongBench, metrics.py + eval.py): every metric takes (prediction, ground_truth,
all_classes=) and returns a score in [0, 1]; `longbench_score` takes the max over a sample's ground
truths, averages over samples and reports 100x, rounded to 2 decimals, exactly as eval.py's `scorer`.
Two metrics there come from packages that are reimplemented here:
- ROUGE-L: the `rouge` package (pltrdy, 1.0.1), whose "rouge-l" is the SUMMARY-level union-LCS on word
  SETS (exclusive=True), with sentences split on "." -- not the textbook token-level ROUGE-L. `rouge_l_f`
  replays that algorithm, tie-breaking of the LCS reconstruction included (the chosen LCS decides which
  words enter the union). Where `rouge` raises (an empty hypothesis or reference), LongBench scores 0.
- fuzz.ratio (fuzzywuzzy): `round(100 * difflib.SequenceMatcher(None, a, b).ratio())`, which is what
  fuzzywuzzy computes WITHOUT python-Levenshtein; with python-Levenshtein installed it uses
  Levenshtein.ratio instead, which can differ by a point or two. So code_sim_score approximates it.
jieba (Chinese word segmentation) is imported only by the *_zh metrics, with a clear error if missing.

RULER (NVIDIA/RULER, eval/synthetic/constants.py): `string_match_all` (recall of all expected strings,
case-insensitive substring) for niah/vt/cwe/fwe, `string_match_part` (any of them) for qa.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter

# ---- LongBench: normalisation and F1 ---------------------------------------------------------------

CN_PUNCTUATION = (
  "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝"
  "〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_answer(s: str) -> str:
  """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in set(string.punctuation))
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
  """Chinese normalisation: lower case, drop ASCII and CJK punctuation and all whitespace."""
  punct = set(string.punctuation + CN_PUNCTUATION)
  return "".join("".join(ch for ch in s.lower() if ch not in punct).split())


def f1_score(prediction: list, ground_truth: list, **_) -> float:
  """Token-multiset F1 (0 when nothing overlaps)."""
  same = sum((Counter(prediction) & Counter(ground_truth)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(prediction), same / len(ground_truth)
  return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
  return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _jieba():
  try:
    import jieba
  except ImportError as e:
    raise ImportError(
      "the Chinese LongBench datasets (multifieldqa_zh, dureader, vcsum, lsht, "
      "passage_retrieval_zh) are scored on jieba word segmentation: pip install jieba "
      "(the English datasets do not need it)"
    ) from e
  jieba.setLogLevel(60)  # silence "Building prefix dict" chatter
  return jieba


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
  jieba = _jieba()
  pred = [normalize_zh_answer(t) for t in jieba.cut(prediction, cut_all=False)]
  ref = [normalize_zh_answer(t) for t in jieba.cut(ground_truth, cut_all=False)]
  return f1_score([t for t in pred if t], [t for t in ref if t])


# ---- LongBench: ROUGE-L (pltrdy `rouge` 1.0.1 semantics) -------------------------------------------


def _sentences(text: str) -> list[str]:
  """rouge.Rouge._get_scores: split on ".", drop empty pieces, collapse whitespace inside each."""
  return [" ".join(p.split()) for p in text.split(".") if len(p) > 0]


def _words(sentences: list[str]) -> list[str]:
  return [w for s in sentences for w in s.split(" ")]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
  """The word set of the LCS of x and y that rouge's recursive _recon_lcs reconstructs (same ties)."""
  n, m = len(x), len(y)
  table = [[0] * (m + 1) for _ in range(n + 1)]
  for i in range(1, n + 1):
    for j in range(1, m + 1):
      table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
  out, i, j = set(), n, m
  while i > 0 and j > 0:  # iterative: the recursive original hits Python's recursion limit on long text
    if x[i - 1] == y[j - 1]:
      out.add(x[i - 1])
      i, j = i - 1, j - 1
    elif table[i - 1][j] > table[i][j - 1]:
      i -= 1
    else:
      j -= 1
  return out


def rouge_l_f(hypothesis: str, reference: str) -> float:
  """rouge.Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"]; raises ValueError where rouge does."""
  hyp, ref = _sentences(hypothesis), _sentences(reference)
  if not hyp or not ref:
    raise ValueError("Collections must contain at least 1 sentence.")
  m, n = len(set(_words(ref))), len(set(_words(hyp)))
  union: set[str] = set()
  for ref_s in ref:  # the union grows across reference sentences: each word counts once
    for hyp_s in hyp:
      union |= _lcs_words(ref_s.split(" "), hyp_s.split(" "))
  r, p = len(union) / m, len(union) / n
  return 2.0 * (p * r) / (p + r + 1e-8)


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
  """LongBench's rouge_score: ROUGE-L F, 0 where the rouge package would raise."""
  try:
    return rouge_l_f(prediction, ground_truth)
  except ValueError:
    return 0.0


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
  jieba = _jieba()
  return rouge_score(
    " ".join(jieba.cut(prediction, cut_all=False)), " ".join(jieba.cut(ground_truth, cut_all=False))
  )


# ---- LongBench: classification, retrieval, count, code ---------------------------------------------


def classification_score(prediction: str, ground_truth: str, all_classes=(), **_) -> float:
  """1/k when the true class is among the k class names found in the prediction.

  Replays the official loop literally, including its removal from the list it iterates over (which
  skips the element after each removed one): scores then match the published numbers.
  """
  matches = [c for c in all_classes if c in prediction]
  for term in matches:
    if term in ground_truth and term != ground_truth:
      matches.remove(term)
  return 1.0 / len(matches) if ground_truth in matches else 0.0


def _number_share(prediction: str, target: str) -> float:
  """Fraction of the numbers in the prediction that equal target (0 when there are none)."""
  numbers = re.findall(r"\d+", prediction)
  return sum(n == str(target) for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
  """passage_retrieval_en: the answer is "Paragraph N"; credit N's share of the numbers predicted."""
  return _number_share(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
  return _number_share(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


def count_score(prediction: str, ground_truth: str, **_) -> float:
  """passage_count: the true count's share of the numbers predicted."""
  return _number_share(prediction, ground_truth)


def fuzz_ratio(a: str, b: str) -> int:
  """fuzzywuzzy.fuzz.ratio without python-Levenshtein (difflib; autojunk on, as there)."""
  return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
  """First line of the prediction that is not a comment or a code fence, fuzz-ratio'd to the truth."""
  line = ""
  for candidate in prediction.lstrip("\n").split("\n"):
    if "`" not in candidate and "#" not in candidate and "//" not in candidate:
      line = candidate
      break
  return fuzz_ratio(line, ground_truth) / 100


DATASET2METRIC = {
  "narrativeqa": qa_f1_score,
  "qasper": qa_f1_score,
  "multifieldqa_en": qa_f1_score,
  "multifieldqa_zh": qa_f1_zh_score,
  "hotpotqa": qa_f1_score,
  "2wikimqa": qa_f1_score,
  "musique": qa_f1_score,
  "dureader": rouge_zh_score,
  "gov_report": rouge_score,
  "qmsum": rouge_score,
  "multi_news": rouge_score,
  "vcsum": rouge_zh_score,
  "trec": classification_score,
  "triviaqa": qa_f1_score,
  "samsum": rouge_score,
  "lsht": classification_score,
  "passage_retrieval_en": retrieval_score,
  "passage_count": count_score,
  "passage_retrieval_zh": retrieval_zh_score,
  "lcc": code_sim_score,
  "repobench-p": code_sim_score,
}
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")  # few-shot: only the first line counts


def longbench_sample_score(dataset: str, prediction: str, answers: list[str], all_classes=()) -> float:
  """One sample in [0, 1]: the best score over its ground truths."""
  if dataset in FIRST_LINE_DATASETS:
    prediction = prediction.lstrip("\n").split("\n")[0]
  metric = DATASET2METRIC[dataset]
  return max((metric(prediction, gt, all_classes=all_classes) for gt in answers), default=0.0)


def longbench_score(dataset: str, predictions: list[str], answers: list[list[str]], all_classes=()) -> float:
  """eval.py's `scorer`: mean best-over-answers score x 100, rounded to 2 decimals."""
  if not predictions:
    return float("nan")
  total = sum(longbench_sample_score(dataset, p, a, all_classes) for p, a in zip(predictions, answers))
  return round(100 * total / len(predictions), 2)


# ---- RULER -----------------------------------------------------------------------------------------


def ruler_postprocess(prediction: str) -> str:
  """RULER's postprocess_pred: control characters become newlines, then strip."""
  return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
  """Fraction of the expected strings found (case-insensitive substring) in the prediction."""
  pred = prediction.lower()
  return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
  """1 when any expected string is found in the prediction (RULER's qa tasks)."""
  pred = prediction.lower()
  return float(any(r.lower() in pred for r in references))


def ruler_score(predictions: list[str], references: list[list[str]], part: bool = False) -> float:
  """Task score in percent, rounded to 2 decimals, as RULER's evaluate.py prints it."""
  if not predictions:
    return float("nan")
  match = string_match_part if part else string_match_all
  total = sum(match(ruler_postprocess(p), r) for p, r in zip(predictions, references))
  return round(100 * total / len(predictions), 2)


# ---- paired significance ---------------------------------------------------------------------------


def mcnemar(a: list[bool], b: list[bool]) -> dict:
  """McNemar's exact test for two methods scored on the same trials: only the discordant trials (one
  right, the other wrong) carry information, and under "no difference" each falls either way with
  probability 1/2, so the two-sided p-value is the binomial tail of the rarer side, doubled."""
  if len(a) != len(b):
    raise ValueError(f"paired results need equal lengths, got {len(a)} and {len(b)}")
  a_only = sum(1 for x, y in zip(a, b) if x and not y)
  b_only = sum(1 for x, y in zip(a, b) if y and not x)
  n = a_only + b_only
  tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
  return {
    "n": len(a),
    "a_correct": int(sum(map(bool, a))),
    "b_correct": int(sum(map(bool, b))),
    "a_only": a_only,
    "b_only": b_only,
    "p_value": min(1.0, 2 * tail),
  }


def paired_differences(a: list[float], b: list[float]) -> dict:
  """a - b over the same items: the mean with its standard error, and the exact two-sided sign test
  (under "no difference" each non-tied item is a fair coin; ties carry no information)."""
  if len(a) != len(b) or not a:
    raise ValueError(f"paired results need equal, non-zero lengths, got {len(a)} and {len(b)}")
  d = [x - y for x, y in zip(a, b)]
  lower, higher = sum(1 for x in d if x < 0), sum(1 for x in d if x > 0)
  n = lower + higher
  tail = sum(math.comb(n, i) for i in range(min(lower, higher) + 1)) / 2**n
  mean = sum(d) / len(d)
  se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else None
  return {
    "n": len(d),
    "mean": mean,
    "se": se,
    "a_lower": lower,
    "a_higher": higher,
    "sign_p": min(1.0, 2 * tail),
  }
