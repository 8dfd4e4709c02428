"""A roofline model of greedy encoder-decoder decoding on accelerator chips.

It predicts the paper's "time per sample per chip" (chip-seconds spent on one sample) from
bytes and FLOPs alone: every matmul runs at the chip's peak FLOP rate and every byte moves at
its HBM bandwidth, and a phase takes the longer of the two. For one sample of input length S
and output length T on chips holding a batch of b samples each:

  encoder + cross-attention prefill (once per sample): FLOPs of the encoder over S tokens plus
    the projection of the encoder output into the decoder's cross-attention keys/values;
    bytes: the encoder weights, read once per batch;
  each of the T decode steps: bytes = the decoder weights (all but the cross-attention key/value
    kernels, used only by the prefill) and the logits layer, read once per step for the whole
    batch, + per sample the self-attention cache (2 * K * T * H per layer) and the
    cross-attention keys/values (2 * K_cross * S * H per layer); FLOPs = 2 per decoder weight
    per sample + the attention score/value products.

  time per sample per chip = encoder_time / b + T * step_time / b.

The model is partitioned over `model_parallel` chips (weights split evenly); caches are split
evenly over the chips too ('ideal' layout: for K below the model-parallel size the caches are
sharded by batch, as in Pope et al. 2022), or, with `kv_layout='replicated'`, K < model_parallel
key/value heads are repeated on every chip of the model axis (what head-sharding alone does).
The batch per chip is the largest up to `max_batch_per_chip` whose weights and caches fit in HBM.

Pure Python: no JAX, so the arithmetic can be checked by hand. Model sizes come from a
`T5Config` (`gqa_t5/model/sizes.py` names them) through `shape_of`, the one place a config
becomes the light `ModelShape` the arithmetic reads.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The dimensions that set a T5.1.1 model's bytes and FLOPs (gated-GELU MLP: 3 matrices)."""
  name: str
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_encoder_layers: int
  num_decoder_layers: int
  vocab_size: int = 32128
  num_kv_heads: Optional[int] = None  # decoder self- and cross-attention; None: MHA
  mlp_matrices: int = 3

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def with_kv_heads(self, k: Optional[int], name: Optional[str] = None) -> "ModelShape":
    if k is not None and (k <= 0 or self.num_heads % k):
      raise ValueError(f"{self.name}: {k} key/value heads do not divide {self.num_heads} "
                       f"query heads")
    return dataclasses.replace(self, num_kv_heads=k, name=name or self.name)


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes_per_s: float
  peak_flops: float
  hbm_bytes: float


@dataclasses.dataclass(frozen=True)
class Setup:
  """How decoding runs: chips, partitioning, batch, lengths, precision."""
  chips: int = 8
  model_parallel: int = 8
  max_batch_per_chip: int = 32
  input_length: int = 2048
  output_length: int = 512
  bytes_per_value: int = 2          # bfloat16 weights and caches
  self_cache_read: str = "full"     # 'full': every step reads the whole fixed-size cache
                                    # (T5X's layout); 'filled': only the positions so far
  kv_layout: str = "ideal"          # or 'replicated' (see the module docstring)
  hbm_reserve_fraction: float = 0.0  # HBM kept free for activations and the program


# Published figures: TPU v4, 1.2 TB/s HBM bandwidth and 275 TFLOP/s bfloat16 per chip, 32 GiB.
TPU_V4 = Chip("TPU v4", 1.2e12, 275e12, 32 * 2 ** 30)
# H200 SXM: 4.8 TB/s HBM3e, 989 TFLOP/s dense bfloat16, 141 GB.
H200 = Chip("H200", 4.8e12, 989e12, 141e9)

# The paper's Table 1 ("time per sample per TPUv4 chip, measured by xprof"), seconds.
PAPER_TABLE1_SECONDS = {"MHA-Large": 0.37, "MHA-XXL": 1.51, "MQA-XXL": 0.24, "GQA-8-XXL": 0.28}


def shape_of(config, name: str = "model") -> ModelShape:
  """The `ModelShape` of a `T5Config` (decoder self-attention K; T5.1.1's gated MLP)."""
  return ModelShape(name, emb_dim=config.emb_dim, num_heads=config.num_heads,
                    head_dim=config.head_dim, mlp_dim=config.mlp_dim,
                    num_encoder_layers=config.num_encoder_layers,
                    num_decoder_layers=config.num_decoder_layers, vocab_size=config.vocab_size,
                    num_kv_heads=config.num_kv_heads,
                    mlp_matrices=len(config.mlp_activations) + 1)


# ---- parameter counts ------------------------------------------------------------------------

def attention_params(shape: ModelShape, kv_heads: int) -> Dict[str, int]:
  d, nh, kh = shape.emb_dim, shape.num_heads * shape.head_dim, kv_heads * shape.head_dim
  return {"query": d * nh, "key": d * kh, "value": d * kh, "out": nh * d}


def mlp_params(shape: ModelShape) -> int:
  return shape.mlp_matrices * shape.emb_dim * shape.mlp_dim


def encoder_params(shape: ModelShape) -> int:
  """Matmul parameters of the encoder (its attention is always multi-head)."""
  per_layer = sum(attention_params(shape, shape.num_heads).values()) + mlp_params(shape)
  return shape.num_encoder_layers * per_layer


def decoder_step_params(shape: ModelShape) -> int:
  """Parameters one decode step reads: all decoder matmuls except the cross-attention
  key/value kernels, plus the logits layer."""
  self_attn = sum(attention_params(shape, shape.kv_heads).values())
  cross = attention_params(shape, shape.kv_heads)
  cross_step = cross["query"] + cross["out"]
  per_layer = self_attn + cross_step + mlp_params(shape)
  return shape.num_decoder_layers * per_layer + shape.emb_dim * shape.vocab_size


def cross_kv_params(shape: ModelShape) -> int:
  """The cross-attention key/value kernels (read by the prefill only)."""
  cross = attention_params(shape, shape.kv_heads)
  return shape.num_decoder_layers * (cross["key"] + cross["value"])


def total_params(shape: ModelShape) -> int:
  """All weights including the token embedding (norms and relative biases are negligible)."""
  return (encoder_params(shape) + decoder_step_params(shape) + cross_kv_params(shape)
          + shape.vocab_size * shape.emb_dim)


# ---- per-sample quantities -------------------------------------------------------------------

def cache_bytes_per_sample(shape: ModelShape, setup: Setup) -> Dict[str, float]:
  """Bytes of one sample's caches held in memory (the self cache at its full length)."""
  per = 2 * shape.kv_heads * shape.head_dim * setup.bytes_per_value * shape.num_decoder_layers
  return {"self_cache": per * setup.output_length, "cross_kv": per * setup.input_length}


def self_cache_positions_read(setup: Setup) -> float:
  """Cache positions a step reads, averaged over the T steps."""
  if setup.self_cache_read == "full":
    return float(setup.output_length)
  if setup.self_cache_read == "filled":
    return (setup.output_length + 1) / 2.0
  raise ValueError(f"Setup.self_cache_read must be 'full' or 'filled', got "
                   f"{setup.self_cache_read!r}")


def decode_step_flops_per_sample(shape: ModelShape, setup: Setup) -> float:
  """FLOPs of one decode step for one sample: matmuls + attention products."""
  nh = shape.num_heads * shape.head_dim
  matmul = 2.0 * decoder_step_params(shape)
  attention = 2.0 * 2.0 * nh * shape.num_decoder_layers * (
      self_cache_positions_read(setup) + setup.input_length)
  return matmul + attention


def encode_flops_per_sample(shape: ModelShape, setup: Setup) -> Dict[str, float]:
  """FLOPs of the encoder over the input and of the cross-attention key/value prefill."""
  s = setup.input_length
  nh = shape.num_heads * shape.head_dim
  encoder = 2.0 * encoder_params(shape) * s + 2.0 * 2.0 * nh * s * s * shape.num_encoder_layers
  prefill = 2.0 * cross_kv_params(shape) * s
  return {"encoder": encoder, "prefill": prefill}


def _cache_replication(shape: ModelShape, setup: Setup) -> float:
  if setup.kv_layout == "ideal":
    return 1.0
  if setup.kv_layout == "replicated":
    return max(1.0, setup.model_parallel / shape.kv_heads)
  raise ValueError(f"Setup.kv_layout must be 'ideal' or 'replicated', got {setup.kv_layout!r}")


def memory_per_chip(shape: ModelShape, setup: Setup, batch_per_chip: int) -> float:
  """HBM bytes one chip holds: its share of the weights and of the batch's caches."""
  weights = total_params(shape) * setup.bytes_per_value / setup.model_parallel
  caches = sum(cache_bytes_per_sample(shape, setup).values())
  return weights + batch_per_chip * caches * _cache_replication(shape, setup)


def fitting_batch_per_chip(shape: ModelShape, setup: Setup, chip: Chip) -> int:
  """The largest batch per chip, up to `max_batch_per_chip`, whose memory fits in HBM."""
  budget = chip.hbm_bytes * (1.0 - setup.hbm_reserve_fraction)
  best = 0
  for b in range(1, setup.max_batch_per_chip + 1):
    if memory_per_chip(shape, setup, b) <= budget:
      best = b
  if best == 0:
    raise ValueError(f"{shape.name}: not even one sample fits in {chip.name}'s "
                     f"{chip.hbm_bytes / 2 ** 30:.0f} GiB with model_parallel="
                     f"{setup.model_parallel}")
  return best


def decode_step(shape: ModelShape, setup: Setup, chip: Chip,
                batch_per_chip: int) -> Dict[str, float]:
  """Bytes, FLOPs and time of one decode step on one chip (batch_per_chip samples)."""
  mp = setup.model_parallel
  weights = decoder_step_params(shape) * setup.bytes_per_value / mp
  per_sample = cache_bytes_per_sample(shape, setup)
  replication = _cache_replication(shape, setup)
  self_read = (per_sample["self_cache"] * self_cache_positions_read(setup)
               / setup.output_length)
  self_cache = batch_per_chip * self_read * replication
  cross_kv = batch_per_chip * per_sample["cross_kv"] * replication
  total_bytes = weights + self_cache + cross_kv
  flops = batch_per_chip * decode_step_flops_per_sample(shape, setup)
  memory_time = total_bytes / chip.hbm_bytes_per_s
  compute_time = flops / chip.peak_flops
  return {"weights_bytes": weights, "self_cache_bytes": self_cache, "cross_kv_bytes": cross_kv,
          "bytes": total_bytes, "flops": flops, "memory_time": memory_time,
          "compute_time": compute_time, "time": max(memory_time, compute_time),
          "memory_bound": memory_time >= compute_time}


def time_per_sample(shape: ModelShape, setup: Setup = Setup(), chip: Chip = TPU_V4,
                    batch_per_chip: Optional[int] = None) -> Dict[str, float]:
  """Chip-seconds per sample, with the terms that make it up.

  Returns a dict: batch_per_chip, total, encode (encoder + prefill), decode (T steps), and
  the decode time split by what the step waits for: decode_weights, decode_self_cache,
  decode_cross_kv (their byte shares of a memory-bound step) or decode_compute.
  """
  b = batch_per_chip or fitting_batch_per_chip(shape, setup, chip)
  enc = encode_flops_per_sample(shape, setup)
  enc_weight_bytes = encoder_params(shape) * setup.bytes_per_value / setup.model_parallel
  enc_compute = b * (enc["encoder"] + enc["prefill"]) / chip.peak_flops
  enc_memory = enc_weight_bytes / chip.hbm_bytes_per_s
  encode = max(enc_compute, enc_memory) / b
  step = decode_step(shape, setup, chip, b)
  decode = setup.output_length * step["time"] / b
  out = {"batch_per_chip": b, "encode": encode, "decode": decode, "total": encode + decode,
         "step_time": step["time"], "step_memory_bound": step["memory_bound"],
         "step_bytes": step["bytes"], "step_flops": step["flops"],
         "step_memory_time": step["memory_time"], "step_compute_time": step["compute_time"],
         "memory_per_chip": memory_per_chip(shape, setup, b)}
  if step["memory_bound"]:
    scale = setup.output_length / b / chip.hbm_bytes_per_s
    out.update(decode_weights=step["weights_bytes"] * scale,
               decode_self_cache=step["self_cache_bytes"] * scale,
               decode_cross_kv=step["cross_kv_bytes"] * scale, decode_compute=0.0)
  else:
    out.update(decode_weights=0.0, decode_self_cache=0.0, decode_cross_kv=0.0,
               decode_compute=decode)
  return out


def dominant_term(result: Dict[str, float]) -> str:
  """The largest contribution to the time per sample, in words."""
  terms = {"encoder and cross-attention prefill (compute)": result["encode"],
           "decoder weights read per step": result["decode_weights"],
           "self-attention cache read per step": result["decode_self_cache"],
           "cross-attention keys/values read per step": result["decode_cross_kv"],
           "decoder matmuls (compute-bound steps)": result["decode_compute"]}
  name = max(terms, key=terms.get)
  return f"{name} ({terms[name] / result['total']:.0%})"


def group_counts(num_heads: int) -> List[int]:
  """Every K that divides N, 1..N."""
  return [k for k in range(1, num_heads + 1) if num_heads % k == 0]


# ---- training steps ---------------------------------------------------------------------------

def train_forward_flops(shape: ModelShape, input_length: int,
                        target_length: int) -> Dict[str, float]:
  """Forward FLOPs of one training example: the weight matmuls and the attention products."""
  s, t = input_length, target_length
  nh = shape.num_heads * shape.head_dim
  matmul = 2.0 * (encoder_params(shape) * s + cross_kv_params(shape) * s
                  + decoder_step_params(shape) * t)
  attention = 2.0 * 2.0 * nh * (shape.num_encoder_layers * s * s
                                + shape.num_decoder_layers * (t * t + t * s))
  return {"matmul": matmul, "attention": attention}


def train_step_seconds(shape: ModelShape, *, batch: int, input_length: int, target_length: int,
                       chips: int, model_parallel: int, remat_policy: str = "none",
                       num_microbatches: int = 1, chip: Chip = TPU_V4) -> float:
  """Seconds of one training step on each chip: compute at the chip's peak, plus the float32
  weights read again by every extra micro-batch (forward and backward).

  Backward costs twice the forward. Rematerialisation adds the recomputed forward:
  'minimal' (T5X's checkpoint_dots_with_no_batch_dims) keeps the weight matmuls and recomputes
  the attention products; 'full' recomputes the whole forward of each layer.
  """
  forward = train_forward_flops(shape, input_length, target_length)
  recompute = {"none": 0.0, "minimal": forward["attention"],
               "full": forward["matmul"] + forward["attention"]}
  if remat_policy not in recompute:
    raise ValueError(f"remat_policy must be one of {sorted(recompute)}, got {remat_policy!r}")
  flops = batch * (3.0 * sum(forward.values()) + recompute[remat_policy])
  weight_bytes = 4.0 * total_params(shape) / model_parallel
  rereads = 2.0 * weight_bytes * (num_microbatches - 1)
  return flops / chips / chip.peak_flops + rereads / chip.hbm_bytes_per_s
