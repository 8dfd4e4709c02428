"""Expected failures of a command as one line: every `gqa-t5` command turns a failure of files,
disks, permissions or configuration into `PROG: error: <path or setting>: <cause>` on stderr and
a non-zero exit status, with the traceback kept for --verbose (or, for a failure that escapes a
command into the `gqa-t5` dispatcher, in a log file the line names).

Light on purpose (no JAX, no gin): the dispatcher imports it before any command's module.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional, Tuple, Type

from gqa_t5.checkpoints.errors import describe_os_error

# Configuration (ValueError: gin's, ours, a bad setting; KeyError: an unknown name) and files,
# disks, permissions (OSError). Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: Tuple[Type[BaseException], ...] = (ValueError, KeyError, OSError)
# Where the dispatcher keeps the traceback of a failure it reports in one line.
LOG_DIR_ENV_VAR = "GQA_T5_ERROR_LOG_DIR"


def _unwrap_gin(error: BaseException) -> BaseException:
  """The error a gin-configured function raised. gin re-raises it as a proxy: an instance of a
  subclass of its type, of the same name, whose message appends "In call to configurable
  'train' (<function train at 0x...>)" and whose OSError fields (errno, file name) are unset;
  the original is the proxy's suppressed context (one proxy per configured call it crossed)."""
  while (error.__suppress_context__ and error.__context__ is not None
         and type(error) is not type(error.__context__)
         and isinstance(error, type(error.__context__))
         and type(error).__name__ == type(error.__context__).__name__):
    error = error.__context__
  return error


def describe_error(error: BaseException) -> str:
  """The message of an expected failure; an OSError as 'PATH: cause'."""
  error = _unwrap_gin(error)
  if isinstance(error, OSError):
    return describe_os_error(error)
  return str(error) or type(error).__name__


def report(prog: str, error: BaseException, note: str = "") -> None:
  """Prints `PROG: error: <message>` (one line: a multi-line message is joined)."""
  message = " ".join(describe_error(error).split("\n"))
  print(f"{prog}: error: {message}{note}", file=sys.stderr)


def run_reporting_errors(prog: str, run: Callable[[], Optional[int]], verbose: bool = False,
                         expected: Tuple[Type[BaseException], ...] = EXPECTED_ERRORS,
                         status: int = 2) -> int:
  """`run()` as a command's body: its exit status, or for an expected failure one line naming
  the path or setting and the cause and exit status `status` (with `verbose` the error
  propagates, traceback and all). Ctrl-C or SIGTERM (KeyboardInterrupt) is one line too, with
  status 128 + the signal."""
  try:
    return int(run() or 0)
  except expected as error:
    if verbose:
      raise
    report(prog, error)
    return status
  except KeyboardInterrupt as error:
    print(f"{prog}: {error or 'interrupted by SIGINT'}", file=sys.stderr)
    return getattr(error, "exit_code", 128 + signal.SIGINT)


def log_traceback(prog: str, error: BaseException) -> Optional[str]:
  """Writes `error`'s traceback to a fresh file under $GQA_T5_ERROR_LOG_DIR (default: the
  temporary directory's gqa_t5_errors/) and returns its path; None if that cannot be written
  (the one-line report matters more than the log)."""
  folder = os.environ.get(LOG_DIR_ENV_VAR) or os.path.join(tempfile.gettempdir(),
                                                            "gqa_t5_errors")
  name = f"{prog.replace(' ', '-')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
  try:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "x") as f:  # a diagnostic, not a result: a plain exclusive create
      f.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
  except OSError:
    return None
  return path
