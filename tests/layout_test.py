"""The package's layout: every module imports, and the import graph has no cycle.

The graph counts imports made inside functions too (an import moved into a function hides a
cycle from the file headers, it does not remove it). Scanned here with `ast`, on its own.
"""

import ast
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vitreg_jax")


def _modules() -> dict[str, str]:
  """`{module name: path}` of every module of the package."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return found


def _imported(module: str, path: str, modules) -> set[str]:
  """The package's modules that `module` imports, anywhere in its file."""
  is_package = path.endswith("__init__.py")
  package = module if is_package else module.rpartition(".")[0]
  names = []
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      names += [base] + [f"{base}.{a.name}" for a in node.names]
  out = set()
  for name in names:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    # A package's __init__ imports its own submodules to re-export them: not an edge (the
    # submodules' `from package import sibling` would otherwise always close a cycle).
    if name and name != module and not (is_package and name.startswith(module + ".")):
      out.add(name)
  return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as a path `[a, b, ..., a]`, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_import_graph_has_no_cycle():
  modules = _modules()
  graph = {m: _imported(m, p, modules) for m, p in modules.items()}
  assert {"vitreg_jax.heads.select", "vitreg_jax.reports.tables", "vitreg_jax.training.steps"} <= set(graph)
  assert "vitreg_jax.training.steps" in graph["vitreg_jax.heads.evaluate"]  # The scan sees imports.
  cycle = _cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_does_not_import_heads_or_reports():
  modules = _modules()
  for core in ("vitreg_jax.training.steps", "vitreg_jax.models.attention", "vitreg_jax.regularizers.wrapper"):
    bad = {m for m in _imported(core, modules[core], modules)
           if m.startswith(("vitreg_jax.heads", "vitreg_jax.reports"))}
    assert not bad, f"{core} imports {bad}"


def test_every_module_imports():
  # In a fresh interpreter: several command-line modules define the same absl flag
  # (--workdir), so each module's flags are dropped after its import.
  names = sorted(_modules())
  script = textwrap.dedent(f"""
      import importlib
      from absl import flags
      for name in {names!r}:
        before = set(flags.FLAGS)
        importlib.import_module(name)
        for flag in set(flags.FLAGS) - before:
          delattr(flags.FLAGS, flag)
      print("imported", len({names!r}))
      """)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"imported {len(names)}" in result.stdout


# What an import inside a function may keep out of the modules that do not need it
# (docs/design.md, "Layout"): `{module prefix: top-level names}`, "" for every module.
LAZY_ALLOWED = {
    "": ("tensorflow", "tensorflow_datasets", "clu", "matplotlib"),
    "vitreg_jax.data": ("jax", "grain", "sklearn"),
    "vitreg_jax.config_lib": ("vitreg_jax.models", "vitreg_jax.training.optim", "vitreg_jax.training.objective",
                              "vitreg_jax.regularizers"),
    "vitreg_jax.models.weight_layouts": ("safetensors",),
}


def _imports_inside_functions(path: str) -> list[tuple[int, str]]:
  """`(line, imported name)` of every import made inside a function of the file at `path`."""
  found = []

  def visit(node, inside):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.Import) and inside:
        found.extend((child.lineno, a.name) for a in child.names)
      elif isinstance(child, ast.ImportFrom) and inside:
        found.extend((child.lineno, f"{child.module}.{a.name}") for a in child.names)
      visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

  visit(ast.parse(open(path, encoding="utf-8").read(), path), False)
  return found


def test_imports_inside_functions_only_keep_heavy_libraries_out():
  assert _imports_inside_functions(os.path.join(PACKAGE, "plotting.py"))  # The scan sees them.
  bad = []
  for module, path in sorted(_modules().items()):
    allowed = tuple(name for prefix, names in LAZY_ALLOWED.items()
                    if module == prefix or module.startswith(prefix + ".") or not prefix
                    for name in names)
    bad += [f"{module}:{line} imports {name}" for line, name in _imports_inside_functions(path)
            if not any(name == a or name.startswith(a + ".") for a in allowed)]
  assert not bad, "imports inside functions (move them to the top):\n" + "\n".join(bad)


def test_config_files_sweep_and_reports_import_no_jax():
  # What they would otherwise pay for is why config_lib and data/ import jax lazily.
  script = ("import sys, configs.quickstart, vitreg_jax.config_lib, vitreg_jax.data.prepare, "
            "vitreg_jax.sweep, vitreg_jax.reports.__main__\n"
            "print(sorted(m for m in ('jax', 'grain', 'tensorflow', 'matplotlib') "
            "if m in sys.modules))")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"
