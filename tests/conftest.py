"""The suite's numerics policy: float32 matrix products at full precision on every backend.

JAX's default float32 matmul on NVIDIA GPUs is TF32 (a 10-bit mantissa, ~1e-3 relative error),
which would force parity tolerances loose enough to hide a wrong head pairing. Every test runs
float32 products at 'highest' precision instead, so a float32 tolerance means the same on CPU and
GPU; bfloat16 tests keep tolerances of their own. Subprocesses the tests start inherit it through
the environment variable.

Where libtpu is installed only to compile for TPUs (CI installs the `tpu` extra), JAX is kept
from probing for TPU chips (tpu_topology.hide_absent_tpu), so no test prints libtpu's warnings.
"""

import os

import jax

from gqa_t5 import tpu_topology

tpu_topology.hide_absent_tpu()
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
jax.config.update("jax_default_matmul_precision", "highest")
