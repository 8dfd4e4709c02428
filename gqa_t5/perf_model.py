"""The project's one performance model: parameters, bytes, FLOPs and times from a `T5Config`.

Every count here is arithmetic on the config (no JAX), so it can be checked by hand; tests check
the parameter and cache counts against the network's own trees. It holds:

  * the chips (`CHIPS`: TPU v4, H200, ...): peak FLOP/s, HBM bandwidth and size, the one place
    these figures live;
  * parameter counts (`params`, `matmul_params`), split by when decoding reads them;
  * the bytes of one greedy decode step (`decode_step_bytes`): every decoder weight but the
    cross-attention key/value kernels (applied once per sequence, by the prefill), the
    self-attention cache [B, K, T, H] and the cross-attention keys/values [B, K_cross, S, H] of
    every layer (K and K_cross are the config's own);
  * a roofline of greedy decoding on chips (`Setup`, `time_per_sample`): every matmul at the
    chip's peak, every byte at its HBM bandwidth, each phase the longer of the two. For one
    sample of input length S and output length T on chips holding a batch of b samples each:

      encoder + cross-attention prefill (once per sample): FLOPs of the encoder over S tokens
        plus the projection of the encoder output into the cross-attention keys/values; bytes:
        the encoder weights, read once per batch;
      each of the T decode steps: bytes = `decode_step_bytes` (weights once per step for the
        whole batch, caches per sample); FLOPs = 2 per decoder matmul weight per sample + the
        attention score/value products.

      time per sample per chip = encoder_time / b + T * step_time / b.

    The model is partitioned over `model_parallel` chips (weights split evenly); caches are split
    evenly over the chips too ('ideal' layout: for K below the model-parallel size the caches
    are sharded by batch, as in Pope et al. 2022), or, with `kv_layout='replicated'`, laid out
    as the partitioner lays them out (head sharding alone, `kv_cache_copies`): the K heads are
    split over the model axis when every K is a multiple of model_parallel, and otherwise ALL K
    heads are held whole on every chip of the model axis (model_parallel copies of an even
    split, for K = 4 on an 8-way axis as for K = 1). The batch per chip is the largest up to
    `max_batch_per_chip` whose weights and caches fit the memory given (default: the chip's
    HBM);
  * the FLOPs and time of a training step (`train_forward_flops`, `train_step_flops`: the model
    FLOPs every MFU figure divides by, `train_step_seconds`).

Variants of a model are `T5Config`s too: `config.replace(num_kv_heads=k)`.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import ml_dtypes  # noqa: F401  # pylint: disable=unused-import  # numpy then knows 'bfloat16'
import numpy as np

from gqa_t5.model import axes
from gqa_t5.model.config import T5Config

GIB = 2 ** 30


# ---- chips -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's published figures (None: not known here, as nothing uses it)."""
  name: str
  hbm_bytes_per_s: Optional[float]         # HBM bandwidth
  peak_flops: float                        # dense bfloat16 FLOP/s
  hbm_bytes: Optional[float] = None        # physical HBM
  available_bytes: Optional[float] = None  # what a program may use (None: all of hbm_bytes)
  device_kind: str = ""                    # a substring of JAX's `device_kind` for this chip


# TPU v4: 1.2 TB/s HBM, 275 TFLOP/s bfloat16, 32 GiB per chip, of which TPU's compiler makes
# 30.75 GiB available to a program (its RESOURCE_EXHAUSTED message: "available HBM (30.75G)").
TPU_V4 = Chip("TPU v4", hbm_bytes_per_s=1.2e12, peak_flops=275e12, hbm_bytes=32 * GIB,
              available_bytes=30.75 * GIB, device_kind="v4")
# H200 SXM: 4.8 TB/s HBM3e, 989 TFLOP/s dense bfloat16, 141 GB.
H200 = Chip("H200", hbm_bytes_per_s=4.8e12, peak_flops=989e12, hbm_bytes=141e9,
            device_kind="H200")
# Dense bfloat16 peaks only (the training benchmark's MFU on these devices).
H100 = Chip("H100", None, 989e12, device_kind="H100")
A100 = Chip("A100", None, 312e12, device_kind="A100")
L4 = Chip("L4", None, 121e12, device_kind="L4")
TPU_V5E = Chip("TPU v5e", None, 197e12, device_kind="v5e")
TPU_V5P = Chip("TPU v5p", None, 459e12, device_kind="v5p")
# In the order a device kind is matched against them (`chip_of_device_kind`).
CHIPS = (H200, H100, A100, L4, TPU_V5E, TPU_V5P, TPU_V4)


def chip_of_device_kind(device_kind: str) -> Optional[Chip]:
  """The chip whose `device_kind` substring JAX's device kind contains (case-insensitive)."""
  kind = device_kind.lower()
  return next((c for c in CHIPS if c.device_kind.lower() in kind), None)


# ---- parameter counts --------------------------------------------------------------------------

def value_bytes(dtype) -> int:
  """Bytes of one value of `dtype` (a name such as 'bfloat16' or a numpy/JAX dtype)."""
  return np.dtype(dtype).itemsize


def attention_params(config: T5Config, kv_heads: int) -> Dict[str, int]:
  """The kernels of one attention layer with `kv_heads` key/value heads."""
  d, nh, kh = config.emb_dim, config.num_heads * config.head_dim, kv_heads * config.head_dim
  return {"query": d * nh, "key": d * kh, "value": d * kh, "out": nh * d}


def mlp_params(config: T5Config) -> int:
  """The kernels of one MLP (T5.1.1's gated GELU: two input matrices and one output)."""
  return (len(config.mlp_activations) + 1) * config.emb_dim * config.mlp_dim


def matmul_params(config: T5Config) -> Dict[str, int]:
  """The weights that multiply (2 FLOPs each per token), by when decoding applies them.

  'encoder': its attention (always multi-head) and MLP kernels; 'decoder_step': what every
  decode step applies (self-attention, cross-attention query and out, MLP, logits);
  'cross_kv': the cross-attention key/value kernels (applied once per sequence, by the
  prefill); 'embedding': 0 (a lookup).
  """
  self_attention = sum(attention_params(config, config.self_attention_kv_heads).values())
  cross = attention_params(config, config.cross_attention_kv_heads)
  mlp = mlp_params(config)
  encoder_layer = sum(attention_params(config, config.num_heads).values()) + mlp
  decoder_layer = self_attention + cross["query"] + cross["out"] + mlp
  logits = config.emb_dim * config.vocab_size  # logits_dense, or the embedding when tied
  return {"encoder": config.num_encoder_layers * encoder_layer,
          "decoder_step": config.num_decoder_layers * decoder_layer + logits,
          "cross_kv": config.num_decoder_layers * (cross["key"] + cross["value"]),
          "embedding": 0}


def params(config: T5Config) -> Dict[str, int]:
  """Every parameter of the network, by when decoding reads it (keys of `matmul_params`).

  Beyond the matmuls: each stack's RMS-norm scales (2 per encoder layer, 3 per decoder layer,
  one after each stack) and relative-position bias [N, buckets], and the token embedding
  (counted under 'decoder_step' when the logits are tied to it, as a step reads it there).
  """
  d, relpos = config.emb_dim, config.num_heads * config.relative_attention_num_buckets
  out = matmul_params(config)
  out["encoder"] += config.num_encoder_layers * 2 * d + d + relpos
  out["decoder_step"] += config.num_decoder_layers * 3 * d + d + relpos
  out["embedding"] = 0 if config.logits_via_embedding else config.vocab_size * d
  return out


def total_params(config: T5Config) -> int:
  return sum(params(config).values())


# ---- bytes of decoding -------------------------------------------------------------------------

def cache_bytes(config: T5Config, input_length: int, output_length: int,
                value_size: Optional[int] = None) -> Dict[str, int]:
  """{'self_cache', 'cross_kv'}: bytes of one sequence's decoding caches, keys and values of
  every decoder layer ([K, T, H] and [K_cross, S, H]), at `value_size` bytes a value (default:
  the activation dtype's)."""
  size = value_bytes(config.dtype) if value_size is None else value_size
  per_position = 2 * config.num_decoder_layers * config.head_dim * size
  return {"self_cache": per_position * config.self_attention_kv_heads * output_length,
          "cross_kv": per_position * config.cross_attention_kv_heads * input_length}


def decode_step_bytes(config: T5Config, batch: int, input_length: int, output_length: int,
                      weight_size: Optional[int] = None,
                      value_size: Optional[int] = None) -> Dict[str, int]:
  """{'weights', 'self_cache', 'cross_kv', 'total'}: bytes one decode step of `batch` sequences
  reads, the self-attention cache at its full length (it is masked past the current step).

  Caches are held at `value_size` bytes a value, weights at `weight_size` (both default to the
  activation dtype's, as the decode benchmark stores them).
  """
  size = value_bytes(config.dtype) if value_size is None else value_size
  weight_size = size if weight_size is None else weight_size
  caches = cache_bytes(config, input_length, output_length, size)
  out = {"weights": params(config)["decoder_step"] * weight_size,
         "self_cache": batch * caches["self_cache"], "cross_kv": batch * caches["cross_kv"]}
  out["total"] = sum(out.values())
  return out


def fit_batch(per_sequence_bytes: float, fixed_bytes: float, memory_bytes: float,
              usable_fraction: float = 1.0, multiple: int = 1,
              max_batch: Optional[int] = None) -> int:
  """The largest batch (up to `max_batch`; a multiple of `multiple` when at least that; at least
  1) whose per-sequence bytes fit in `usable_fraction` of the memory left after `fixed_bytes`."""
  free = usable_fraction * (memory_bytes - fixed_bytes)
  batch = int(free // per_sequence_bytes)
  if max_batch is not None:
    batch = min(batch, max_batch)
  if batch >= multiple:
    batch -= batch % multiple
  if batch < 1:
    raise ValueError(f"no batch fits: {fixed_bytes / GIB:.1f} GiB of parameters and buffers "
                     f"leave {free / GIB:.1f} GiB usable of {memory_bytes / GIB:.1f} GiB; "
                     f"one sequence needs {per_sequence_bytes / GIB:.2f} GiB")
  return batch


# ---- the roofline of decoding on chips ---------------------------------------------------------

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
  kv_layout: str = "ideal"          # or 'replicated' (`kv_cache_copies`)
  hbm_reserve_fraction: float = 0.0  # HBM kept free for activations and the program


def self_cache_positions_read(setup: Setup) -> float:
  """Cache positions a step reads, averaged over the T steps."""
  if setup.self_cache_read == "full":
    return float(setup.output_length)
  if setup.self_cache_read == "filled":
    return (setup.output_length + 1) / 2.0
  raise ValueError(f"Setup.self_cache_read must be 'full' or 'filled', got "
                   f"{setup.self_cache_read!r}")


def kv_cache_copies(config: T5Config, setup: Setup) -> int:
  """How many times the chips of a model axis hold the decoding caches, relative to an even
  split (each chip 1/model_parallel of them): the factor on a chip's cache bytes.

  'ideal': 1. 'replicated': the partitioner's layout (gqa_t5/partitioning.py, asking the same
  `axes.kv_heads_sharded`): 1 when the self- and cross-attention K are both multiples of
  model_parallel (the heads are split over the axis), else model_parallel, as every chip then
  holds all K heads of both caches. So K = 4 and K = 1 on an 8-way axis both give 8, K = 16 on
  it 1, K = 8 on a 16-way axis 16. (Not model_parallel / K: a head is never split over chips.)
  """
  if setup.kv_layout == "ideal":
    return 1
  if setup.kv_layout == "replicated":
    sharded = axes.kv_heads_sharded(config.self_attention_kv_heads,
                                    config.cross_attention_kv_heads, setup.model_parallel)
    return 1 if sharded else setup.model_parallel
  raise ValueError(f"Setup.kv_layout must be 'ideal' or 'replicated', got {setup.kv_layout!r}")


def _chip_caches(config: T5Config, setup: Setup) -> Dict[str, float]:
  """One sample's caches on a chip of the model axis (replicated K heads counted per copy)."""
  caches = cache_bytes(config, setup.input_length, setup.output_length, setup.bytes_per_value)
  copies = kv_cache_copies(config, setup)
  return {"self_cache": caches["self_cache"] * copies, "cross_kv": caches["cross_kv"] * copies}


def memory_per_chip(config: T5Config, setup: Setup, batch_per_chip: int) -> float:
  """HBM bytes one chip holds: its share of the weights and of the batch's caches."""
  weights = total_params(config) * setup.bytes_per_value / setup.model_parallel
  return weights + batch_per_chip * sum(_chip_caches(config, setup).values())


def fitting_batch_per_chip(config: T5Config, setup: Setup, chip: Chip,
                           memory_bytes: Optional[float] = None) -> int:
  """The largest batch per chip, up to `max_batch_per_chip`, whose weights and caches fit in
  `memory_bytes` (default: the chip's HBM less `setup.hbm_reserve_fraction` of it)."""
  if memory_bytes is None:
    memory_bytes = chip.hbm_bytes * (1.0 - setup.hbm_reserve_fraction)
  try:
    return fit_batch(sum(_chip_caches(config, setup).values()), memory_per_chip(config, setup, 0),
                     memory_bytes, max_batch=setup.max_batch_per_chip)
  except ValueError as error:
    raise ValueError(f"not even one sample fits in {memory_bytes / GIB:.2f} GiB of a "
                     f"{chip.name} with model_parallel={setup.model_parallel} "
                     f"(K={config.self_attention_kv_heads}): {error}") from None


def decode_step_flops_per_sample(config: T5Config, setup: Setup) -> float:
  """FLOPs of one decode step for one sample: matmuls + attention products."""
  nh = config.num_heads * config.head_dim
  matmul = 2.0 * matmul_params(config)["decoder_step"]
  attention = 2.0 * 2.0 * nh * config.num_decoder_layers * (
      self_cache_positions_read(setup) + setup.input_length)
  return matmul + attention


def encode_flops_per_sample(config: T5Config, setup: Setup) -> Dict[str, float]:
  """FLOPs of the encoder over the input and of the cross-attention key/value prefill."""
  s = setup.input_length
  nh = config.num_heads * config.head_dim
  matmul = matmul_params(config)
  encoder = 2.0 * matmul["encoder"] * s + 2.0 * 2.0 * nh * s * s * config.num_encoder_layers
  return {"encoder": encoder, "prefill": 2.0 * matmul["cross_kv"] * s}


def decode_step(config: T5Config, setup: Setup, chip: Chip,
                batch_per_chip: int) -> Dict[str, float]:
  """Bytes, FLOPs and time of one decode step on one chip (batch_per_chip samples)."""
  step = decode_step_bytes(config, batch_per_chip, setup.input_length, setup.output_length,
                           setup.bytes_per_value, setup.bytes_per_value)
  weights = step["weights"] / setup.model_parallel
  copies = kv_cache_copies(config, setup)
  self_cache = (step["self_cache"] * copies
                * self_cache_positions_read(setup) / setup.output_length)
  cross_kv = step["cross_kv"] * copies
  total_bytes = weights + self_cache + cross_kv
  flops = batch_per_chip * decode_step_flops_per_sample(config, setup)
  memory_time = total_bytes / chip.hbm_bytes_per_s
  compute_time = flops / chip.peak_flops
  return {"weights_bytes": weights, "self_cache_bytes": self_cache, "cross_kv_bytes": cross_kv,
          "bytes": total_bytes, "flops": flops, "memory_time": memory_time,
          "compute_time": compute_time, "time": max(memory_time, compute_time),
          "memory_bound": memory_time >= compute_time}


def time_per_sample(config: T5Config, setup: Setup = Setup(), chip: Chip = TPU_V4,
                    batch_per_chip: Optional[int] = None) -> Dict[str, float]:
  """Chip-seconds per sample, with the terms that make it up.

  Returns a dict: batch_per_chip (default: `fitting_batch_per_chip`), total, encode (encoder +
  prefill), decode (T steps), and the decode time split by what the step waits for:
  decode_weights, decode_self_cache, decode_cross_kv (their byte shares of a memory-bound step)
  or decode_compute.
  """
  b = batch_per_chip or fitting_batch_per_chip(config, setup, chip)
  enc = encode_flops_per_sample(config, setup)
  enc_weight_bytes = params(config)["encoder"] * setup.bytes_per_value / setup.model_parallel
  enc_compute = b * (enc["encoder"] + enc["prefill"]) / chip.peak_flops
  enc_memory = enc_weight_bytes / chip.hbm_bytes_per_s
  encode = max(enc_compute, enc_memory) / b
  step = decode_step(config, setup, chip, b)
  decode = setup.output_length * step["time"] / b
  out = {"batch_per_chip": b, "encode": encode, "decode": decode, "total": encode + decode,
         "step_time": step["time"], "step_memory_bound": step["memory_bound"],
         "step_bytes": step["bytes"], "step_flops": step["flops"],
         "step_memory_time": step["memory_time"], "step_compute_time": step["compute_time"],
         "memory_per_chip": memory_per_chip(config, setup, b)}
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
  """The largest contribution to a `time_per_sample` result, in words."""
  terms = {"encoder and cross-attention prefill (compute)": result["encode"],
           "decoder weights read per step": result["decode_weights"],
           "self-attention cache read per step": result["decode_self_cache"],
           "cross-attention keys/values read per step": result["decode_cross_kv"],
           "decoder matmuls (compute-bound steps)": result["decode_compute"]}
  name = max(terms, key=terms.get)
  return f"{name} ({terms[name] / result['total']:.0%})"


# ---- training steps ----------------------------------------------------------------------------

def train_forward_flops(config: T5Config, input_length: int,
                        target_length: int) -> Dict[str, float]:
  """Forward FLOPs of one training example: the weight matmuls and the attention products."""
  s, t = input_length, target_length
  nh = config.num_heads * config.head_dim
  matmul = matmul_params(config)
  weights = 2.0 * ((matmul["encoder"] + matmul["cross_kv"]) * s + matmul["decoder_step"] * t)
  attention = 2.0 * 2.0 * nh * (config.num_encoder_layers * s * s
                                + config.num_decoder_layers * (t * t + t * s))
  return {"matmul": weights, "attention": attention}


def train_step_flops(config: T5Config, *, batch: int, input_length: int, target_length: int,
                     remat_policy: str = "none") -> float:
  """FLOPs of one training step of `batch` examples: the forward, the backward at twice the
  forward, and the forward that rematerialisation computes again. With remat_policy 'none' these
  are the model FLOPs that MFU divides by the step time and the peak.

  'minimal' (T5X's checkpoint_dots_with_no_batch_dims) keeps the weight matmuls and recomputes
  the attention products; 'full' recomputes the whole forward of each layer.
  """
  forward = train_forward_flops(config, input_length, target_length)
  recompute = {"none": 0.0, "minimal": forward["attention"],
               "full": forward["matmul"] + forward["attention"]}
  if remat_policy not in recompute:
    raise ValueError(f"remat_policy must be one of {sorted(recompute)}, got {remat_policy!r}")
  return batch * (3.0 * sum(forward.values()) + recompute[remat_policy])


def train_step_seconds(config: T5Config, *, batch: int, input_length: int, target_length: int,
                       chips: int, model_parallel: int, remat_policy: str = "none",
                       num_microbatches: int = 1, chip: Chip = TPU_V4) -> float:
  """Seconds of one training step on each chip: its FLOPs (`train_step_flops`) at the chip's
  peak, plus the float32 weights read again by every extra micro-batch (forward and backward).
  """
  flops = train_step_flops(config, batch=batch, input_length=input_length,
                           target_length=target_length, remat_policy=remat_policy)
  weight_bytes = 4.0 * total_params(config) / model_parallel
  rereads = 2.0 * weight_bytes * (num_microbatches - 1)
  return flops / chips / chip.peak_flops + rereads / chip.hbm_bytes_per_s
