"""Repository contracts: CI runs exactly the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  ci_cmd = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l.startswith("python3 -m venv")]
  assert len(ci_cmd) == 1
  readme_lines = (ROOT / "README.md").read_text().splitlines()
  assert ci_cmd[0] in readme_lines
  assert ci_cmd[0].endswith("python -m pytest -q")


def test_constraints_pin_the_lower_bounds_of_the_core_packages():
  pins = dict(l.split("==") for l in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in l and not l.startswith("#"))
  deps = (ROOT / "pyproject.toml").read_text()
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
    assert f'"{pkg}>={pins[pkg]}"' in deps, pkg
