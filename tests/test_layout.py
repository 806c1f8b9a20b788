"""The package layout (docs/architecture.md "Layout"): layers whose imports only point down, a small root, no
module that grows past 400 lines, and the README's layout table naming every folder."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "merr1_jax"

# Lowest first. A module may import its own layer and the layers before it, never a later one.
LAYERS = ["_versions", "models", "emotion", "rl", "infra", "task", "data", "config", "cli", "rollout", "evaluation",
          "training", "train", "evaluate", "metrics", "__init__"]
# Modules already over 400 lines, at most their current length: they may shrink, not grow (issue 25 splits them).
OVERSIZE: dict[str, int] = {}


def _layer(module: str) -> str:
  """'merr1_jax.training.step' -> 'training'; a root module is its own layer."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: pathlib.Path) -> set[str]:
  """The merr1_jax modules (or packages) `path` imports, at any depth of the file."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("merr1_jax"):
      for alias in node.names:
        cand = f"{node.module}.{alias.name}"
        as_path = ROOT / cand.replace(".", "/")
        out.add(cand if as_path.with_suffix(".py").exists() or as_path.is_dir() else node.module)
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("merr1_jax")}
  return out


def _module(path: pathlib.Path) -> str:
  return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_every_import_points_down_the_layers():
  files = sorted(PKG.rglob("*.py"))
  assert {_layer(_module(f)) for f in files} <= set(LAYERS)  # a new folder or root module gets a layer here
  up = []
  for f in files:
    me = _layer(_module(f))
    for target in _imports(f):
      if LAYERS.index(_layer(target)) > LAYERS.index(me):
        up.append(f"{f.relative_to(ROOT)} imports {target}")
  assert not up, up


def test_the_checker_sees_an_upward_import(tmp_path):
  """The rule above on a hand-made pair: an infra module importing training is flagged."""
  bad = tmp_path / "x.py"
  bad.write_text("from merr1_jax.training import step\nfrom merr1_jax import rl\n")
  got = {_layer(t) for t in _imports(bad)}
  assert got == {"training", "rl"}
  assert LAYERS.index("training") > LAYERS.index("infra") and LAYERS.index("rl") < LAYERS.index("infra")


def test_the_root_is_small_and_no_module_grows_past_400_lines():
  root = sorted(p.name for p in PKG.glob("*.py"))
  assert len(root) <= 8, root
  long = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
  over = {k: n for k, n in long.items() if n > 400}
  assert set(over) <= set(OVERSIZE), f"new modules over 400 lines: {set(over) - set(OVERSIZE)}"
  assert all(n <= OVERSIZE[k] for k, n in over.items()), over


def test_no_function_runs_past_80_lines():
  long = []
  for p in PKG.rglob("*.py"):
    for node in ast.walk(ast.parse(p.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
        long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}")
  assert not long, long


def test_the_readmes_layout_table_names_every_folder():
  readme = (ROOT / "README.md").read_text()
  rows = [line for line in readme.splitlines() if line.startswith("| `merr1_jax/")]
  named = set(re.findall(r"`(?:merr1_jax/)?([a-z_]+)/`", "\n".join(rows)))
  folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
  assert folders <= named, folders - named


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Each import circle of `graph` (module -> modules it imports), found by depth-first search: a path that
  reaches a module still on the stack closes a circle."""
  found, state = [], {}

  def visit(m, stack):
    state[m] = "open"
    for t in sorted(graph.get(m, ())):
      if state.get(t) == "open":
        found.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t, stack + [t])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  return found


def test_no_module_imports_one_that_imports_it_back():
  """No import circle between the package's modules, lazy (in-function) and annotation-only imports included:
  a circle means neither module can be read or tested without the other."""
  mods = {_module(f): f for f in PKG.rglob("*.py")}
  graph = {m: {t for t in _imports(f) if t in mods and t != m} for m, f in mods.items()}
  assert not _cycles(graph), _cycles(graph)


def test_the_circle_finder_sees_circles():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
  assert _cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []
