"""Repository contracts: CI runs exactly the README's test command, the tree is lint-clean and formatted,
and nothing outside the library reaches its private names."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  ci_cmd = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l.startswith("python3 -m venv")]
  assert len(ci_cmd) == 1
  readme_lines = (ROOT / "README.md").read_text().splitlines()
  assert ci_cmd[0] in readme_lines
  assert ci_cmd[0].endswith("python -m pytest -q")


def test_constraints_pin_the_lower_bounds_of_the_core_packages():
  pins = dict(
    l.split("==")
    for l in (ROOT / "constraints.txt").read_text().splitlines()
    if "==" in l and not l.startswith("#")
  )
  deps = (ROOT / "pyproject.toml").read_text()
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
    assert f'"{pkg}>={pins[pkg]}"' in deps, pkg


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_the_tree_passes_the_configured_linter_and_formatter(args):
  if shutil.which("ruff") is None:
    pytest.skip("ruff is in the test extra; not installed here")
  run = subprocess.run(["ruff", *args], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


# ---- the library's boundary: public names only, experiments as a package -----------------------------

LIBRARY = "adakv_jax"
# Private names that tests reach until the library offers them publicly (a test seam or a name table of the
# checkpoint loaders); each entry is (file, name), and the test below fails once a use is gone, so the list
# only shrinks. This file is not scanned: it names private names as data.
AWAITING_PUBLIC_NAMES = {
  ("tests/parity/hf_gguf.py", "adakv_jax.checkpoints.gguf._reader_class"),
  ("tests/test_assembly.py", "adakv_jax.checkpoints.assembly._concatenate"),
  ("tests/test_failure_paths.py", "adakv_jax.checkpoints.orbax_io._event_loops_drained_on_close"),
  ("tests/test_params.py", "adakv_jax.checkpoints.gguf._BLOCK_NAMES"),
  ("tests/test_params.py", "adakv_jax.checkpoints.gguf._GLOBAL_NAMES"),
}
# Owned by the device check, which also runs it on a device machine where the package is not installed.
SYS_PATH_EXEMPT = {"experiments/device_check.py"}


def _sources_outside_library() -> list[Path]:
  skip = {"build", "dist", "__pycache__"}
  return sorted(
    p
    for p in ROOT.rglob("*.py")
    if p.relative_to(ROOT).parts[0] != LIBRARY
    and p != Path(__file__).resolve()
    and not any(
      part.startswith(".") or part in skip or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts
    )
  )


def _is_library_module(dotted: str) -> bool:
  path = ROOT.joinpath(*dotted.split("."))
  if dotted.split(".")[0] != LIBRARY:
    return False
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library_private_names(tree) -> set[str]:
  """Dotted library names that are private, as this module uses them: imported by name, read as an
  attribute of a library module (at any depth of submodules), or named in a string (monkeypatch.setattr,
  getattr)."""
  import ast
  import re

  modules, found = {}, set()  # local name -> library module it is bound to
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == LIBRARY:
          modules[a.asname or LIBRARY] = a.name if a.asname else LIBRARY
          if any(_private(part) for part in a.name.split(".")):
            found.add(a.name)
    elif (
      isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == LIBRARY
    ):
      if any(_private(part) for part in node.module.split(".")):
        found.add(node.module)
      for a in node.names:
        if _private(a.name):
          found.add(f"{node.module}.{a.name}")
        elif _is_library_module(f"{node.module}.{a.name}"):
          modules[a.asname or a.name] = f"{node.module}.{a.name}"

  def module_of(expr):
    if isinstance(expr, ast.Name):
      return modules.get(expr.id)
    if isinstance(expr, ast.Attribute):
      base = module_of(expr.value)
      if base is not None and _is_library_module(f"{base}.{expr.attr}"):
        return f"{base}.{expr.attr}"
    return None

  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _private(node.attr):
      base = module_of(node.value)
      if base is not None:
        found.add(f"{base}.{node.attr}")
    elif (
      isinstance(node, ast.Call)
      and len(node.args) >= 2
      and isinstance(node.args[1], ast.Constant)
      and isinstance(node.args[1].value, str)
      and _private(node.args[1].value)
    ):
      base = module_of(node.args[0])
      if base is not None:
        found.add(f"{base}.{node.args[1].value}")
    elif (
      isinstance(node, ast.Constant)
      and isinstance(node.value, str)
      and re.fullmatch(rf"{LIBRARY}(\.[A-Za-z]\w*)*\._\w+", node.value)
      and _private(node.value.split(".")[-1])
    ):
      found.add(node.value)
  return found


def test_nothing_outside_the_library_uses_its_private_names():
  import ast

  uses = {
    (str(p.relative_to(ROOT)), name)
    for p in _sources_outside_library()
    for name in _library_private_names(ast.parse(p.read_text(encoding="utf-8")))
  }
  assert uses - AWAITING_PUBLIC_NAMES == set(), "private library names used outside adakv_jax/"
  assert AWAITING_PUBLIC_NAMES - uses == set(), "no longer used: drop from AWAITING_PUBLIC_NAMES"


def test_the_private_name_check_sees_every_way_of_reaching_one():
  import ast

  code = """
import adakv_jax.model
import adakv_jax._hidden
from adakv_jax._hidden import thing
from adakv_jax import model as model_lib, generation
from adakv_jax.checkpoints import gguf
from adakv_jax.generation import _hidden_helper, generate
a = model_lib._qkv
b = adakv_jax.model._out_and_mlp
c = generation.decode_loop._cache_size  # an attribute of a public function, not a library name
monkeypatch.setattr(gguf, "_reader_class", None)
monkeypatch.setattr("adakv_jax.cli._read_prompt_file", None)
d = model_lib.__name__
"""
  assert _library_private_names(ast.parse(code)) == {
    "adakv_jax.model._qkv",
    "adakv_jax.model._out_and_mlp",
    "adakv_jax.generation._hidden_helper",
    "adakv_jax.checkpoints.gguf._reader_class",
    "adakv_jax.cli._read_prompt_file",
    "adakv_jax._hidden",
  }


def test_experiments_are_a_package_that_never_edits_sys_path():
  import ast

  assert (ROOT / "experiments" / "__init__.py").is_file()
  edits = []
  for path in sorted((ROOT / "experiments").rglob("*.py")):
    rel = str(path.relative_to(ROOT))
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if (
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
        and rel not in SYS_PATH_EXEMPT
      ):
        edits.append(f"{rel}:{node.lineno}")
      if isinstance(node, ast.Constant) and node.value == "PYTHONPATH" and rel not in SYS_PATH_EXEMPT:
        edits.append(f"{rel}:{node.lineno}")
  assert edits == []
