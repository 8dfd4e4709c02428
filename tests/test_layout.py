"""The package's shape: docs/DESIGN.md's layout matches the tree, and imports stay at the top.

DESIGN.md is the map a newcomer reads first, so every package module must be on it and every
module it names must exist. Function-level imports are kept for optional heavy extras only
(TensorFlow, seqio, torch, ...): one of the standard library or of gqa_t5 itself hides a
dependency from the reader.
"""

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gqa_t5"


def _package_modules():
  return sorted(p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py")
                if p.name not in ("__init__.py", "__main__.py"))


def _layout_section() -> str:
  text = (REPO / "docs" / "DESIGN.md").read_text()
  match = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
  assert match, "docs/DESIGN.md has no '## Layout' section"
  return match.group(1)


def _listed_modules():
  """Backticked paths in the layout section; `dir/{a,b}.py` lists a.py and b.py of dir/."""
  listed = set()
  for token in re.findall(r"`(gqa_t5/[^`]+)`", _layout_section()):
    brace = re.fullmatch(r"(.*/)\{([^}]+)\}\.py", token)
    if brace:
      listed.update(f"{brace.group(1)}{name.strip()}.py" for name in brace.group(2).split(","))
    elif token.endswith(".py"):
      listed.add(token)
  return listed


def test_every_package_module_is_on_the_layout_map():
  missing = [m for m in _package_modules() if m not in _listed_modules()]
  assert not missing, f"docs/DESIGN.md's Layout section does not list {missing}"


def test_every_module_on_the_layout_map_exists():
  absent = sorted(m for m in _listed_modules() if not (REPO / m).is_file())
  assert not absent, f"docs/DESIGN.md's Layout section lists modules that do not exist: {absent}"


def _function_level_imports(path: Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    for sub in ast.walk(node):
      if isinstance(sub, ast.Import):
        names = [alias.name for alias in sub.names]
      elif isinstance(sub, ast.ImportFrom) and sub.level == 0:
        names = [sub.module or ""]
      else:
        continue
      for name in names:
        yield sub.lineno, name


def test_no_function_level_imports_of_the_standard_library_or_the_package():
  offenders = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for line, name in _function_level_imports(path):
      top = name.split(".")[0]
      if top in sys.stdlib_module_names or top == "gqa_t5":
        offenders.append(f"{path.relative_to(REPO)}:{line} imports {name}")
  offenders = [o for o in offenders if o.split(":")[0] not in DEFERRED_PACKAGE_IMPORTS]
  assert not offenders, "imports inside functions:\n" + "\n".join(offenders)


# The package modules imported inside a function on purpose: each would load a heavy optional
# stack (flax, TensorFlow/seqio) for callers that never need it.
DEFERRED_PACKAGE_IMPORTS = {
    "gqa_t5/model/__init__.py": "T5Config/Transformer on first use: the readers never load flax",
    "gqa_t5/convert/calibration.py": "the network (flax) only for --method aligned",
    "gqa_t5/convert/converter.py": "the network's logical axes (flax) only for a t5x output's "
                                   "optimizer state (convert/t5x_state.py)",
    "gqa_t5/reproduce/__init__.py": "`gqa-t5 --help` lists the command without loading JAX",
    "gqa_t5/reproduce/cli.py": "the paper-scale dry run registers TensorFlow tasks",
    "gqa_t5/reproduce/pipeline/tasks.py": "the demo tasks load seqio and TensorFlow",
}
