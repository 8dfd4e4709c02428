"""The package's import layers: docs/DESIGN.md's "Layers" list, checked against every import.

The list in DESIGN.md is the one copy of the layer table: this test reads it (every backticked
`gqa_t5/...` module or folder under a numbered item is on that item's layer) and parses the
imports (ast, function-level ones included) of every package module. A module may import its
own layer and those below it, never one above; no two packages (or a package and a top-level
module) import each other; the network's layer imports only jax, flax and numpy; the data
packages never import the model; the package never imports gin/, scripts/ or tests/.
"""

import ast
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gqa_t5"
DESIGN = REPO / "docs" / "DESIGN.md"

# The package root (`gqa_t5/__init__.py`: the version only) sits below every layer.
ROOT_LAYER = 0

# Layer 1's "jax, flax, numpy only" as third-party top-level names (the standard library is
# always allowed).
MODEL_THIRD_PARTY = {"jax", "flax", "numpy"}

# Layer 5's "never import the model": the data packages and the model's modules.
DATA_PACKAGES = ("tasks/", "demo_data/")
MODEL_MODULES = ("model/", "models.py")


def _layers_section() -> str:
  text = DESIGN.read_text()
  match = re.search(r"^## Layers[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
  assert match, "docs/DESIGN.md has no '## Layers' section"
  return match.group(1)


def layer_table(section: str) -> Tuple[Dict[str, int], Dict[str, int]]:
  """(package entries -> layer, outside folders -> layer) from the numbered Layers list.

  Package entries are paths inside gqa_t5/: 'optim.py' or a folder 'model/'. Outside folders
  are the repository's others ('gin/', 'tests/', ...)."""
  package: Dict[str, int] = {}
  outside: Dict[str, int] = {}
  for number, text in re.findall(r"^(\d+)\. (.*?)(?=^\d+\. |\Z)", section, re.S | re.M):
    for token in re.findall(r"`([^`]+)`", text):
      if token.startswith("gqa_t5/") and (token.endswith(".py") or token.endswith("/")):
        entry = token[len("gqa_t5/"):]
        if entry in package and package[entry] != int(number):
          raise AssertionError(f"docs/DESIGN.md's Layers list puts {token} on layers "
                               f"{package[entry]} and {number}")
        package[entry] = int(number)
      elif re.fullmatch(r"[a-z_]+/", token):
        outside[token] = int(number)
  return package, outside


def layer_of(path: str, table: Dict[str, int]) -> Optional[int]:
  """The layer of a package module ('convert/t5x_state.py'): its own entry, else the deepest
  folder entry holding it; None when the table does not place it."""
  if path == "__init__.py":
    return ROOT_LAYER
  if path in table:
    return table[path]
  folders = [entry for entry in table if entry.endswith("/") and path.startswith(entry)]
  return table[max(folders, key=len)] if folders else None


def module_path(dotted: str) -> Optional[str]:
  """'gqa_t5.convert.pooling' -> 'convert/pooling.py' ('.../__init__.py' for a package); None
  when no such module exists in the package."""
  parts = dotted.split(".")
  if parts[0] != "gqa_t5":
    return None
  stem = "/".join(parts[1:])
  candidates = [f"{stem}.py", f"{stem}/__init__.py"] if stem else ["__init__.py"]
  for candidate in candidates:
    if (PACKAGE / candidate).is_file():
      return candidate
  return None


def imports_of(path: str, source: str) -> Iterator[Tuple[int, str]]:
  """(line, dotted name) for every import in a package module's source, at any depth. A
  `from gqa_t5.x import y` names gqa_t5.x.y when y is a module, else gqa_t5.x; a relative import
  is resolved against `path`."""
  package_parts = ["gqa_t5"] + path.split("/")[:-1]
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package_parts[:len(package_parts) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      for alias in node.names:
        full = f"{module}.{alias.name}"
        yield node.lineno, full if module_path(full) else module


def _package_modules() -> List[str]:
  return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


def _package_imports() -> Iterator[Tuple[str, int, str, str]]:
  """(importing module, line, dotted name, imported module's path) for every package import."""
  for path in _package_modules():
    for line, dotted in imports_of(path, (PACKAGE / path).read_text()):
      target = module_path(dotted)
      if target is not None and target != path:
        yield path, line, dotted, target


def layer_violations(path: str, source: str, table: Dict[str, int]) -> List[str]:
  """One line per import of `source` (the module at `path`) from a higher layer."""
  own = layer_of(path, table)
  found = []
  for line, dotted in imports_of(path, source):
    target = module_path(dotted)
    if target is None:
      continue
    theirs = layer_of(target, table)
    if own is not None and theirs is not None and theirs > own:
      found.append(f"gqa_t5/{path}:{line} (layer {own}) imports {dotted} (layer {theirs})")
  return found


def _node(path: str) -> str:
  """A package's folder ('convert/'), or a top-level module's file ('optim.py')."""
  return path.split("/")[0] + "/" if "/" in path else path


def find_cycle(edges: Dict[str, Dict[str, str]]) -> Optional[List[str]]:
  """A cycle of nodes (first node repeated last) in `edges` (node -> {node: example}), or None."""
  state: Dict[str, int] = {}  # 1: on the current path, 2: done
  stack: List[str] = []

  def visit(node: str) -> Optional[List[str]]:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(edges.get(node, {})):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


@pytest.fixture(scope="module")
def table() -> Dict[str, int]:
  return layer_table(_layers_section())[0]


def test_every_package_module_is_on_a_layer(table):
  unplaced = [p for p in _package_modules() if layer_of(p, table) is None]
  assert not unplaced, (f"docs/DESIGN.md's Layers list places no layer for gqa_t5/{unplaced}: "
                        f"name the module or its folder under a numbered item")


def test_every_layer_entry_exists(table):
  absent = sorted(e for e in table if not (PACKAGE / e).exists())
  assert not absent, f"docs/DESIGN.md's Layers list names what does not exist: gqa_t5/{absent}"


def test_no_module_imports_a_higher_layer(table):
  found = []
  for path in _package_modules():
    found += layer_violations(path, (PACKAGE / path).read_text(), table)
  assert not found, "imports from a higher layer (docs/DESIGN.md, Layers):\n" + "\n".join(found)


def test_a_higher_layer_import_is_named():
  # The check itself: a converter module importing the training loop is reported by name.
  table = {"convert/": 4, "train.py": 7}
  source = "import os\n\ndef f():\n  from gqa_t5 import train\n"
  assert layer_violations("convert/new.py", source, table) == [
      "gqa_t5/convert/new.py:4 (layer 4) imports gqa_t5.train (layer 7)"]


def test_no_import_cycle_between_packages():
  edges: Dict[str, Dict[str, str]] = {}
  for path, line, dotted, target in _package_imports():
    src, dst = _node(path), _node(target)
    if src != dst and dst != "__init__.py":
      edges.setdefault(src, {}).setdefault(dst, f"gqa_t5/{path}:{line} imports {dotted}")
  cycle = find_cycle(edges)
  assert cycle is None, ("package import cycle " + " -> ".join(cycle) + ":\n"
                         + "\n".join(edges[a][b] for a, b in zip(cycle, cycle[1:])))


def test_a_cycle_is_found():
  edges = {"a/": {"b/": "x"}, "b/": {"c.py": "y"}, "c.py": {"a/": "z"}}
  assert find_cycle(edges) == ["a/", "b/", "c.py", "a/"]
  assert find_cycle({"a/": {"b/": "x"}, "b/": {}}) is None


def test_the_network_imports_only_jax_flax_and_numpy():
  found = []
  for path in _package_modules():
    if not path.startswith("model/"):
      continue
    for line, dotted in imports_of(path, (PACKAGE / path).read_text()):
      top = dotted.split(".")[0]
      if top not in sys.stdlib_module_names and top not in MODEL_THIRD_PARTY | {"gqa_t5"}:
        found.append(f"gqa_t5/{path}:{line} imports {dotted}")
      elif top == "gqa_t5" and not (module_path(dotted) or "").startswith("model/"):
        found.append(f"gqa_t5/{path}:{line} imports {dotted} (outside the network's layer)")
  assert not found, "the network's layer imports more than jax, flax, numpy:\n" + "\n".join(found)


def test_the_data_packages_never_import_the_model():
  found = [f"gqa_t5/{path}:{line} imports {dotted}"
           for path, line, dotted, target in _package_imports()
           if path.startswith(DATA_PACKAGES) and target.startswith(MODEL_MODULES)]
  assert not found, "tasks/ or demo_data/ import the model:\n" + "\n".join(found)


def test_the_package_never_imports_gin_scripts_or_tests():
  _, outside = layer_table(_layers_section())
  assert outside, "docs/DESIGN.md's Layers list names no folder outside the package"
  # A folder's Python files import by their stems (tests put tests/ on the path), and a folder
  # holding Python files imports as a namespace package ('gin/' holds none: `gin` is the library).
  names = set()
  for folder in outside:
    stems = {p.stem for p in (REPO / folder).glob("*.py")}
    names.update(stems | ({folder.rstrip("/")} if stems else set()))
  found = [f"gqa_t5/{path}:{line} imports {dotted}"
           for path in _package_modules()
           for line, dotted in imports_of(path, (PACKAGE / path).read_text())
           if dotted.split(".")[0] in names]
  assert not found, "the package imports gin/, scripts/ or tests/:\n" + "\n".join(found)
