"""Real failed writes for the tests, without root or a full disk: a child interpreter whose files
cannot grow past a size limit (RLIMIT_FSIZE with SIGXFSZ ignored), so a write past it fails as
a full disk fails one: the system's error (EFBIG) names no file."""

import subprocess
import sys


def run_with_file_size_limit(setup: str, body: str, limit: int) -> str:
  """Runs `setup` (Python source), then `body` with every file capped at `limit` bytes, in a
  fresh interpreter; returns its stdout (what `body` prints), failing on a non-zero exit."""
  program = "\n".join([
      setup,
      "import resource as _resource, signal as _signal",
      "_signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)  # a write past the limit fails (EFBIG)",
      f"_resource.setrlimit(_resource.RLIMIT_FSIZE, ({limit}, {limit}))",
      body])
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout
