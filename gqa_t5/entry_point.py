"""The shared `main` of the train, eval and infer entry points: flags, process set-up (JAX's
compilation cache, quiet logs, multi-process start), gin, then the configured run function."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from typing import Optional, Sequence

import jax

from gqa_t5 import command_errors
from gqa_t5 import gin_utils
from gqa_t5 import jax_setup
from gqa_t5 import partitioning


def run_entry_point(argv: Optional[Sequence[str]], prog: str, target_name: str,
                    description: str, add_flags=None, call=None) -> int:
  """Shared `main` of train/eval/infer: flags, distributed start-up, gin, then the run.

  `target_name` is 'module.function' of the library function the gin files configure;
  `call(fn, args)` runs it (default: fn()). Returns a process exit status; configuration
  errors print one clear message (exit status 2) instead of a traceback.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  files, bindings, paths, rest = gin_utils.split_gin_flags(argv)
  parser = argparse.ArgumentParser(
      prog=prog, description=description,
      epilog="Gin flags: --gin_file=FILE --gin_search_paths=DIRS --gin.NAME=VALUE "
             "--gin_bindings=BINDING (T5X's conventions; gin/ is on the search path).")
  parser.add_argument("--coordinator_address", default=None,
                      help="host:port of process 0 for a multi-process run (jax.distributed)")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--jax_cache_dir", default=jax_setup.default_cache_dir(),
                      help="JAX's persistent compilation cache (default %(default)s; '' turns "
                           "it off): a second run of the same shapes skips compiling")
  parser.add_argument("--verbose", action="store_true",
                      help="show the traceback of an error (by default one line names it)")
  if add_flags:
    add_flags(parser)
  args = parser.parse_args(rest)
  if getattr(args, "dry_run_devices", None):
    # Simulated host devices must be requested before JAX initialises its backends.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.dry_run_devices}")
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")  # jax is imported: its flag, not just the env
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  jax_setup.quiet_logs()
  jax_setup.enable_compilation_cache(args.jax_cache_dir)
  for noisy in ("absl", "jax", "orbax", "tensorflow", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  module_name, function_name = target_name.rsplit(".", 1)
  try:
    partitioning.maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                              args.process_id)
    module = importlib.import_module(module_name)
    gin_utils.parse(files, bindings, paths)
    fn = gin_utils.get_configurable(getattr(module, function_name))
    if call is None:
      fn()
    else:
      call(fn, args)
  except (gin_utils.GinConfigError,) + command_errors.EXPECTED_ERRORS as error:
    # Expected failures (configuration, files, disks, permissions): one line naming the
    # setting or path; the traceback with --verbose.
    if args.verbose:
      raise
    command_errors.report(prog, error)
    return 2
  except FloatingPointError as error:
    print(f"{prog}: stopped: {error}", file=sys.stderr)
    return 3
  except KeyboardInterrupt as error:  # Preempted/Interrupted (SIGTERM, SIGINT) or a plain Ctrl-C
    print(f"{prog}: {error or 'interrupted by SIGINT'}", file=sys.stderr)
    return getattr(error, "exit_code", 128 + signal.SIGINT)
  return 0
