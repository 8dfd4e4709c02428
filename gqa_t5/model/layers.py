"""T5.1.1 building blocks with T5X's parameter names and logical axes.

Parameters are float32; activations are computed in `dtype`. Each parameter carries logical axis
names in the `params_axes` collection (T5X's `param_with_axes`), so t5x's partitioner and ours
both read them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct
from flax.linen import partitioning as nn_partitioning

from gqa_t5.model import products

Dtype = Any
Initializer = Callable[..., jnp.ndarray]

# T5X's initialisers: fan-in scaled normals for projections, unit normal for the embedding.
# Each is one function object shared by every parameter drawn alike: `param_init` draws the
# parameters that share an initialiser (and shape) with one program.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
mlp_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
embedding_init = nn.initializers.normal(stddev=1.0)
relative_bias_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


@functools.lru_cache(maxsize=None)
def scaled_kernel_init(divisor: float) -> Initializer:
  """`default_kernel_init` / divisor (T5's query kernels); one function per divisor."""
  return lambda *args: default_kernel_init(*args) / divisor


# While `recording_parameters` is active, every parameter's initialiser call goes to its
# recorder instead: record(path, init_fn, key, shape, dtype) -> the value to use.
_RECORDER: contextvars.ContextVar = contextvars.ContextVar("gqa_t5_parameter_recorder",
                                                           default=None)


@contextlib.contextmanager
def recording_parameters(record: Callable[..., jnp.ndarray]) -> Iterator[None]:
  """Routes each parameter's creation through `record` (for `param_init`), with its path in
  the parameter tree, initialiser, the key flax gives it, shape and dtype."""
  token = _RECORDER.set(record)
  try:
    yield
  finally:
    _RECORDER.reset(token)


def param_with_axes(module: nn.Module, name: str, init_fn: Initializer, shape: Tuple[int, ...],
                    dtype, axes: Tuple[str, ...]) -> jnp.ndarray:
  """`module`'s parameter `name`, with logical axes (flax's `param_with_axes`)."""
  record = _RECORDER.get()
  if record is not None:
    init_fn = functools.partial(record, tuple(module.path) + (name,), init_fn)
  return nn_partitioning.param_with_axes(name, init_fn, shape, dtype, axes=axes, module=module)


def _activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
  if name == "linear":
    return lambda x: x
  if name in ("gelu", "gelu_new"):
    return nn.gelu  # tanh approximation: T5X's default and HF's "gelu_new"
  return {"relu": nn.relu, "silu": nn.silu, "swish": nn.silu, "tanh": jnp.tanh}[name]


class Dense(nn.Module):
  """y = x @ kernel with a 2-D kernel [in, out] (T5X stores attention kernels flattened)."""

  in_features: int
  features: int
  kernel_axes: Tuple[str, str]
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  def setup(self):
    # setup() (not compact) so that `kernel` can be read outside __call__, e.g. to project
    # the encoder output inside a lax.cond in cached decoding.
    self.kernel = param_with_axes(self, "kernel", self.kernel_init,
                                  (self.in_features, self.features), jnp.float32,
                                  axes=self.kernel_axes)

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    return project(x, self.kernel, self.dtype)


def project(x: jnp.ndarray, kernel: jnp.ndarray, dtype: Dtype) -> jnp.ndarray:
  """x [..., in] @ kernel [in, out] in `dtype` (`products.dense`: a CPU decode step's few rows
  take the streaming kernel)."""
  return products.dense(x.astype(dtype), kernel.astype(dtype))


class Embed(nn.Module):
  """Token embedding [vocab, emb]; `attend` gives tied logits."""

  num_embeddings: int
  features: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = param_with_axes(self, "embedding", embedding_init,
                                     (self.num_embeddings, self.features), jnp.float32,
                                     axes=("vocab", "embed"))

  def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
    # Look up in float32, then cast: the same rows, but the gradient (a scatter-add of every
    # token's row into the table) accumulates in float32. Cast first, a frequent token's
    # thousands of rows were summed in bfloat16, which stops growing (87% low for 4,096 rows
    # in tests/test_network.py), and a GPU adds bfloat16 with compare-and-swap loops.
    return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jnp.ndarray) -> jnp.ndarray:
    return jnp.dot(x.astype(self.dtype), self.embedding.astype(self.dtype).T)


class RMSNorm(nn.Module):
  """T5's layer norm: no mean subtraction, no bias; statistics in float32."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), jnp.float32,
                            axes=("embed",))
    x = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = (x * jax.lax.rsqrt(variance + self.epsilon)).astype(self.dtype)
    return y * scale.astype(self.dtype)


class MlpBlock(nn.Module):
  """T5.1.1's gated MLP: wo(act_0(x wi_0) * act_1(x wi_1)), names as T5X's."""

  mlp_dim: int
  activations: Sequence[str] = ("gelu", "linear")
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    emb_dim = x.shape[-1]
    hidden = None
    for index, name in enumerate(self.activations):
      dense_name = "wi" if len(self.activations) == 1 else f"wi_{index}"
      h = Dense(emb_dim, self.mlp_dim, ("embed", "mlp"), self.dtype, mlp_kernel_init,
                name=dense_name)(x)
      h = _activation(name)(h)
      hidden = h if hidden is None else hidden * h
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))  # [B, T, mlp]
    hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(hidden,
                                                                 deterministic=deterministic)
    return Dense(self.mlp_dim, emb_dim, ("mlp", "embed"), self.dtype, mlp_kernel_init,
                 name="wo")(hidden)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jnp.ndarray:
  """T5's bucketing of (key position - query position): exact when near, log-spaced when far."""
  num_buckets_half = num_buckets // 2 if bidirectional else num_buckets
  n = -relative_position
  bucket = jnp.zeros_like(n)
  if bidirectional:
    bucket = bucket + (n < 0).astype(n.dtype) * num_buckets_half
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets_half // 2
  is_small = n < max_exact
  # The epsilon keeps exact powers of two from rounding down (as T5X does).
  log_ratio = jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
  large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                       * (num_buckets_half - max_exact)).astype(n.dtype)
  large = jnp.minimum(large, num_buckets_half - 1)
  return bucket + jnp.where(is_small, n, large)


@struct.dataclass
class RelativeBias:
  """T5's relative position bias as data: the per-(head, bucket) table and its bucketing.

  A pytree (the table is its one array), so a decoder can hand it to its layers through `nn.scan`
  and a cached decode step can compute only the bias rows of its own positions.
  """

  embedding: jnp.ndarray                                    # [N, buckets], float32
  num_buckets: int = struct.field(pytree_node=False)
  max_distance: int = struct.field(pytree_node=False)
  bidirectional: bool = struct.field(pytree_node=False)
  dtype: Dtype = struct.field(pytree_node=False, default=jnp.float32)   # of the bias

  def __call__(self, query_positions: jnp.ndarray, key_positions: jnp.ndarray) -> jnp.ndarray:
    """Bias [1|B, N, T, S] for query positions [T] or [1|B, T] against key positions [S]."""
    if query_positions.ndim == 1:
      query_positions = query_positions[None]                            # [1, T]
    relative = key_positions[None, None, :] - query_positions[:, :, None]  # [1|B, T, S]
    buckets = relative_position_bucket(relative.astype(jnp.int32), self.bidirectional,
                                       self.num_buckets, self.max_distance)  # [1|B, T, S]
    # Looked up in float32, then cast (as the token embedding): the table's gradient sums
    # every (query, key) pair's, and accumulates in float32.
    bias = products.bias_lookup(self.embedding, buckets)                 # [N, 1|B, T, S]
    return jnp.moveaxis(bias, 0, 1).astype(self.dtype)                   # [1|B, N, T, S]


class RelativePositionBiases(nn.Module):
  """One bias per (head, bucket), shared by every layer of a stack: `rel_embedding` [N, buckets]."""

  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.rel_embedding = param_with_axes(
        self, "rel_embedding", relative_bias_init, (self.num_heads, self.num_buckets),
        jnp.float32, axes=("heads", "relpos_buckets"))

  def table(self, bidirectional: bool) -> RelativeBias:
    """The bias as data, for decode steps that need only their own rows."""
    return RelativeBias(self.rel_embedding, self.num_buckets, self.max_distance, bidirectional,
                        self.dtype)

  def __call__(self, query_positions: jnp.ndarray, key_positions: jnp.ndarray,
               bidirectional: bool) -> jnp.ndarray:
    """Bias [1|B, N, T, S] for query positions [T] or [1|B, T] against key positions [S]."""
    return self.table(bidirectional)(query_positions, key_positions)
