"""What a careful new user hits when something is wrong: each bad input or damaged file is refused with a
message that names it, before any slow work where possible, with exit code 2 and no traceback.

Runs on a tiny random checkpoint (tests/parity/tiny_hf.py) converted once per module; the damaged-checkpoint
cases run the CLI in a subprocess, since the noise they guard against is printed by background threads and at
exit.
"""

import asyncio
import gc
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from adakv_jax.checkpoints import (
  CheckpointError,
  SaveTargetError,
  is_converted_dir,
  load_converted,
  load_model,
  orbax_io,
  save_converted,
)
from adakv_jax.cli import main
from adakv_jax.generation import Sampling
from tests.parity import tiny_hf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  return tiny_hf.build_numpy(tmp_path_factory.mktemp("hf") / "tiny", "llama_gqa_tied")


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("conv") / "tiny-orbax"
  assert main(["convert", "--model", str(hf_dir), "--out", str(out)]) == 0
  return out


def _copy(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


def _largest_data_file(ckpt: Path) -> Path:
  return max((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _params_equal(a, b) -> bool:
  import jax

  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def _run_cli(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "adakv_jax", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# --- convert: what --overwrite may replace ------------------------------------------------------------------


def test_overwrite_refuses_a_directory_that_is_not_a_converted_model(hf_dir, tmp_path, capsys):
  target = tmp_path / "mine"
  (target / "sub").mkdir(parents=True)
  (target / "notes.txt").write_text("keep me")
  assert main(["convert", "--model", str(hf_dir), "--out", str(target), "--overwrite"]) == 2
  err = capsys.readouterr().err
  assert str(target) in err and "not a converted adakv-jax model" in err
  assert "notes.txt" in err and "sub/" in err and "--overwrite" in err
  assert (target / "notes.txt").read_text() == "keep me" and (target / "sub").is_dir()


def test_the_target_is_checked_before_the_source_model_loads(tmp_path, capsys):
  target = tmp_path / "mine"
  target.mkdir()
  (target / "notes.txt").write_text("keep me")
  assert main(["convert", "--model", str(tmp_path / "no-such-model"), "--out", str(target)]) == 2
  assert "not a converted adakv-jax model" in capsys.readouterr().err


def test_a_converted_model_is_replaced_only_with_overwrite_and_the_message_names_the_flag(
  converted, hf_dir, tmp_path, capsys
):
  target = _copy(converted, tmp_path / "conv")
  assert main(["convert", "--model", str(hf_dir), "--out", str(target)]) == 2
  err = capsys.readouterr().err
  assert str(target) in err and "not empty" in err and "--overwrite" in err and "overwrite=True" not in err
  assert main(["convert", "--model", str(hf_dir), "--out", str(target), "--overwrite"]) == 0
  assert is_converted_dir(target)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # no staging or old copy left beside it


def test_the_api_names_its_own_keyword(converted, tmp_path):
  target = _copy(converted, tmp_path / "conv")
  cfg, params, tok = load_converted(target)
  with pytest.raises(SaveTargetError, match=r"pass overwrite=True"):
    save_converted(target, cfg, params, tok)


def test_an_empty_directory_is_filled_without_overwrite(hf_dir, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  assert main(["convert", "--model", str(hf_dir), "--out", str(tmp_path / "empty")]) == 0
  assert is_converted_dir(tmp_path / "empty")


def test_a_converted_model_that_also_holds_other_files_is_not_replaced(converted, hf_dir, tmp_path, capsys):
  target = _copy(converted, tmp_path / "conv")
  (target / "notes.txt").write_text("keep me")
  assert main(["convert", "--model", str(hf_dir), "--out", str(target), "--overwrite"]) == 2
  err = capsys.readouterr().err
  assert str(target) in err and "notes.txt" in err
  assert (target / "notes.txt").read_text() == "keep me"


def test_a_target_that_is_a_file_is_refused(hf_dir, tmp_path, capsys):
  (tmp_path / "f").write_text("x")
  assert main(["convert", "--model", str(hf_dir), "--out", str(tmp_path / "f"), "--overwrite"]) == 2
  assert "not a directory" in capsys.readouterr().err


class _FailingTokenizer:
  def save(self, path):
    raise OSError("No space left on device")


def test_a_failed_replacement_keeps_the_old_save(converted, tmp_path):
  target = _copy(converted, tmp_path / "conv")
  cfg, params, _ = load_converted(target)
  with pytest.raises(OSError, match="No space"):
    save_converted(target, cfg, params, _FailingTokenizer(), overwrite=True)
  cfg2, params2, tok2 = load_converted(target)
  assert cfg2 == cfg and tok2 is not None and _params_equal(params, params2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]
  with pytest.raises(OSError, match="No space"):
    save_converted(tmp_path / "fresh", cfg, params, _FailingTokenizer())
  assert not (tmp_path / "fresh").exists()


def test_a_save_killed_before_its_marker_is_never_taken_for_complete(converted, tmp_path):
  """The process dies (no cleanup runs) after params and tokenizer are written, just before the marker."""
  target = _copy(converted, tmp_path / "conv")
  script = textwrap.dedent(f"""
      import os
      from adakv_jax.checkpoints import load_converted, orbax_io
      cfg, params, tok = load_converted({str(target)!r})
      orbax_io.config_to_dict = lambda cfg: os._exit(9)
      orbax_io.save_converted({str(target)!r}, cfg, params, tok, overwrite=True)
  """)
  proc = subprocess.run(
    [sys.executable, "-c", script],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 9, proc.stderr
  load_converted(target)  # the old save is still whole
  partial = [p for p in tmp_path.iterdir() if p.name != "conv"]
  assert len(partial) == 1 and (partial[0] / "params").is_dir() and (partial[0] / "tokenizer.json").is_file()
  assert not is_converted_dir(partial[0])
  with pytest.raises(CheckpointError):
    load_model(partial[0])


# --- loading a damaged converted checkpoint -----------------------------------------------------------------


def _delete(f: Path):
  f.unlink()


def _truncate(f: Path):
  f.write_bytes(f.read_bytes()[:1000])


def _overwrite_in_place(f: Path):  # same size, different bytes: only the content check can tell
  f.write_bytes(bytes(b ^ 0xFF for b in f.read_bytes()))


@pytest.mark.parametrize(
  "damage,says",
  [
    (_delete, "missing {rel}"),
    (_truncate, "{rel} is 1000 bytes, expected"),
    (_overwrite_in_place, "{rel} changed since the save"),
  ],
)
def test_a_damaged_checkpoint_names_the_file_and_exits_cleanly(converted, tmp_path, damage, says):
  ckpt = _copy(converted, tmp_path / "conv")
  data = _largest_data_file(ckpt)
  damage(data)
  proc = _run_cli("generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1")
  assert proc.returncode == 2
  assert f"the converted checkpoint {str(ckpt)!r} is incomplete or corrupted" in proc.stderr
  assert says.format(rel=data.relative_to(ckpt).as_posix()) in proc.stderr
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_a_damaged_checkpoint_without_a_file_list_gives_tensorstores_reason_in_one_line(converted, tmp_path):
  """A save whose marker lists no files: the damage surfaces inside orbax's concurrent reads."""
  ckpt = _copy(converted, tmp_path / "conv")
  marker = json.loads((ckpt / orbax_io.MARKER).read_text())
  del marker["files"]
  (ckpt / orbax_io.MARKER).write_text(json.dumps(marker))
  _delete(_largest_data_file(ckpt))
  proc = _run_cli("generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1")
  assert proc.returncode == 2
  assert "is incomplete or corrupted: cannot restore params/" in proc.stderr
  assert "Error reading" in proc.stderr and "TensorStore" not in proc.stderr
  assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
  assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_a_missing_params_dir_is_named(converted, tmp_path):
  ckpt = _copy(converted, tmp_path / "conv")
  shutil.rmtree(ckpt / "params")
  with pytest.raises(CheckpointError, match=r"incomplete or corrupted: missing params/"):
    load_converted(ckpt)


def test_a_restore_that_fails_part_way_leaves_no_read_pending_on_a_closed_loop():
  """orbax's pattern: a fresh loop per restore, closed as soon as the first of many concurrent reads fails."""
  reads = []

  async def read(ok: bool):
    if not ok:
      raise OSError("bad chunk")
    await asyncio.sleep(60)

  async def restore():
    reads.extend(asyncio.ensure_future(read(ok)) for ok in (True, False, True))
    await asyncio.gather(*reads)

  before = asyncio.get_event_loop_policy()
  with orbax_io._event_loops_drained_on_close():
    loop = asyncio.new_event_loop()
    with pytest.raises(OSError, match="bad chunk"):
      loop.run_until_complete(restore())
    loop.close()
  assert loop.is_closed() and all(r.done() for r in reads)
  assert asyncio.get_event_loop_policy() is before


def test_a_read_that_failed_beside_the_first_is_not_printed_when_collected(caplog):
  """A sibling read done with its own error before the loop closes: nobody retrieves it, and asyncio would
  print it with a traceback when the task is garbage-collected, after the restore's one clear error."""

  async def read():
    raise OSError("second bad chunk")

  async def restore():
    asyncio.ensure_future(read())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    raise OSError("bad chunk")

  with orbax_io._event_loops_drained_on_close():
    loop = asyncio.new_event_loop()
    try:
      loop.run_until_complete(restore())
    except OSError as e:
      assert str(e) == "bad chunk"
    loop.close()
  gc.collect()
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# --- generate: bad input is refused before the model loads --------------------------------------------------


def _generate_err(capsys, *args) -> str:
  """Runs generate on a model path that does not exist: a model error would mean it got that far."""
  assert main(["generate", "--model", "/no/such/model", *args]) == 2
  err = capsys.readouterr().err
  assert "neither a registered model" not in err
  return err


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path, capsys):
  f = tmp_path / "prompt.txt"
  f.write_bytes("Résumé of the café".encode("latin-1"))
  err = _generate_err(capsys, "--prompt-file", str(f))
  assert str(f) in err and "not UTF-8" in err and "offset 1" in err
  assert "Traceback" not in err


def test_a_missing_prompt_file_is_named(tmp_path, capsys):
  err = _generate_err(capsys, "--prompt-file", str(tmp_path / "nope.txt"))
  assert f"cannot read --prompt-file {str(tmp_path / 'nope.txt')!r}" in err and "No such file" in err


def test_a_prompt_file_may_start_with_a_byte_order_mark(tmp_path, capsys, monkeypatch):
  class PromptEcho:  # the tokenizer refuses every prompt, naming the text it was given
    def encode_chat(self, text, questions=(), raw=False):
      raise ValueError(f"prompt text {text!r}")

  monkeypatch.setattr("adakv_jax.checkpoints.load_model", lambda *_, **__: (None, None, PromptEcho()))
  f = tmp_path / "bom.txt"
  f.write_bytes(b"\xef\xbb\xbfHello")
  assert main(["generate", "--model", "any", "--prompt-file", str(f)]) == 2
  assert "prompt text 'Hello'" in capsys.readouterr().err


@pytest.mark.parametrize(
  "flag,value",
  [
    ("--budget", "64"),
    ("--compression-ratio", "0.5"),
    ("--window", "8"),
    ("--kernel", "5"),
    ("--pool", "avg"),
    ("--floor-alpha", "0.3"),
    ("--floor-mode", "mix"),
    ("--gqa", "query"),
  ],
)
def test_compression_flags_are_refused_without_compression(capsys, flag, value):
  err = _generate_err(capsys, "--prompt", "hi", "--press", "full", flag, value)
  assert f"{flag} has no effect with --press full" in err and "no compression" in err


def test_every_ignored_flag_is_named(capsys):
  err = _generate_err(capsys, "--prompt", "hi", "--budget", "64", "--window", "8")  # press full: the default
  assert "--budget, --window have no effect with --press full" in err


@pytest.mark.parametrize(
  "flag,value,says",
  [
    ("--temperature", "nan", "temperature must be a finite number"),
    ("--temperature", "inf", "temperature must be a finite number"),
    ("--temperature", "-0.5", "temperature must be >= 0"),
    ("--temperature", "1e-40", "temperature must be 0 (greedy) or >= 1e-06"),
    ("--top-p", "nan", "top_p must be a finite number"),
    ("--top-p=-inf", None, "top_p must be a finite number"),
    ("--top-p", "0", "top_p must be in (0, 1]"),
    ("--top-p", "1.5", "top_p must be in (0, 1]"),
  ],
)
def test_bad_sampling_flags_are_refused(capsys, flag, value, says):
  assert says in _generate_err(capsys, "--prompt", "hi", flag, *([value] if value is not None else []))


@pytest.mark.parametrize(
  "kw,error,says",
  [
    (dict(temperature=math.nan), ValueError, "temperature must be a finite number, got nan"),
    (dict(top_p=math.inf), ValueError, "top_p must be a finite number, got inf"),
    (dict(temperature="0.7"), TypeError, "temperature must be a real number, got str"),
    (dict(top_p=None), TypeError, "top_p must be a real number, got NoneType"),
    (dict(temperature=True), TypeError, "temperature must be a real number, got bool"),
    (dict(top_p=np.array([0.9])), TypeError, "top_p must be a real number, got ndarray"),
  ],
)
def test_sampling_refuses_non_finite_and_non_numeric_settings(kw, error, says):
  with pytest.raises(error, match=says.replace("(", r"\(")):
    Sampling(**kw)


def test_sampling_settings_are_plain_floats_so_equal_settings_share_a_compiled_step():
  s = Sampling(1, np.float32(0.5))
  assert type(s.temperature) is float and type(s.top_p) is float
  assert s == Sampling(1.0, 0.5) and hash(s) == hash(Sampling(1.0, 0.5))
