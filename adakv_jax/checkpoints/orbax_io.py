"""Saves/loads a converted model (params via orbax, config JSON, tokenizer files) for fast reloads.

Layout of a save dir:
  adakv_model.json   format marker + ModelConfig (dataclasses.asdict, RopeScaling nested) + the name, size and
                     crc32 of every other file; written last, so a dir without it is never taken for a save
  params/            orbax StandardCheckpointer tree
  tokenizer.json, tokenizer_config.json   (Tokenizer.save; absent when saved without a tokenizer)

A save is written into a temporary dir beside the target and renamed into place only when complete, so an
interrupted save leaves the target as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import zlib
from pathlib import Path

from adakv_jax.checkpoints.errors import CheckpointError
from adakv_jax.checkpoints.layout import check_params
from adakv_jax.config import ModelConfig, RopeScaling

_log = logging.getLogger(__name__)

MARKER = "adakv_model.json"
FORMAT = "adakv-jax/orbax-v1"
OUR_ENTRIES = frozenset({MARKER, "params", "tokenizer.json", "tokenizer_config.json"})
_MAX_NAMED = 5


class SaveTargetError(CheckpointError):
  """The save target holds something save_converted will not replace.

  The message names the option that would allow the replacement where one would; `for_option` words it for
  a caller whose option is spelt differently (the CLI's `--overwrite`)."""

  def __init__(self, template: str):
    self.template = template
    super().__init__(self.for_option("overwrite=True"))

  def for_option(self, option: str) -> str:
    return self.template.replace("{option}", option)


def is_converted_dir(path: str | os.PathLike) -> bool:
  return (Path(path) / MARKER).is_file()


def config_to_dict(cfg: ModelConfig) -> dict:
  return dataclasses.asdict(cfg)


def config_from_dict(d: dict) -> ModelConfig:
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise CheckpointError(f"saved config has fields this version does not know: {', '.join(unknown)}")
  return ModelConfig(**d)


def check_save_target(path: str | os.PathLike, overwrite: bool = False) -> None:
  """Raises SaveTargetError unless `path` is absent, an empty dir, or (with overwrite) a converted model.

  Callers with slow work before the save (loading the source model) check first, to fail in seconds."""
  check_target(
    path,
    overwrite,
    marker=MARKER,
    entries=OUR_ENTRIES,
    kind="a converted adakv-jax model",
    short="a converted model",
  )


def check_target(path, overwrite: bool, *, marker: str, entries: frozenset, kind: str, short: str) -> None:
  """check_save_target for any save written by `write_and_swap`: `marker` names its kind, `entries` the
  top-level names it writes."""
  path = Path(path).absolute()
  if not path.exists():
    return
  if not path.is_dir():
    raise SaveTargetError(f"{str(path)!r} exists and is not a directory")
  names = [e.name + ("/" if e.is_dir() else "") for e in sorted(path.iterdir())]
  if not names:
    return
  if not (path / marker).is_file():
    raise SaveTargetError(
      f"{str(path)!r} is not empty and is not {kind} (it holds {_some(names)}); "
      f"refusing to replace it, even with {{option}}, which only replaces {short} or an empty "
      "directory"
    )
  foreign = [n for n in names if n.rstrip("/") not in entries]
  if foreign:
    raise SaveTargetError(
      f"{str(path)!r} is {short} but also holds {_some(foreign)}; refusing to replace it, "
      "even with {option}, until those are moved out"
    )
  if not overwrite:
    raise SaveTargetError(f"{str(path)!r} exists and is not empty ({short}); pass {{option}} to replace it")


def save_converted(
  path: str | os.PathLike, cfg: ModelConfig, params, tokenizer=None, *, overwrite: bool = False
) -> Path:
  """Writes params (orbax), the config and the tokenizer under `path`.

  An existing `path` is replaced only when empty or, with overwrite, when it is a converted model holding
  nothing else; the new save is complete on disk before the old one is removed."""
  path = Path(path).absolute()
  check_save_target(path, overwrite)
  return write_and_swap(path, lambda staging: _write_save(staging, cfg, params, tokenizer))


def write_and_swap(path: Path, write) -> Path:
  """write(staging_dir) fills a fresh dir beside `path` (its marker last), which then replaces `path`:
  an interrupted save leaves `path` as it was and no staging dir behind."""
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = _fresh_sibling(path, "partial")
  try:
    write(staging)
    _swap_into_place(staging, path)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return path


def _write_save(out: Path, cfg: ModelConfig, params, tokenizer) -> None:
  import orbax.checkpoint as ocp

  with contextlib.closing(ocp.StandardCheckpointer()) as ckpt:
    ckpt.save(out / "params", params)
    ckpt.wait_until_finished()
  if tokenizer is not None:
    tokenizer.save(out)
  write_marker(out, MARKER, {"format": FORMAT, "config": config_to_dict(cfg)})


def write_marker(out: Path, marker: str, meta: dict) -> None:
  """The marker, written last: `meta` and the name, size and crc32 of every file written before it."""
  files = {rel: _file_record(out / rel) for rel in _relative_files(out)}
  (out / marker).write_text(json.dumps({**meta, "files": files}, indent=2))


def _swap_into_place(staging: Path, path: Path) -> None:
  """Renames the finished save to `path`; an old save is moved aside first and deleted only after."""
  if not path.exists():
    staging.rename(path)
    return
  if not any(path.iterdir()):
    path.rmdir()
    staging.rename(path)
    return
  old = _fresh_sibling(path, "old")
  path.rename(old / path.name)
  staging.rename(path)
  shutil.rmtree(old)


def _fresh_sibling(path: Path, kind: str) -> Path:
  """A new hidden dir beside `path` (same filesystem, so renames are atomic), made with the usual umask."""
  sibling = path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
  sibling.mkdir()
  return sibling


def _relative_files(root: Path) -> list[str]:
  return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _file_record(file: Path) -> dict:
  return {"bytes": file.stat().st_size, "crc32": _crc32(file)}


def _crc32(file: Path) -> int:
  crc = 0
  with open(file, "rb") as fh:
    while chunk := fh.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _some(names: list[str]) -> str:
  more = len(names) - _MAX_NAMED
  return ", ".join(names[:_MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def load_converted(path: str | os.PathLike):
  """(ModelConfig, params, Tokenizer | None) from a directory written by save_converted."""
  from adakv_jax.checkpoints.tokenizer import Tokenizer

  path = Path(path).absolute()
  meta = _read_marker(path)
  cfg = config_from_dict(meta["config"])
  files = meta.get("files")  # absent in saves written before the file list existed
  if files is not None:
    _check_files_present(path, files)
  params = _restore_params(path, files)
  check_params(cfg, params, str(path))
  tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
  return cfg, params, tok


def read_format_json(file: Path, fmt: str) -> dict:
  """The JSON object a save's marker file holds, refused unless it declares format FMT."""
  try:
    meta = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file} is not valid JSON: {e}") from None
  if not isinstance(meta, dict) or meta.get("format") != fmt:
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    raise CheckpointError(f"{file} has format {found!r}, expected {fmt!r}")
  return meta


def _read_marker(path: Path) -> dict:
  if not is_converted_dir(path):
    raise CheckpointError(f"{str(path)!r} is not a converted adakv-jax model (no {MARKER})")
  meta = read_format_json(path / MARKER, FORMAT)
  if not isinstance(meta.get("config"), dict):
    raise CheckpointError(f"{path / MARKER} has no model config")
  return meta


def _damaged(path: Path, what: str) -> CheckpointError:
  return CheckpointError(
    f"the converted checkpoint {str(path)!r} is incomplete or corrupted: {what}; convert the model again"
  )


def _check_files_present(path: Path, files: dict, damaged=_damaged) -> None:
  """Every file the save wrote is there with its size: names a deleted, truncated or extended file."""
  missing = [rel for rel in files if not (path / rel).is_file()]
  if missing:
    raise damaged(path, f"missing {_some(missing)} ({len(missing)} of {len(files)} files)")
  resized = [
    f"{rel} is {(path / rel).stat().st_size} bytes, expected {rec['bytes']}"
    for rel, rec in files.items()
    if (path / rel).stat().st_size != rec["bytes"]
  ]
  if resized:
    raise damaged(path, _some(resized))


def _restore_params(path: Path, files: dict | None):
  return restore_tree(path, "params", files)


def restore_tree(path: Path, name: str, files: dict | None, damaged=_damaged):
  """The orbax tree under path/name; a failure names the files whose crc32 changed since the save."""
  import orbax.checkpoint as ocp

  try:
    with _event_loops_drained_on_close(), contextlib.closing(ocp.StandardCheckpointer()) as ckpt:
      return ckpt.restore(path / name)
  except Exception as e:  # orbax raises a variety of errors for missing or damaged trees
    changed = [rel for rel, rec in (files or {}).items() if _crc32(path / rel) != rec["crc32"]]
    if changed:
      raise damaged(path, f"{_some(changed)} changed since the save (crc32 differs)") from None
    raise damaged(path, f"cannot restore {name}/: {_root_cause(e)}") from None


def _root_cause(e: BaseException) -> str:
  """The innermost error's first line: tensorstore's own message, without the spec dump orbax appends."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  line = (str(e).splitlines() or [""])[0].split(" See full TensorStore details")[0]
  return line or type(e).__name__


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that cancels and awaits its pending tasks before closing, as asyncio.run does.

  orbax runs each restore on a fresh loop and closes it as soon as the first array read fails. The reads still
  in flight then complete onto the closed loop ("RuntimeError: Event loop is closed" printed by tensorstore's
  threads) and their abandoned coroutines print their errors again when garbage-collected. Reads that failed
  before the close hold an exception nobody retrieves, which asyncio would print ("Task exception was never
  retrieved", with a traceback): the restore has already raised one error naming the damage, so these go to
  the debug log."""

  def __init__(self):
    super().__init__()
    self.set_exception_handler(_abandoned_reads_to_debug_log)

  def close(self):
    if not self.is_closed() and not self.is_running():
      pending = asyncio.all_tasks(self)
      for task in pending:
        task.cancel()
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


def _abandoned_reads_to_debug_log(loop: asyncio.AbstractEventLoop, context: dict) -> None:
  if context.get("message", "").endswith("exception was never retrieved"):
    _log.debug("a read of the failed restore also failed: %r", context.get("exception"))
  else:
    loop.default_exception_handler(context)


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self):
    return _DrainingLoop()


@contextlib.contextmanager
def _event_loops_drained_on_close():
  """Inside, every loop asyncio.new_event_loop() makes (orbax makes one per restore) drains before closing."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)
