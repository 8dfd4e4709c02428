"""Orbax checkpoints as T5X writes them by default, and as our trainer writes them: read and write.

Layout (t5x's current default): a step directory `checkpoint_<step>/` whose `state/` item is an
Orbax PyTree checkpoint (OCDBT) of `{'target': <params>, 'state': {'step': ..., ...}}`. Our
trainer adds an `'extra'` subtree (optimizer state and the like) to the same item. Opening
accepts the step directory or the `state/` directory itself.

Both directions stream: reading restores one leaf at a time (a partial restore), and writing
hands Orbax lazy tensors through a type handler that materialises and writes them one at a
time, so converting XXL never holds the whole model in memory.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from gqa_t5.checkpoints import confine
from gqa_t5.checkpoints import source as source_lib
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.atomic import Interrupted, atomic_directory, raise_if_interrupted
from gqa_t5.checkpoints.errors import CheckpointError, describe
from gqa_t5.checkpoints.lazy import LazyTensor

FORMAT = "orbax"
STATE_ITEM = "state"
_PYTREE_MARKERS = ("_METADATA", "manifest.ocdbt", "_CHECKPOINT_METADATA")


def find_pytree_dir(path: str) -> str:
  """The Orbax PyTree directory of a checkpoint: `path/state` or `path` itself."""
  path = os.path.abspath(path)  # tensorstore refuses paths with '..'
  if not os.path.isdir(path):
    raise CheckpointError(f"Orbax checkpoint path {path} is not a directory")
  nested = os.path.join(path, STATE_ITEM)
  if os.path.isdir(nested) and any(os.path.exists(os.path.join(nested, m))
                                   for m in _PYTREE_MARKERS):
    return nested
  if os.path.exists(os.path.join(path, "_METADATA")):
    return path
  raise CheckpointError(f"{path} is not an Orbax checkpoint: neither it nor {nested} holds an "
                        "Orbax '_METADATA' file")


def _confined_pytree_dir(path: str) -> str:
  """`find_pytree_dir`, with every file under it checked to lie inside `path` (no symlink out
  of the checkpoint; Orbax's own paths are relative, and tensorstore refuses '..' in them)."""
  pytree_dir = find_pytree_dir(path)
  root = os.path.abspath(path)
  confine.resolve_inside(root, pytree_dir, "Orbax checkpoint item")
  confine.check_tree(root, pytree_dir, f"Orbax checkpoint {pytree_dir}")
  return pytree_dir


def is_orbax_dir(path: str) -> bool:
  try:
    find_pytree_dir(path)
    return True
  except CheckpointError:
    return False


def _orbax():
  """(orbax.checkpoint, jax, etils.epath), imported when an Orbax checkpoint is first touched:
  Orbax takes about half a second to import, and other formats should not pay for it. jax (its
  pytree utilities) and etils come with it; Orbax imports both itself."""
  import orbax.checkpoint as ocp
  import jax
  from etils import epath
  return ocp, jax, epath


def quiet_io_left_in_flight() -> None:
  """Call before Orbax reads or writes (a restore, its metadata, a save); the caller reports a
  failure.

  Orbax runs a restore's reads and a save's writes on an asyncio loop that it closes as soon as
  one of them fails; the others go on in tensorstore's threads, and when each completes, its
  wake-up of the closed loop raises "Event loop is closed" in that thread. Python prints every
  one as an ignored exception: a truncated checkpoint gave one line of error and 600 lines of
  these tracebacks, a full disk during a training save 136 of them. This drops exactly those (a
  RuntimeError of that message raised by asyncio's closed-loop check, with no object) and hands
  every other ignored exception to the hook that was there, for the rest of the process. It is
  installed before the I/O, not after its failure: a read can complete in between (a
  fresh-clone test run saw one such traceback).
  """
  if getattr(sys.unraisablehook, "_gqa_t5_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    closed_loop = (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
                   and unraisable.object is None and tb is not None
                   and tb.tb_frame.f_code.co_name == "_check_closed")
    if not closed_loop:
      previous(unraisable)

  hook._gqa_t5_quiet = True
  sys.unraisablehook = hook


class _HeldFailures(logging.Filter):
  """Drops the tracebacks Orbax logs for a failure it also raises, keeping the last one.

  A failed background save is logged by each of Orbax's threads it passes through (the write,
  the commit, the finalize thread, the wait), each with its traceback: five records of a few
  dozen lines around the one error the trainer reports. Records of Orbax's own modules at ERROR
  level that carry an exception are held back here; `last_held_failure` gives the last one's
  exception, for the rare failure Orbax logs without raising it.
  """

  def __init__(self, orbax_dir: str):
    super().__init__()
    self.orbax_dir = orbax_dir
    self.last = None

  def filter(self, record: logging.LogRecord) -> bool:
    if (record.levelno >= logging.ERROR and record.exc_info
        and os.path.abspath(record.pathname).startswith(self.orbax_dir)):
      self.last = record.exc_info[1]
      return False
    return True


_held_failures: Optional[_HeldFailures] = None


def hold_logged_failures() -> None:
  """Installs `_HeldFailures` on the logger Orbax logs through (absl's), once per process."""
  global _held_failures
  if _held_failures is None:
    ocp, _, _ = _orbax()
    _held_failures = _HeldFailures(os.path.dirname(os.path.abspath(ocp.__file__)) + os.sep)
    logging.getLogger("absl").addFilter(_held_failures)


def last_held_failure() -> Optional[BaseException]:
  """The exception of the last failure record `hold_logged_failures` held back, if any."""
  return _held_failures.last if _held_failures is not None else None


def _metadata_tree(pytree_dir: str) -> Dict[str, Any]:
  ocp, _, epath = _orbax()
  quiet_io_left_in_flight()
  try:
    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(pytree_dir))
  except Exception as error:
    raise CheckpointError(f"cannot read Orbax metadata of {pytree_dir}: "
                          f"{describe(error)}") from error
  return getattr(metadata, "tree", metadata)


def _restore_subtree(pytree_dir: str, item: Mapping[str, Any], what: str) -> Dict[str, Any]:
  """Restores only the leaves present in `item` (arrays as numpy, on the host)."""
  ocp, jax, _ = _orbax()
  restore_args = jax.tree_util.tree_map(
      lambda x: ocp.RestoreArgs(restore_type=np.ndarray) if isinstance(x, np.ndarray)
      else ocp.RestoreArgs(), item)
  quiet_io_left_in_flight()
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      return checkpointer.restore(pytree_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
  except Exception as error:
    raise CheckpointError(f"cannot read {what} from Orbax checkpoint {pytree_dir}: "
                          f"{error}") from error


def _placeholder_array(meta) -> Any:
  """A restore template for a metadata leaf (np.empty: no memory is touched)."""
  shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
  if shape is None or dtype is None:
    return 0
  confine.check_shape(tuple(shape), np.dtype(dtype).itemsize, "Orbax metadata leaf")
  return (np.zeros if tuple(shape) == () else np.empty)(tuple(shape), np.dtype(dtype))


def _restore_leaf(pytree_dir: str, path: Tuple[str, ...], meta, what: str) -> np.ndarray:
  """One leaf, by its path in the tree and its metadata."""
  item: Dict[str, Any] = {}
  node = item
  for key in path[:-1]:
    node = node.setdefault(key, {})
  node[path[-1]] = _placeholder_array(meta)  # Orbax needs the structure and dtype
  restored = _restore_subtree(pytree_dir, item, what)
  for key in path:
    restored = restored[key]
  return np.asarray(restored)


def _leaf_reader(pytree_dir: str, path: Tuple[str, ...], meta):
  return lambda: _restore_leaf(pytree_dir, path, meta, f"tensor {'/'.join(path[1:])!r}")


def _lazy_leaves(pytree_dir: str, node: Any, path: Tuple[str, ...],
                 names_from: int = 1) -> Dict[str, LazyTensor]:
  """The array leaves under `node`, named by their path from `names_from` on (1: without the
  'target' or 'params' key at path[0])."""
  leaves = {}
  if isinstance(node, Mapping):
    for key, value in node.items():
      leaves.update(_lazy_leaves(pytree_dir, value, path + (str(key),), names_from))
    return leaves
  if not hasattr(node, "shape") or not hasattr(node, "dtype"):
    raise CheckpointError(f"Orbax checkpoint {pytree_dir}: leaf {'/'.join(path)!r} is not an "
                          f"array ({type(node).__name__})")
  name = "/".join(path[names_from:])
  confine.check_shape(tuple(node.shape), np.dtype(node.dtype).itemsize,
                      f"Orbax checkpoint {pytree_dir}: tensor {name!r}")
  leaves[name] = LazyTensor(name, tuple(node.shape), np.dtype(node.dtype),
                            _leaf_reader(pytree_dir, path, node))
  return leaves


def _params_key(metadata: Any, pytree_dir: str) -> str:
  """'target' in t5x's layout, 'params' in our trainer's ({'step', 'params', 'opt_state'})."""
  if isinstance(metadata, Mapping):
    for key in ("target", "params"):
      if key in metadata:
        return key
  keys = sorted(metadata) if isinstance(metadata, Mapping) else type(metadata).__name__
  raise CheckpointError(f"Orbax checkpoint {pytree_dir} has no 'target' or 'params' "
                        f"parameters (top-level keys: {keys})")


def _step_path(metadata: Mapping[str, Any]) -> Optional[Tuple[str, ...]]:
  state = metadata.get("state")
  if isinstance(state, Mapping) and "step" in state:
    return ("state", "step")
  if "step" in metadata and not isinstance(metadata["step"], Mapping):
    return ("step",)
  return None


def _read_step(pytree_dir: str, metadata: Mapping[str, Any]) -> int:
  path = _step_path(metadata)
  if path is None:
    return 0
  meta = metadata
  for key in path:
    meta = meta[key]
  return int(_restore_leaf(pytree_dir, path, meta, "the step").reshape(()))


def open_orbax(path: str, config=None, validate: bool = True) -> source_lib.CheckpointSource:
  """Opens the parameters of an Orbax checkpoint lazily (t5x's or our trainer's layout)."""
  pytree_dir = _confined_pytree_dir(path)
  metadata = _metadata_tree(pytree_dir)
  key = _params_key(metadata, pytree_dir)
  tensors = _lazy_leaves(pytree_dir, metadata[key], (key,))
  source = source_lib.CheckpointSource(path=path, format=FORMAT, tensors=tensors,
                                       step=_read_step(pytree_dir, metadata))
  return source_lib.finish(source, config=config, validate=validate)


def open_item_tensors(path: str) -> Dict[str, LazyTensor]:
  """Every array of an Orbax PyTree item, lazily, named by its whole '/'-joined path: our
  trainer's full train state ('step', 'params/...', 'opt_state/...'), as the checksums of a
  training checkpoint name them."""
  pytree_dir = _confined_pytree_dir(path)
  return _lazy_leaves(pytree_dir, _metadata_tree(pytree_dir), (), names_from=0)


def load_orbax(path: str, extra_target: Any = None, validate: bool = False
               ) -> Tuple[Dict[str, Any], int, Any]:
  """(params, step, extra) of an Orbax checkpoint, all in memory.

  `extra` is restored with the structure of `extra_target` when given (e.g. an optax state
  from `optimizer.init(params)`), else as Orbax's plain nested containers; None if absent.
  `validate` checks the params against the T5.1.1 layout (off: trainer trees may be scanned).
  """
  ocp, jax, _ = _orbax()
  pytree_dir = _confined_pytree_dir(path)
  metadata = _metadata_tree(pytree_dir)
  key = _params_key(metadata, pytree_dir)
  item: Dict[str, Any] = {key: jax.tree_util.tree_map(_placeholder_array, metadata[key])}
  step_path = _step_path(metadata)
  if step_path == ("state", "step"):
    item["state"] = {"step": _placeholder_array(metadata["state"]["step"])}
  elif step_path == ("step",):
    item["step"] = _placeholder_array(metadata["step"])
  has_extra = "extra" in metadata
  if has_extra:
    if extra_target is not None:
      item["extra"] = jax.tree_util.tree_map(
          lambda x: np.zeros(np.shape(x), np.asarray(x).dtype) if hasattr(x, "shape") else x,
          extra_target)
    else:
      item["extra"] = jax.tree_util.tree_map(_placeholder_array, metadata["extra"])
  restore_args = jax.tree_util.tree_map(
      lambda x: ocp.RestoreArgs(restore_type=np.ndarray) if isinstance(x, np.ndarray)
      and x.ndim else ocp.RestoreArgs(), item)
  quiet_io_left_in_flight()
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(pytree_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
  except Exception as error:
    raise CheckpointError(f"cannot restore Orbax checkpoint {pytree_dir}: {error}") from error
  params = restored[key]
  if validate:
    flat = tree_lib.flatten(params)
    shapes = {name: np.shape(v) for name, v in flat.items()}
    config = tree_lib.infer_config(shapes, source=f"orbax checkpoint {path}")
    tree_lib.validate_shapes(shapes, config, source=f"orbax checkpoint {path}")
  step = 0
  if step_path is not None:
    node = restored
    for part in step_path:
      node = node[part]
    step = int(np.asarray(node).reshape(()))
  return params, step, restored.get("extra") if has_extra else None


def _no_host_copies(handler_class) -> Dict[str, bool]:
  """The keyword that stops `handler_class` copying each numpy array before writing it, where
  its Orbax has one: 0.12.5 added `deepcopy_host_arrays` (default True); 0.12.0-0.12.4 always
  copy. A copy would double the memory of a save of numpy leaves; a LazyTensor copies cheaply
  (its reader is shared), so a conversion streams with either."""
  accepted = inspect.signature(handler_class.__init__).parameters
  return {"deepcopy_host_arrays": False} if "deepcopy_host_arrays" in accepted else {}


def _serial_handler_registry():
  """A type-handler registry that writes numpy arrays and LazyTensors one at a time."""
  ocp, jax, _ = _orbax()

  class SerialNumpyHandler(ocp.type_handlers.NumpyHandler):
    """Orbax writes all leaves concurrently; this reads and writes them one at a time.

    A failed read (e.g. a corrupt source chunk) or a stop request (SIGINT/SIGTERM) is recorded,
    not raised inside Orbax's event loop: the remaining leaves are skipped, Orbax finishes and
    joins what it has in flight, and `write_orbax_item` raises it afterwards.
    """

    def __init__(self):
      super().__init__(**_no_host_copies(ocp.type_handlers.NumpyHandler))
      self._locks: Dict[int, asyncio.Lock] = {}
      self.errors = []

    async def _open_and_write(self, value, tspec, ts_context):
      loop = asyncio.get_running_loop()
      lock = self._locks.setdefault(id(loop), asyncio.Lock())
      async with lock:
        if self.errors:
          return
        try:
          raise_if_interrupted()
          array = value.read() if isinstance(value, LazyTensor) else np.asarray(value)
          await super()._open_and_write(array, tspec, ts_context)
          del array
        except (Exception, Interrupted) as error:  # re-raised by write_orbax_item
          self.errors.append(error)

  serial = SerialNumpyHandler()
  pairs = [(kind, ocp.type_handlers.get_type_handler(kind))
           for kind in (int, float, bytes, np.number, jax.Array, str)]
  pairs += [(np.ndarray, serial), (LazyTensor, serial)]
  return ocp.type_handlers.create_type_handler_registry(*pairs)


def write_orbax_item(directory: str, params: Mapping[str, Any], step: int,
                     extra: Any = None) -> None:
  """Writes `{'target', 'state': {'step'}, ['extra']}` as `directory/state` (an Orbax item).

  Leaves may be numpy arrays or LazyTensors (read one at a time while writing).
  """
  ocp, _, _ = _orbax()
  directory = os.path.abspath(directory)
  item: Dict[str, Any] = {"target": dict(params), "state": {"step": np.asarray(step, np.int32)}}
  if extra is not None:
    item["extra"] = extra
  registry = _serial_handler_registry()
  serial = registry.get(LazyTensor)
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
  quiet_io_left_in_flight()
  hold_logged_failures()
  try:
    with ocp.Checkpointer(handler) as checkpointer:
      checkpointer.save(os.path.join(directory, STATE_ITEM), args=ocp.args.PyTreeSave(item))
  except Exception as error:
    raise CheckpointError(f"cannot write Orbax checkpoint {directory}: {error}") from error
  if serial.errors:
    error = serial.errors[0]
    if isinstance(error, (CheckpointError, Interrupted)):
      raise error
    raise CheckpointError(f"cannot write Orbax checkpoint {directory}: {error}") from error


def save_orbax(path: str, params: Mapping[str, Any], step: int = 0, extra: Any = None,
               overwrite: bool = False) -> None:
  """Writes an Orbax checkpoint directory (t5x's layout) atomically.

  `params` is the nested parameter tree (numpy/jax arrays or LazyTensors); `extra` any pytree
  (e.g. optimizer state) stored beside it and returned by `load_orbax`.
  """
  _, jax, _ = _orbax()
  to_host = lambda x: x if isinstance(x, LazyTensor) else np.asarray(x)
  params = jax.tree_util.tree_map(to_host, dict(params), is_leaf=lambda x: isinstance(x, LazyTensor))
  if extra is not None:
    extra = jax.tree_util.tree_map(to_host, extra)
  with atomic_directory(path, overwrite=overwrite) as tmp:
    write_orbax_item(tmp, params, step, extra)
