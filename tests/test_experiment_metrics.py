"""The paper-reproduction scripts' scoring (experiments/metrics.py), RULER generator
(experiments/ruler.py) and LongBench prompt building (experiments/longbench.py), on hand-worked
examples. No model is loaded."""

import argparse
import re
import sys
from collections import Counter

import numpy as np
import pytest

from experiments import common, fidelity, longbench, metrics, ruler

# ---- LongBench metrics -----------------------------------------------------------------------------


def test_normalize_answer_drops_case_punctuation_articles_and_extra_space():
  assert metrics.normalize_answer("The  Cat, sat on A mat!") == "cat sat on mat"
  assert metrics.normalize_answer("an apple-pie") == "applepie"  # punctuation goes before words split


def test_qa_f1_on_token_overlap():
  # pred {cat, sat, on, mat} vs truth {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
  assert metrics.qa_f1_score("the cat sat on the mat", "Cat on mat.") == pytest.approx(6 / 7)
  assert metrics.qa_f1_score("dog", "cat") == 0.0
  assert metrics.qa_f1_score("Paris", "paris") == 1.0
  # multiset overlap: "a a b" vs "a b b" shares {a, b}: P = R = 2/3
  assert metrics.f1_score(["x", "x", "y"], ["x", "y", "y"]) == pytest.approx(2 / 3)


def test_qa_f1_zh_needs_jieba_with_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "jieba", None)  # import jieba -> ImportError, installed or not
  with pytest.raises(ImportError, match="pip install jieba"):
    metrics.qa_f1_zh_score("北京", "北京")
  assert metrics.qa_f1_score("Paris", "Paris") == 1.0  # the English metrics do not care


def test_rouge_l_single_sentence():
  # LCS "the cat on the mat" -> word set {the, cat, on, mat}: 4 of 5 distinct words each side
  assert metrics.rouge_l_f("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8, abs=1e-7)
  assert metrics.rouge_l_f("a b c", "a b c") == pytest.approx(1.0, abs=1e-7)


def test_rouge_l_is_summary_level_over_sentences():
  # sentences split on ".": ref "a c" meets hyp "a b" -> {a} and "c d" -> {c}; ref "b d" adds {b}, {d}.
  # The union covers all 4 words: F = 1, where token-level LCS of "a b c d" / "a c b d" would give 3/4.
  assert metrics.rouge_l_f("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-7)
  # words counted once: "x x y" vs "x y": distinct words 2 and 2, LCS set {x, y}
  assert metrics.rouge_l_f("x x y", "x y") == pytest.approx(1.0, abs=1e-7)


def test_rouge_score_is_zero_where_rouge_raises():
  assert metrics.rouge_score("", "a reference") == 0.0
  assert metrics.rouge_score("...", "a reference") == 0.0  # only dots: no sentence left
  with pytest.raises(ValueError):
    metrics.rouge_l_f("", "a reference")


def test_classification_score():
  classes = ["Location", "Human being", "Human"]
  assert metrics.classification_score("Human being", "Human being", all_classes=classes) == 1.0
  assert (
    metrics.classification_score(
      "Location or Human being", "Location", all_classes=["Location", "Human being"]
    )
    == 0.5
  )
  assert metrics.classification_score("Number", "Location", all_classes=classes) == 0.0


def test_classification_score_keeps_the_official_list_mutation_quirk():
  # official loop removes from the list it iterates: "ab" goes, "a" is skipped, "b" goes -> [a, abc]
  assert metrics.classification_score("abc", "abc", all_classes=["ab", "a", "b", "abc"]) == 0.5


def test_retrieval_and_count_parse_numbers():
  assert metrics.retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
  assert metrics.retrieval_score("Paragraph 3 or Paragraph 12", "Paragraph 12") == 0.5
  assert metrics.retrieval_score("I do not know", "Paragraph 12") == 0.0
  assert metrics.retrieval_score("Paragraph 1", "Paragraph 12") == 0.0  # whole numbers, not prefixes
  assert metrics.retrieval_zh_score("段落5", "段落5") == 1.0
  assert metrics.count_score("There are 5 unique paragraphs.", "5") == 1.0
  assert metrics.count_score("5 or 6", "5") == 0.5
  assert metrics.count_score("five", "5") == 0.0


def test_code_sim_takes_the_first_code_line():
  pred = "```python\n# the next line\nx = foo(1)\ny = 2\n"
  assert metrics.code_sim_score(pred, "x = foo(1)") == 1.0
  assert metrics.fuzz_ratio("abcd", "abce") == 75  # 2 * 3 matches / 8 characters
  assert metrics.fuzz_ratio("", "") == 100 and metrics.fuzz_ratio("", "x") == 0


def test_longbench_score_max_over_answers_first_line_and_rounding():
  # few-shot sets keep only the first line of the prediction
  assert (
    metrics.longbench_sample_score(
      "trec", "\nLocation\nHuman being", ["Location"], ["Location", "Human being"]
    )
    == 1.0
  )
  assert (
    metrics.longbench_sample_score("hotpotqa", "Blue Otter", ["the Blue Otter river", "Blue Otter"]) == 1.0
  )
  # (1 + 0 + 6/7) / 3 * 100 = 61.904... -> 61.9
  got = metrics.longbench_score(
    "hotpotqa", ["Paris", "dog", "the cat sat on the mat"], [["Paris"], ["cat"], ["cat on mat"]]
  )
  assert got == 61.9


# ---- RULER metrics ---------------------------------------------------------------------------------


def test_ruler_string_match():
  assert metrics.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(
    2 / 3
  )
  assert metrics.string_match_all("uuid ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
  assert metrics.string_match_part("only 456", ["123", "456"]) == 1.0
  assert metrics.string_match_part("none", ["123", "456"]) == 0.0
  assert metrics.ruler_postprocess(" 12\x0034\t ") == "12\n34"
  # (1 + 1/2 + 0) / 3 * 100 = 50
  assert metrics.ruler_score(["1 2", "1", "x"], [["1", "2"], ["1", "2"], ["1"]]) == 50.0
  assert metrics.ruler_score(["1 2", "x"], [["1", "2"], ["x", "y"]], part=True) == 100.0


# ---- RULER generator -------------------------------------------------------------------------------


def _samples(length=1024, seed=0, n=2):
  return {
    t: [ruler.make_sample(t, i, seed, length, ruler.word_count_tokens) for i in range(n)] for t in ruler.TASKS
  }


@pytest.fixture(scope="module")
def samples():
  return _samples()


def test_generator_is_deterministic_under_a_seed(samples):
  again = {t: [ruler.make_sample(t, 0, 0, 1024, ruler.word_count_tokens)] for t in ("niah_multikey_3", "fwe")}
  for t, (s,) in again.items():
    assert s == samples[t][0]
  other = ruler.make_sample("niah_single_1", 0, 1, 1024, ruler.word_count_tokens)
  assert other["outputs"] != samples["niah_single_1"][0]["outputs"]
  assert samples["niah_single_1"][0]["outputs"] != samples["niah_single_1"][1]["outputs"]


def test_samples_fill_the_length_and_no_more(samples):
  for task, ss in samples.items():
    room = 1024 - ruler.TOKENS_TO_GENERATE[ruler.TASKS[task]["kind"]]
    for s in ss:
      assert ruler.word_count_tokens(s) <= room, task
      bigger = ruler.build(task, s["index"], s["seed"], s["size"] + 1)
      assert ruler.word_count_tokens(bigger) > room, task  # the largest haystack that fits


def test_niah_needles_are_in_the_context(samples):
  for task, ss in samples.items():
    spec = ruler.TASKS[task]
    if spec["kind"] != "niah":
      continue
    for s in ss:
      assert len(s["outputs"]) == spec["q"] * spec["v"], task
      for value in s["outputs"]:
        found = re.findall(
          rf"One of the special magic {spec['value']} for (\S+) is: {re.escape(value)}\.", s["context"]
        )
        assert len(found) == 1 and s["context"].count(value) == 1, (task, value)
        assert found[0] in s["question"] and found[0] in s["answer_prefix"], (task, found[0])
      single = spec["q"] * spec["v"] == 1
      assert s["question"].startswith("\nWhat is the special" if single else "\nWhat are all the special")


def test_vt_chain_is_in_the_context(samples):
  for s in samples["vt"]:
    value = s["question"].split("assigned the value ")[1].split(" ")[0]
    names = s["outputs"]
    assert len(names) == 5
    haystack = s["context"].split("Memorize and track")[-1]  # after the one-shot example
    assert f"VAR {names[0]} = {value}" in haystack
    for a, b in zip(names, names[1:]):
      assert f"VAR {b} = VAR {a}" in haystack


def test_cwe_and_fwe_answers_are_the_most_frequent_words(samples):
  for s in samples["cwe"]:
    listing = s["context"].split("\n")[-1]  # the real list, after the one-shot example
    counts = Counter(w for w in listing.split() if not w[:-1].isdigit())
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(s["outputs"]) and min(counts[w] for w in top) > max(
      c for w, c in counts.items() if w not in top
    )
  for s in samples["fwe"]:
    coded = s["context"].split("\n")[-1].split("coded words. ")[1]
    counts = Counter(coded.split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "..." and ranked[1:4] == s["outputs"]
    assert counts[ranked[3]] > counts[ranked[4]]  # no tie at the cut


# ---- LongBench prompts -----------------------------------------------------------------------------


class WordTok:
  """A stand-in tokenizer: one token per word with its leading whitespace; "<s>" as BOS."""

  chat_template = "user-turn"

  def encode(self, text, add_special_tokens=True):
    return (["<s>"] if add_special_tokens else []) + re.findall(r"\s*\S+|\s+$", text)

  def decode(self, ids, skip_special_tokens=True):
    return "".join(t for t in ids if not (skip_special_tokens and t == "<s>"))

  def chat_split(self):
    return "<user>", "</user><bot>"


def test_middle_truncation_keeps_both_ends():
  tok = WordTok()
  prompt = " ".join(f"w{i}" for i in range(20))
  out, cut = longbench.truncate_middle(tok, prompt, 8)  # 21 tokens with BOS: keep 4 + 4
  assert cut and out == "w0 w1 w2 w16 w17 w18 w19"  # BOS skipped; the halves joined as text
  assert longbench.truncate_middle(tok, "a b", 8) == ("a b", False)


def test_question_agnostic_split_rebuilds_the_aware_prompt():
  tok = WordTok()
  ex = {"context": "The capital of Freedonia is Fredville.", "input": "What is the capital?", "_id": "x"}
  aware = longbench.build_prompt(tok, "hotpotqa", ex, 1000, agnostic=False)
  split = longbench.build_prompt(tok, "hotpotqa", ex, 1000, agnostic=True)
  assert tok.decode(aware["ids"]) == tok.decode(split["ctx"] + split["q"])
  assert tok.decode(split["ctx"]).endswith("Fredville.") and "What is the capital?" in tok.decode(split["q"])
  assert tok.decode(split["q"]).endswith("Answer:</user><bot>")
  raw = longbench.build_prompt(tok, "trec", {"context": "Q: a\nType: b", "input": "Q: c\nType:"}, 1000, False)
  assert raw["ids"][0] == "<s>" and "<user>" not in tok.decode(raw["ids"])  # few-shot sets skip the chat
  none = longbench.build_prompt(tok, "hotpotqa", ex, 1000, agnostic=False, chat="none")
  assert "<user>" not in tok.decode(none["ids"])


def test_predictions_resume_by_id(tmp_path):
  path = tmp_path / "preds.jsonl"
  path.write_text('{"_id": "a", "pred": "x", "answers": ["x"]}\n{"_id": "b", "pr')  # cut short
  assert longbench.done_ids(path) == {"a"}
  assert [r["_id"] for r in longbench.read_preds(path)] == ["a"]


# ---- paired significance ---------------------------------------------------------------------------


def test_mcnemar_counts_only_discordant_trials():
  # 10 trials both right, 2 both wrong, a alone right in 6, b alone in 0: p = 2 * (1/2)^6 = 1/32
  a = [True] * 10 + [False] * 2 + [True] * 6
  b = [True] * 10 + [False] * 2 + [False] * 6
  assert metrics.mcnemar(a, b) == {
    "n": 18,
    "a_correct": 16,
    "b_correct": 10,
    "a_only": 6,
    "b_only": 0,
    "p_value": pytest.approx(1 / 32),
  }
  # 3 vs 1 discordant: p = 2 * (1 + 4) / 16 = 0.625, the same either way round
  a, b = [True, True, True, False], [False, False, False, True]
  assert metrics.mcnemar(a, b)["p_value"] == pytest.approx(0.625) == metrics.mcnemar(b, a)["p_value"]
  assert metrics.mcnemar([True, False], [True, False])["p_value"] == 1.0  # no discordant trial
  with pytest.raises(ValueError, match="equal lengths"):
    metrics.mcnemar([True], [True, False])


def test_span_positions_are_the_tokens_that_spell_the_value():
  from experiments import spans

  class Tok:  # token i decodes to PIECES[i]
    PIECES = ["The", " number", " is", ":", " ", "8", "1", "9", "7", "04", "7", "."]

    def decode(self, ids):
      return "".join(self.PIECES[i] for i in ids)

  ids = list(range(len(Tok.PIECES)))
  assert spans.value_positions(Tok(), ids, "8197047") == [5, 6, 7, 8, 9, 10]
  with pytest.raises(ValueError, match="not in the prompt exactly once"):
    spans.value_positions(Tok(), ids, "1234567")
  with pytest.raises(ValueError, match="not in the prompt exactly once"):
    spans.value_positions(Tok(), ids + ids, "8197047")


def test_ruler_comparisons_pair_the_same_samples_per_share_and_pooled():
  def row(press, ratio, task, per_sample, nbytes):
    return {
      "length": 4096,
      "mode": "aware",
      "press": press,
      "ratio": ratio,
      "task": task,
      "per_sample": per_sample,
      "memory": {"allocated_bytes": nbytes},
    }

  rows = [
    row("full", None, "vt", [1.0, 1.0], 400),
    row("ada-snapkv", 0.5, "vt", [1.0, 0.5], 100),
    row("snapkv", 0.5, "vt", [0.0, 0.5], 100),
    row("ada-snapkv", 0.9, "vt", [1.0, 0.0], 21),
    row("snapkv", 0.9, "vt", [1.0, 1.0], 20),
  ]
  got = {tuple(c["kept"]): c for c in ruler.compare(rows)}
  assert set(got) == {(0.5,), (0.1,), (0.5, 0.1)}  # each share, then pooled; no pair without both presses
  half = got[(0.5,)]
  assert (half["a"], half["b"], half["n"], half["a_only"], half["b_only"]) == (
    "ada-snapkv",
    "snapkv",
    2,
    1,
    0,
  )
  assert half["recall_diff_mean"] == 0.5 and half["allocated_bytes_ratio"] == 1.0
  pooled = got[(0.5, 0.1)]
  assert (pooled["n"], pooled["a_only"], pooled["b_only"], pooled["allocated_bytes_ratio"]) == (
    4,
    1,
    1,
    1.0083,
  )


def test_paired_differences_give_the_mean_its_error_and_the_sign_test():
  got = metrics.paired_differences([1.0, 2.0, 3.0, 5.0], [2.0, 2.0, 1.0, 1.0])  # d = -1, 0, 2, 4
  assert (got["n"], got["a_lower"], got["a_higher"]) == (4, 1, 2)
  assert got["mean"] == pytest.approx(1.25)
  assert got["se"] == pytest.approx(np.std([-1, 0, 2, 4], ddof=1) / 2)
  assert got["sign_p"] == pytest.approx(1.0)  # 1 vs 2 of 3 non-ties: 2 * (1 + 3) / 8 = 1
  assert metrics.paired_differences([0.0] * 6, [1.0] * 6)["sign_p"] == pytest.approx(2 / 64)
  with pytest.raises(ValueError, match="equal"):
    metrics.paired_differences([1.0], [])


def _run(per_sample: list[float], allocated: int, granularity: str, outputs=("123",)):
  row = {"length": 1024, "task": "vt", "mode": "aware", "press": "snapkv", "ratio": 0.5, "kept": 0.5}
  samples = [
    {"length": 1024, "task": "vt", "index": i, "prompt_tokens": 900, "outputs": list(outputs)}
    for i in range(len(per_sample))
  ]
  return {
    "meta": {"args": {"granularity": granularity, "gqa": "kv"}},
    "results": [dict(row, per_sample=per_sample, memory={"allocated_bytes": allocated})],
    "samples": samples,
  }


def test_two_runs_on_the_same_samples_are_compared_press_by_press():
  page, token = _run([1.0, 1.0, 0.5, 1.0], 110, "page"), _run([0.0, 1.0, 0.5, 0.0], 100, "token")
  out = ruler.compare_runs(page, token, "token_run")
  assert out["differs"] == {"granularity": ["page", "token"]}
  (c,) = out["comparisons"]
  assert (c["a"], c["b"], c["kept"]) == ("snapkv", "snapkv", [0.5])
  # whole answers: page right on samples 0, 1, 3; token on 1 only; the partial recall counts for neither
  assert (c["a_correct"], c["b_correct"], c["a_only"], c["b_only"]) == (3, 1, 2, 0)
  assert c["p_value"] == pytest.approx(0.5)  # two discordant trials, both one way: 2 x (1/2)^2
  assert c["recall_diff_mean"] == pytest.approx(0.5)
  assert (c["recall_a_higher"], c["recall_a_lower"]) == (2, 0)  # the tied 0.5 carries no sign
  assert c["recall_sign_p"] == pytest.approx(0.5)
  assert c["allocated_bytes_ratio"] == pytest.approx(1.1)


def test_runs_on_different_samples_are_refused():
  with pytest.raises(ValueError, match="not the same samples"):
    ruler.compare_runs(_run([1.0], 1, "page"), _run([1.0], 1, "token", outputs=("456",)), "other")
  with pytest.raises(ValueError, match="1 against 2 samples"):
    ruler.compare_runs(_run([1.0], 1, "page"), _run([1.0, 1.0], 1, "token"), "other")


def test_ruler_kernel_flag_overrides_every_press_and_is_compared_as_a_setting():
  p = argparse.ArgumentParser()
  common.add_press_args(p, gqa=True, kernel=True)
  assert common.build_press("snapkv", p.parse_args([])).kernel == 7  # the preset's own
  assert common.build_press("h2o", p.parse_args([])).kernel == 1
  args = p.parse_args(["--kernel", "15"])
  assert [common.build_press(n, args).kernel for n in ("snapkv", "ada-snapkv", "h2o")] == [15, 15, 15]
  with pytest.raises(ValueError, match="odd integer"):
    common.build_press("snapkv", p.parse_args(["--kernel", "8"]))
  k15, k7 = _run([1.0], 1, "token"), _run([0.0], 1, "token")
  k15["meta"]["args"]["kernel"] = 15
  assert ruler.compare_runs(k15, k7, "k7")["differs"] == {"kernel": [15, None]}


def _fidelity_run(gqa: str, rows: list[tuple[int, int, list[float]]], reference="def f():"):
  """rows: (budget, allocated bytes, per-context KL) of snapkv, question-aware."""
  contexts = [
    {"context_tokens": 960, "question_tokens": 20, "reference": reference, "valid_positions": 32}
    for _ in rows[0][2]
  ]
  return {
    "meta": {"args": {"gqa": gqa, "model": None}},
    "contexts": contexts,
    "rows": [
      {
        "mode": "aware",
        "press": "snapkv",
        "budget": b,
        "allocated_bytes": nbytes,
        "allocated_mib": nbytes / 2**20,
        "per_context": {"kl_mean": kl, "top1_agreement": [0.5] * len(kl)},
      }
      for b, nbytes, kl in rows
    ],
  }


def test_fidelity_runs_are_compared_at_the_nearest_allocated_bytes():
  query = _fidelity_run("query", [(64, 300, [0.9, 0.8, 0.7])])
  kv = _fidelity_run("kv", [(64, 100, [2.0, 2.0, 2.0]), (128, 190, [1.0, 0.5, 0.2]), (256, 400, [0.1] * 3)])
  out = fidelity.compare_runs(query, kv, "kv_run")
  assert out["differs"] == {"gqa": ["query", "kv"]}  # model None is the default model on both sides
  (c,) = out["comparisons"]
  assert (c["a_budget"], c["b_budget"]) == (64, 256)  # 300/400 is nearer than 300/190 as a ratio
  assert c["allocated_bytes_ratio"] == pytest.approx(0.75)
  assert (c["kl"]["a_higher"], c["kl"]["a_lower"]) == (3, 0)
  assert c["kl"]["mean"] == pytest.approx(0.7)


def test_fidelity_runs_on_different_contexts_are_refused():
  a, b = _fidelity_run("query", [(64, 1, [0.1])]), _fidelity_run("kv", [(64, 1, [0.1])], reference="x = 1")
  with pytest.raises(ValueError, match="not the same contexts"):
    fidelity.compare_runs(a, b, "other")
