"""Gin the T5X way: flags, file lookup, strict parsing (typos are errors naming the closest
known name) and the operative config; with entry_point.py, the only modules importing gin.

  --gin_file=FILE           (repeatable) a gin file, found on the search path
  --gin_search_paths=A,B    (repeatable) extra directories to look files up in
  --gin.NAME=VALUE          one binding, e.g. --gin.MODEL_DIR="'/tmp/run'"
  --gin_bindings=BINDING    (repeatable) one binding, e.g. --gin_bindings="TRAIN_STEPS=100"

The repository's gin/ directory and the working directory are on the search path by default;
gin/README.md describes the layering of model, attention and run files.
The gin files register what they configure dynamically (`from __gin__ import
dynamic_registration`), so library code carries no gin decorators.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import glob
import importlib
import inspect
import logging
import os
import re
from typing import List, Optional, Sequence, Tuple

import gin
import jax
from gin import config as gin_config

from gqa_t5.checkpoints import atomic
from gqa_t5.checkpoints import model_dir as model_dir_lib

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class GinConfigError(ValueError):
  """A gin file, binding or REQUIRED macro problem, with what to do about it."""


def default_search_paths() -> List[str]:
  paths = []
  if os.path.isdir(REPO_GIN_DIR):
    paths.append(REPO_GIN_DIR)
  paths.append(os.getcwd())
  return paths


def split_gin_flags(argv: Sequence[str]) -> Tuple[List[str], List[str], List[str], List[str]]:
  """(gin files, bindings, search paths, other args) from a command line (T5X's flags)."""
  files, bindings, paths, rest = [], [], [], []
  args = list(argv)
  i = 0

  def value_of(arg: str, name: str):
    nonlocal i
    if arg == name:
      if i + 1 >= len(args):
        raise GinConfigError(f"{name} needs a value")
      i += 1
      return args[i]
    return arg[len(name) + 1:]

  while i < len(args):
    arg = args[i]
    if arg == "--gin_file" or arg.startswith("--gin_file="):
      files.append(value_of(arg, "--gin_file"))
    elif arg == "--gin_bindings" or arg.startswith("--gin_bindings="):
      bindings.append(value_of(arg, "--gin_bindings"))
    elif arg == "--gin_search_paths" or arg.startswith("--gin_search_paths="):
      paths.extend(p for p in value_of(arg, "--gin_search_paths").split(",") if p)
    elif arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        if i + 1 >= len(args):
          raise GinConfigError(f"{arg} needs a value (--gin.NAME=VALUE)")
        i += 1
        value = args[i]
      bindings.append(f"{name}={value}")
    else:
      rest.append(arg)
    i += 1
  return files, bindings, paths, rest


class _DropMessages(logging.Filter):

  def __init__(self, prefixes: Tuple[str, ...]):
    super().__init__()
    self.prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self.prefixes)


def _required_macros_left() -> List[str]:
  missing = []
  for (scope, selector), params in gin_config._CONFIG.items():  # pylint: disable=protected-access
    if selector != "gin.macro":
      continue
    if repr(params.get("value")) == "%gin.REQUIRED":
      missing.append(scope)
  return sorted(missing)


@functools.lru_cache(maxsize=None)
def repository_macros() -> frozenset:
  """The macro names the repository's gin files define (the names users set)."""
  names = set()
  for path in glob.glob(os.path.join(REPO_GIN_DIR, "**", "*.gin"), recursive=True):
    with open(path) as f:
      names.update(re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", f.read(), flags=re.MULTILINE))
  return frozenset(names)


def _macro_name(reference) -> Optional[str]:
  selector = getattr(reference, "scoped_selector", "")
  if selector.endswith("gin.macro"):
    return selector[:-len("gin.macro")].rstrip("/").split("/")[-1] or None
  return None


def _macros_read() -> set:
  """Macros some binding refers to (`%NAME`), in any value, nested or not."""
  read = set()

  def walk(value):
    if isinstance(value, gin_config.ConfigurableReference):
      name = _macro_name(value)
      if name:
        read.add(name)
    elif isinstance(value, dict):
      for v in value.values():
        walk(v)
    elif isinstance(value, (list, tuple, set)):
      for v in value:
        walk(v)

  for params in gin_config._CONFIG.values():  # pylint: disable=protected-access
    for value in params.values():
      walk(value)
  return read


def _closest(name: str, known) -> str:
  close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
  return f"; did you mean {close[0]}?" if close else ""


def check_macros_are_read() -> None:
  """A macro that no binding reads is a typo unless the repository's gin files define it
  (model files define macros that only some run files read, e.g. OPTIMIZER)."""
  defined = {scope for scope, selector in gin_config._CONFIG  # pylint: disable=protected-access
             if selector == "gin.macro"}
  read = _macros_read() | {"MODEL_DIR"}  # the train entry point reads MODEL_DIR itself
  unread = sorted(defined - read - repository_macros())
  if unread:
    known = read | repository_macros()
    raise GinConfigError("; ".join(
        f"gin macro {name} is set but no binding reads it{_closest(name, known)}"
        for name in unread) + " (a misspelled macro would otherwise be ignored)")


_UNKNOWN_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
_UNKNOWN_ATTRIBUTE = re.compile(r"<module '([\w.]+)'.*?> has no attribute (\w+)")


def _suggestion(message: str) -> str:
  """'did you mean ...' for gin's unknown-parameter and unknown-name errors."""
  match = _UNKNOWN_PARAMETER.search(message)
  if match:
    registry = gin_config._REGISTRY  # pylint: disable=protected-access
    configurable = registry.get_match(match.group(1))
    if configurable is not None:
      known = inspect.signature(configurable.wrapped).parameters
      return _closest(match.group(2), known)
  match = _UNKNOWN_ATTRIBUTE.search(message)
  if match:
    with contextlib.suppress(ImportError):
      return _closest(match.group(2), dir(importlib.import_module(match.group(1))))
  return ""


def _safe_check(exists):
  """gin's Python-package file check crashes (TypeError) when the working directory holds a
  folder named like the file's folder (runs/, attention/, t5_1_1/): a namespace package
  without a file. For gin such a path simply does not exist there."""
  def check(path: str) -> bool:
    try:
      return bool(exists(path))
    except (TypeError, ValueError, ImportError):
      return False
  return check


def parse(files: Sequence[str], bindings: Sequence[str],
          search_paths: Sequence[str] = ()) -> None:
  """Clears gin, parses `files` then `bindings`, and checks no REQUIRED macro is left."""
  gin.clear_config(clear_constants=False)
  for path in list(search_paths) + default_search_paths():
    gin.add_config_file_search_path(path)
  if not files:
    raise GinConfigError("no --gin_file given: name a run file, e.g. "
                         "--gin_file=runs/finetune.gin (see gin/README.md)")
  # gin logs every search-path miss as an error; only a file found nowhere matters.
  quiet = _DropMessages(("Path not found", "system_path_file_exists"))
  logging.getLogger().addFilter(quiet)
  readers = list(gin_config._FILE_READERS)  # pylint: disable=protected-access
  safe = [(reader, _safe_check(check)) for reader, check in readers]
  gin_config._FILE_READERS[:] = safe  # pylint: disable=protected-access
  try:
    gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False,
                                        skip_unknown=False)
  except (ValueError, IOError, ImportError, SyntaxError, AttributeError) as error:
    hint = _suggestion(str(error))
    raise GinConfigError(f"gin configuration error: {error}"
                         + (f"\n  {hint[2:]}" if hint else "")) from error
  finally:
    logging.getLogger().removeFilter(quiet)
    gin_config._FILE_READERS[:] = readers  # pylint: disable=protected-access
  check_macros_are_read()
  missing = _required_macros_left()
  if missing:
    flags = " ".join(f"--gin.{m}=..." for m in missing)
    raise GinConfigError(
        f"REQUIRED gin macro(s) not set: {', '.join(missing)}. Set them on the command line "
        f"({flags}) or in a gin file; each run file lists its REQUIRED macros in its header. "
        f"Model files declare DROPOUT_RATE REQUIRED and run files set it: give the model file "
        f"before the run file.")
  try:
    gin.finalize()
  except ValueError as error:
    raise GinConfigError(f"gin configuration error: {error}") from error


def write_operative_config(model_dir: Optional[str]) -> Optional[str]:
  """Writes gin's operative configuration to MODEL_DIR/config.gin (process 0, atomically)."""
  if not model_dir or jax.process_index() != 0:
    return None
  os.makedirs(model_dir, exist_ok=True)
  path = os.path.join(model_dir, model_dir_lib.OPERATIVE_CONFIG_FILE)
  atomic.write_text(path, gin.operative_config_str())
  return path


def get_configurable(fn):
  """The gin-configured version of `fn` (its bindings applied when called)."""
  return gin.get_configurable(fn)


def macro_value(name: str):
  """The value a macro evaluates to (None if it is not bound)."""
  try:
    return gin.query_parameter(f"{name}/macro.value")
  except ValueError:
    return None
