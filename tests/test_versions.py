"""The import-time guard against known-broken dependency pairs (merr1_jax/_versions.py)."""

import pathlib
import re
import subprocess
import sys

import pytest

from merr1_jax import _versions
from tests.helpers.locks import lock


@pytest.mark.parametrize("jax_v,flax_v,broken", [
    ("0.10.2", "0.12.8", False),  # the pinned set
    ("0.11.1", "0.12.8", True),  # the first jax without MutableHiType
    ("0.11.2", "0.12.3", True),  # the CUDA 13 image's jax with an old flax
    ("0.12.0.1", "0.12.8", True),
    ("0.11.2", "0.12.9", False),  # flax 0.12.9 restored compatibility
    ("0.12.0.1", "0.12.12", False),
    ("0.11.0", "0.12.8", False),
    ("0.11.1rc1", "0.12.8", True),
    (None, "0.12.8", False),  # not installed: nothing to say
])
def test_broken_pairs(jax_v, flax_v, broken):
  msg = _versions.broken_pair(jax_v, flax_v)
  assert (msg is not None) == broken
  if broken:
    assert f"flax {flax_v}" in msg and f"jax {jax_v}" in msg and "pip install 'flax>=0.12.9'" in msg


def test_importing_with_a_broken_pair_fails_at_once_with_the_message():
  """In a child whose metadata reports jax 0.11.2 and flax 0.12.8: `import merr1_jax` raises ImportError naming
  both, before anything imports flax."""
  code = ("import importlib.metadata as m, sys\n"
          "real = m.version\n"
          "m.version = lambda n: {'jax': '0.11.2', 'flax': '0.12.8'}.get(n) or real(n)\n"
          "try:\n"
          "  import merr1_jax\n"
          "except ImportError as e:\n"
          "  print('refused:', e); print('flax' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert "refused: merr1_jax: flax 0.12.8 cannot run on jax 0.11.2" in out and out.strip().endswith("False"), out


@pytest.mark.parametrize("installed,expected", [
    ({"jax": "0.11.2", "flax": "0.12.3", "grain": None, "array-record": None}, ["grain", "array-record", "flax"]),
    ({"jax": "0.11.2", "flax": "0.12.9", "grain": "0.2.18", "array-record": None}, ["array-record"]),
    ({"jax": "0.10.2", "flax": "0.12.8", "grain": "0.2.18", "array-record": "0.8.6"}, []),
    ({"jax": "0.12.0.1", "flax": None, "grain": "0.2.18", "array-record": "0.8.6"}, ["flax"]),
])
def test_what_the_gpu_script_installs(installed, expected):
  assert _versions.to_install(installed, ("grain", "array-record")) == expected


def test_the_gpu_scripts_helper_runs_as_a_file_on_the_installed_set():
  """benchmarks/gpu.sh runs the module as a file: here, with the lane's own working set, nothing is missing."""
  out = subprocess.run([sys.executable, _versions.__file__, "grain", "array-record", "ml-collections"],
                       capture_output=True, text=True, check=True).stdout
  assert out.strip() == ""


def _pyproject_requirements():
  import tomllib
  from packaging.requirements import Requirement
  root = pathlib.Path(__file__).resolve().parent.parent
  project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
  return root, [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["test"]]]


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_each_lock_file_lies_inside_the_declared_ranges(python):
  """The lock files are what CI and the README install: every requirement that applies on that Python is locked,
  at a version its range admits (so a tested set never contradicts the package's metadata)."""
  root, reqs = _pyproject_requirements()
  locked = lock(python)
  env = {"python_version": python, "python_full_version": f"{python}.0", "extra": "test"}
  applied = [r for r in reqs if r.marker is None or r.marker.evaluate(env)]
  assert len(applied) >= 30
  for r in applied:
    name = r.name.lower().replace("_", "-")
    assert name in locked, f"{name} is not in lock-py{python}.txt"
    assert r.specifier.contains(locked[name], prereleases=False), f"{name}=={locked[name]} is outside {r.specifier}"
  if python == "3.12":  # torch stays off the 3.12 lane: PyPI has only CUDA builds there
    assert "torch" not in locked and not any(r.name == "torch" for r in applied)


def test_each_runtime_floor_is_the_oldest_tested_release():
  """A floor is the version the Python 3.11 lane (the oldest set) installs: the suite has passed on it."""
  root, reqs = _pyproject_requirements()
  locked = lock("3.11")
  for r in reqs:
    if r.marker is not None and not r.marker.evaluate({"python_version": "3.11", "extra": "test"}):
      continue
    floors = [s.version for s in r.specifier if s.operator in (">=", "==")]
    assert floors == [locked[r.name.lower().replace("_", "-")]], (r.name, floors)


def test_ci_runs_the_readmes_test_command_and_a_python_3_12_lane_over_the_suite_less_named_tests():
  root = pathlib.Path(__file__).resolve().parent.parent
  readme, ci = (root / "README.md").read_text(), (root / ".ci" / "run").read_text()
  test_cmd = next(l for l in readme.splitlines() if l.startswith("python3 -m venv") and "pytest" in l)
  assert "-c requirements/lock-py3.11.txt" in test_cmd and f"{test_cmd} || exit 1" in ci.splitlines()
  assert "-c requirements/lock-py3.12.txt" in ci and 'tests "${deselect[@]}"' in ci
  # Every entry names a test file, and a test function there whose name starts with the entry's function part: a
  # prefix that matches nothing would deselect nothing, silently, after a rename.
  listed = [l.split("#")[0].strip() for l in (root / ".ci" / "py312_deselect.txt").read_text().splitlines()]
  listed = [l for l in listed if l]
  assert listed
  for entry in listed:
    path, _, name = entry.partition("::")
    assert (root / path).is_file(), entry
    defs = re.findall(r"^def (test_\w+)\(", (root / path).read_text(), flags=re.M)
    assert not name or any(d.startswith(name.split("[")[0]) for d in defs), entry
    assert "[" not in name or name.split("[")[0] in defs, entry
